"""The ``export --target all`` table: one row per target and precision it exports (or runs at), as terminal
cells and as the ``summary.md`` a pull request shows (format-neutral: the same cells for both).

What is left out of the rows is what repeats: a precision a target does not export is one line ("not
offered: bf16 by onnx, ..."), a note that says the same for several rows is one note naming them all, the
artifacts' file names are in the JSON (``--json``) and the output directory, not in the notes. Statuses are
one or two words; the why is in the row's note. The cells are short enough for 100 columns (a CI log).
"""

from __future__ import annotations

from pathlib import Path

from ..artifact import atomic_file
from ..export_all import HEADERS, LEGEND, MIB, SHORT_HEADERS, SUMMARY_NAME, ExportAllResult, Row

NUMERIC = SHORT_HEADERS[3:]        # right-aligned, never wrapped or cut
STATUS = {"passed": "passed", "failed": "FAILED", "exported": "exported", "missing extra": "missing extra",
          "unavailable": "not available here", "reference": "reference", "not offered": "not offered"}


def status_cell(row: Row) -> str:
    """One or two words (the note says why); a row checked on a stand-in runtime says which."""
    if row.kind == "error":
        return f"error (exit {row.exit_code})" if row.exit_code is not None else "error"
    word = STATUS.get(row.kind, row.kind)
    if row.kind == "exported" and row.status.endswith("not checked"):  # --no-check
        word = "not checked"
    if row.deploy_runtime and row.runtime and row.built:
        word = f"{word} on {row.runtime}"
    return word


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def cells(row: Row) -> list[str]:
    """The table's cells of one row (blank where not applicable), shared by the terminal table and summary.md."""
    acc = ""
    if row.accuracy is not None:
        acc = f"{row.accuracy * 100:.2f}/{row.accuracy_reference * 100:.2f}%"
    return [row.target, row.precision_label, status_cell(row),
            "" if row.size_bytes is None else f"{row.size_bytes / MIB:.2f}",
            "" if row.max_abs is None else f"{row.max_abs:.1e}",
            "" if row.cosine is None else f"{row.cosine:.6f}",
            "" if row.top1_agreement is None else f"{row.top1_agreement * 100:.1f}%",
            acc,
            "" if row.p50_ms is None else _ms(row.p50_ms),
            "" if row.speedup is None else f"{row.speedup:.2f}x"]


def table_rows(result: ExportAllResult) -> list[Row]:
    """The rows worth a line: everything but the precisions a target does not export."""
    return [r for r in result.rows if r.kind != "not offered"]


def _plain_not_offered(row: Row) -> bool:
    """Not offered only because the target does not export that precision (its note just lists them)."""
    return row.kind == "not offered" and (not row.note or row.note.startswith(f"{row.target} exports "))


def not_offered_line(result: ExportAllResult) -> str | None:
    """'not offered: bf16 by onnx, tensorrt; int8 by coreml': one line for every
    precision a target does not export, grouped by precision."""
    by_precision: dict[str, list[str]] = {}
    for r in result.rows:
        if r.kind == "not offered":
            by_precision.setdefault(r.precision, []).append(r.target)
    if not by_precision:
        return None
    return "not offered: " + "; ".join(f"{p} by {', '.join(t)}" for p, t in by_precision.items())


def legend(result: ExportAllResult) -> list[str]:
    """What the columns and the runtime-precision rows mean (the latter only when there are some)."""
    lines = [LEGEND]
    for r in result.rows:
        if r.runtime_options and not any(line.startswith(r.precision_label + ":") for line in lines):
            opts = " ".join(f"-O {k}={v}" for k, v in r.runtime_options.items())
            lines.append(f"{r.precision_label}: no {r.precision} export; the fp32 artifact run by its runtime at "
                         f"{r.precision} ({opts} on parity and bench)")
    return lines


def _note(row: Row, timed: bool) -> str | None:
    """What a row adds to its cells: why it is not built or checked here, what failed, where it can be done.
    Never the artifact's file name or the precisions a target offers (summary.md is read in a PR)."""
    if row.kind == "reference" or _plain_not_offered(row):
        return None
    parts = []
    if row.deploy_runtime and row.built:
        parts.append(f"checked here on {row.runtime}, deployed on {row.deploy_runtime}"
                     + (f"; not timed: {row.runtime}'s time is not {row.deploy_runtime}'s" if timed else ""))
    if row.kind == "not offered":
        parts.append(f"not offered: {row.note}")
    elif row.kind == "error":
        parts.append(row.note or row.status)
    elif row.note and not (row.command and row.note in row.command):
        parts.append(row.note)
    if row.command:
        parts.append(f"{'details' if row.kind == 'failed' else 'where it can be done'}: `{row.command}`")
    return "; ".join(parts) or None


