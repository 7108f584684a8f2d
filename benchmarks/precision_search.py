"""--keep-fp32 auto against no keeps and the default keeps, on the shipped weights, in one interleaved run.

    python benchmarks/precision_search.py [--duration-s 5] [--out benchmarks/results]

Rows "no keeps fail": OpenVINO, ExecuTorch and LiteRT int8 gated with --max-accuracy-drop 0 (not one more
misclassified held-out digit than the reference). Rows "both pass": ONNX, TensorRT-ready (judged on
onnxruntime) and OpenVINO int8 under the default gate. For each: the set auto found and the exports it took,
the default keeps' size, each artifact's gate and held-out errors, and p50 latency of the three artifacts
timed side by side (2 threads); auto vs default keeps with its 95% bootstrap interval (the run's noise
bound). Writes results/precision-search-<machine-slug>.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

FAIL_ROWS = (("openvino", "0"), ("executorch", "0"), ("litert", "0"))
PASS_ROWS = (("onnx", None), ("tensorrt", None), ("openvino", None))
KINDS = ("auto", "default keeps", "no keeps")


def export_three(work: Path, target: str, drop: str | None) -> dict:
    """auto, default keeps, no keeps: each gated as the row says; (kind -> facts)."""
    from mixformer_deploy.export_api import export
    from mixformer_deploy.keep_search import named_as_exported as usable

    options = {"onnx_only": True} if target == "tensorrt" else None
    kwargs = dict(target=target, precision="int8", max_accuracy_drop=drop, target_options=options)
    out = {}
    for kind, keeps, defaults in (("auto", ("auto",), True), ("default keeps", (), True), ("no keeps", (), False)):
        folder = work / f"{target}-{drop}-{kind.replace(' ', '-')}"
        try:
            r = export(None, keep_fp32=keeps, default_keeps=defaults, output=folder, **kwargs)
        except Exception as e:  # noqa: BLE001 (a failed gate is a row, not the end of the run)
            failed = next(iter(folder.glob("*.failed")), None)
            out[kind] = {"error": str(e), "passed": False, "path": str(usable(failed)) if failed else None}
            continue
        out[kind] = {**facts(r), "path": str(usable(r.path))}
    return out



def facts(r) -> dict:
    keeps = r.manifest.get("precision_keeps") or {}
    gate = next((g for g in (r.parity.accuracy if r.parity else [])), None)
    return {"path": str(r.path), "passed": r.passed, "modules": keeps.get("modules"),
            "search": keeps.get("search"), "rel_l2": r.parity.overall.rel_l2 if r.parity else None,
            "heldout_errors": None if gate is None else gate.artifact_errors,
            "reference_errors": None if gate is None else gate.reference_errors}


def timed(rows: list[dict], duration: float) -> dict:
    """Every artifact of every row, interleaved in one run."""
    from mixformer_deploy.bench import Policy, artifact_subject, benchmark_subjects
    import dataclasses

    subjects = []
    for row in rows:
        for kind in KINDS:
            path = row["artifacts"].get(kind, {}).get("path")
            if path:
                s = artifact_subject(path, "auto", "cpu", 2)
                subjects.append(dataclasses.replace(s, name=f"{row['label']} | {kind}"))
    return benchmark_subjects(subjects, policy=Policy(warmup_s=1.0, duration_s=duration, min_iters=50))


def auto_vs_default(doc: dict, label: str) -> dict | None:
    from mixformer_deploy.regression import bootstrap_ratio

    by = {r["artifact"]: r for r in doc["results"]}
    a, d = by.get(f"{label} | auto"), by.get(f"{label} | default keeps")
    if not a or not d:
        return None
    return bootstrap_ratio(a["samples_ms"], d["samples_ms"])


def default_size() -> int:
    from mixformer_deploy.deploy import to_deploy
    from mixformer_deploy.deploy.precision import resolve_keeps
    from mixformer_deploy.source import load_source

    return len(resolve_keeps(to_deploy(load_source(None).model, (32, 32))))


def markdown(slug: str, cpu: str, rows: list[dict], doc: dict, size: int) -> str:
    p50 = {r["artifact"]: r["latency_ms"]["p50"] for r in doc["results"]}
    lines = [f"# --keep-fp32 auto on the shipped weights ({slug})", "",
             f"Machine: {cpu}. B0 digits, 32x32, batch 1, 2 threads, one interleaved run (p50 ms). Default keeps: "
             f"{size} modules. 'auto vs default' is the p50 ratio auto/default with its 95% bootstrap interval "
             "(below 1 and excluding 1: auto is faster beyond the run's noise).", "",
             "| row | target | auto set (size) | exports | gate: auto / default / none | held-out errors (ref) auto / default / none | p50 ms auto / default / none | auto vs default |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        a = row["artifacts"]
        search = (a.get("auto", {}).get("search") or {})
        found = search.get("found")
        gate = " / ".join("pass" if a.get(k, {}).get("passed") else "fail" for k in KINDS)
        errs = " / ".join(str(a.get(k, {}).get("heldout_errors", "-")) for k in KINDS)
        ref = next((a[k].get("reference_errors") for k in KINDS if a.get(k, {}).get("reference_errors") is not None), "-")
        names = [f"{row['label']} | {k}" for k in KINDS]
        ms = " / ".join(f"{p50[n]:.3f}" if n in p50 else "-" for n in names)
        ratio = row.get("auto_vs_default")
        rtxt = "-" if not ratio else f"{ratio['ratio']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"
        lines.append(f"| {row['kind']} | {row['target']} | {', '.join(found) if found else '(none)'} ({len(found or [])}) | "
                     f"{search.get('exports', '-')} | {gate} | {errs} ({ref}) | {ms} | {rtxt} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "precision-search")
    ap.add_argument("--only", default=None, help="rows of these targets only (comma-separated), written as "
                                                 "precision-search-<machine>-<targets>.{json,md}")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mixformer_deploy.keep_search").setLevel(logging.INFO)
    from mixformer_deploy.artifact import write_json_atomic

    rows = []
    for kind, cases in (("no keeps fail (drop 0)", FAIL_ROWS), ("both pass (default gate)", PASS_ROWS)):
        for target, drop in cases:
            if only and target not in only:
                continue
            label = f"{target} {'drop 0' if drop else 'default gate'}"
            rows.append({"kind": kind, "target": target, "label": label,
                         "artifacts": export_three(args.work, target, drop)})
    doc = timed(rows, args.duration_s)
    for row in rows:
        row["auto_vs_default"] = auto_vs_default(doc, row["label"])
    slug, cpu = doc["machine"]["slug"], doc["machine"]["cpu_model"]
    name = f"precision-search-{slug}" + (f"-{'-'.join(sorted(only))}" if only else "")
    write_json_atomic(args.out / f"{name}.json", {"rows": rows, "bench": doc})
    (args.out / f"{name}.md").write_text(markdown(slug, cpu, rows, doc, default_size()))
    print(args.out / f"{name}.md")


if __name__ == "__main__":
    main()
