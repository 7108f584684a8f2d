"""The ``export --target all`` table: one row per target and precision, as terminal cells and as the
``summary.md`` a pull request shows (format-neutral: the same cells for both)."""

from __future__ import annotations

from pathlib import Path

from ..artifact import atomic_file
from ..export_all import BUILT, HEADERS, MIB, SUMMARY_NAME, ExportAllResult, Row


def cells(row: Row, status_width: int | None = None) -> list[str]:
    """The table's cells of one row (blank where not applicable), shared by the terminal table and summary.md."""
    status = row.status
    if status_width and len(status) > status_width:
        status = status[: status_width - 1] + "…"
    acc = ""
    if row.accuracy is not None:
        acc = f"{row.accuracy * 100:.2f}/{row.accuracy_reference * 100:.2f}%"
    return [row.target, row.precision, status,
            "" if row.size_bytes is None else f"{row.size_bytes / MIB:.2f}",
            "" if row.max_abs is None else f"{row.max_abs:.1e}",
            "" if row.cosine is None else f"{row.cosine:.6f}",
            "" if row.top1_agreement is None else f"{row.top1_agreement * 100:.1f}%",
            acc,
            "" if row.p50_ms is None else f"{row.p50_ms:.3g}",
            "" if row.speedup is None else f"{row.speedup:.2f}x"]


def notes(result: ExportAllResult) -> list[str]:
    """One line per row that has something to add (why, what is missing, the command that finishes it)."""
    out = []
    for r in result.rows:
        if r.kind == "reference":
            if r.note and "noisy" in r.note:
                out.append(f"{r.target} (reference): {r.note}")
            continue
        parts = []
        if r.note and not (r.kind == "error" and r.status == f"error: {r.note}"):
            parts.append(r.note)
        elif r.kind == "error":
            parts.append(r.status)
        if r.exit_code is not None and r.kind == "error":
            parts.append(f"exit code {r.exit_code}")
        if r.command:
            label = "details" if r.kind == "failed" else "where it can be done"
            parts.append(f"{label}: `{r.command}`")
        if r.kind in BUILT and r.artifact:
            parts.insert(0, Path(r.artifact).name)
        if parts:
            out.append(f"{r.target} {r.precision}: " + "; ".join(parts))
    if result.bench_error:
        out.append(f"timing: {result.bench_error}")
    return out


def machine_line(result: ExportAllResult) -> str:
    from ..environment import hardware

    hw = hardware()
    gpus = ", ".join(g.get("name") or g.get("model") or "GPU" for g in hw.get("gpus") or []) or "no GPU"
    line = f"{hw.get('cpu')} ({hw.get('usable_cpus')} usable CPUs), {gpus}, {hw.get('os')}"
    if result.bench:
        s = result.bench.get("settings") or {}
        line += (f"; timed with {s.get('threads')} thread(s), batch {', '.join(map(str, s.get('batches') or []))}, "
                 f">= {s.get('duration_s')} s per subject, interleaved")
    return line


def summary_markdown(result: ExportAllResult) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    counts = ", ".join(f"{v} {k}" for k, v in result.counts().items())
    lines = ["## mixformer-deploy: every target", ""]
    if result.command:
        lines += ["```", result.command, "```", ""]
    lines += [f"Machine: {machine_line(result)}.", "",
              "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in result.rows:
        lines.append("| " + " | ".join(esc(c) for c in cells(r)) + " |")
    verdict = {0: "ok", 1: "a gate failed (exit 1)"}.get(result.exit_code, f"exit {result.exit_code}")
    lines += ["", f"{counts}; {verdict}; {result.seconds:.1f} s in all (weights read once, "
                  f"{result.load_seconds:.1f} s)."]
    extra = notes(result)
    if extra:
        lines += ["", "Notes:", ""] + [f"- {esc(n)}" for n in extra]
    lines += ["", "Blank cells do not apply. Parity: PyTorch eager float32 of the same weights; accuracy: the "
                  "held-out digits (shipped weights only). Timings are comparable within this run only.", ""]
    return "\n".join(lines)


def write_summary(result: ExportAllResult) -> Path:
    path = result.output / SUMMARY_NAME
    result.summary_path = path
    with atomic_file(path) as tmp:
        tmp.write_text(summary_markdown(result))
    return path