def notes(result: ExportAllResult) -> list[str]:
    """One line per distinct note, naming every row it is about ("onnx int8, litert int8: ..."); then the
    rows whose timing was noisy, in one line, and a timing failure."""
    timed = result.bench is not None or bool(result.bench_error)
    grouped: dict[str, list[str]] = {}
    for r in result.rows:
        text = _note(r, timed)
        if text:
            grouped.setdefault(text, []).append(r.label)
    out = [f"{', '.join(labels)}: {text}" for text, labels in grouped.items()]
    noisy = [f"{r.label} {r.noisy_cv:.0%}" for r in result.rows if r.noisy_cv is not None]
    if noisy:
        out.append(f"timing noisy (CV over the limit), compare with care: {', '.join(noisy)}")
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
        line += f"; timed with {s.get('threads')} thread(s), >= {s.get('duration_s')} s per subject, interleaved"
    return line


def _verdict(result: ExportAllResult) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in result.counts().items())
    verdict = {0: "ok", 1: "a gate failed (exit 1)"}.get(result.exit_code, f"exit {result.exit_code}")
    return (f"{counts}; {verdict}; {result.seconds:.1f} s in all (weights read once, "
            f"{result.load_seconds:.1f} s).")


def summary_markdown(result: ExportAllResult) -> str:
    """summary.md: the command, the machine, the rows, one not-offered line, the verdict, distinct notes."""
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["## mixformer-deploy: every target", ""]
    if result.command:
        lines += ["```", result.command, "```", ""]
    lines += [f"Batch {result.batch}. Machine: {machine_line(result)}.", "",
              "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(esc(c) for c in cells(r)) + " |" for r in table_rows(result)]
    lines.append("")
    offered = not_offered_line(result)
    if offered:
        lines += [offered[:1].upper() + offered[1:] + ".", ""]
    lines.append(_verdict(result))
    extra = notes(result)
    if extra:
        lines += ["", "Notes:", ""] + [f"- {esc(n)}" for n in extra]
    lines += ["", " ".join([line + "." for line in legend(result)[1:]] + [
        "Blank cells do not apply. Parity: PyTorch eager float32 of the same weights; accuracy: the held-out "
        "digits (shipped weights only). Timings are comparable within this run only."]), ""]
    return "\n".join(lines)


def write_summary(result: ExportAllResult) -> Path:
    path = result.output / SUMMARY_NAME
    result.summary_path = path
    with atomic_file(path) as tmp:
        tmp.write_text(summary_markdown(result))
    return path


WRAPPABLE = ("status", "precision")  # narrowed first, never below their longest word, when 100 columns are short


def column_widths(rows: list[list[str]], width: int) -> list[int]:
    """Each column's width: its longest cell, except that the status and then the precision column wrap at
    spaces (never inside a word) when the table would be wider than ``width``; numbers never narrow."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(SHORT_HEADERS)]
    excess = sum(widths) + len(widths) - 1 - width
    for name in WRAPPABLE:
        if excess <= 0:
            break
        i = SHORT_HEADERS.index(name)
        floor = max([len(name)] + [len(word) for r in rows for word in r[i].split()])
        cut = min(excess, widths[i] - floor)
        widths[i] -= max(cut, 0)
        excess -= max(cut, 0)
    return widths


def table(result: ExportAllResult, width: int = 100):
    """The terminal table at ``width`` columns: every row one line where it fits, else its status wraps
    at a space; no cell is ever cut."""
    from rich import box
    from rich.table import Table

    rows = [cells(r) for r in table_rows(result)]
    t = Table(title=f"export --target all, batch {result.batch}: {machine_line(result)}", title_justify="left",
              box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    for name, w in zip(SHORT_HEADERS, column_widths(rows, width)):
        t.add_column(name, justify="right" if name in NUMERIC else "left", width=w, no_wrap=name not in WRAPPABLE,
                     overflow="fold")
    for row in rows:
        t.add_row(*row)
    return t


def print_table(result: ExportAllResult, console) -> None:
    """The table, its legend, the not-offered line and the notes (each note one line, never broken:
    commands in it stay copyable)."""
    console.print(table(result, console.width))
    for line in legend(result):
        console.print(line, markup=False, highlight=False)
    offered = not_offered_line(result)
    if offered:
        console.print(offered, markup=False, highlight=False)
    for line in notes(result):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
