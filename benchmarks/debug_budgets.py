"""The error curves that ``debug``'s budget rule is chosen from: healthy artifacts of the shipped weights.

    python benchmarks/debug_budgets.py [--out benchmarks/results]

For every reduced precision a runtime here computes (ONNX, OpenVINO, ExecuTorch and LiteRT int8; OpenVINO
bf16 and fp16 execution, where the CPU has them; fp32 as the floor), the per-block curve of the shipped
weights' artifact at 32x32, and each point's excess over the rule's growth term: rel L2 - GROWTH x the error
entering it. The local budget of a precision must sit above every healthy excess (no false alarm) and
below what a planted fault adds (tests/test_debug.py, tests/conformance/test_probe_debug.py).
Writes results/debug-budgets-<machine-slug>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

CALIBRATION = ROOT / "models" / "examples"
CASES = (  # (target, export precision, runtime options)
    ("onnx", "fp32", {}), ("onnx", "int8", {}), ("openvino", "int8", {}), ("openvino", "fp32", {"precision": "bf16"}),
    ("openvino", "fp16", {"precision": "fp16"}), ("executorch", "int8", {}), ("litert", "int8", {}),
)


def curve(work: Path, target: str, precision: str, runtime_options: dict) -> dict:
    from mixformer_deploy.debug import GROWTH, debug_artifact
    from mixformer_deploy.export_api import export

    art = export(None, target=target, precision=precision, output=work / f"{target}-{precision}", check=False,
                 calibration=None).path
    report = debug_artifact(art, runtime_options=runtime_options)
    points = [{"name": p.name, "rel_l2": p.rel_l2, "entering": p.entering,
               "excess": p.rel_l2 - GROWTH * p.entering, "exceeded": p.exceeded} for p in report.blocks]
    return {"target": target, "export_precision": precision, "runtime_options": runtime_options,
            "runtime_precision": report.precision, "points": points,
            "max_excess": max(p["excess"] for p in points), "logits_rel_l2": report.outputs[0].rel_l2,
            "verdict": report.verdict(), "probe_vs_artifact": report.probe_vs_artifact}


def markdown(slug: str, cpu: str, rows: list[dict]) -> str:
    from mixformer_deploy.debug import GROWTH, LOCAL_BUDGET

    lines = [f"# debug budgets: healthy curves of the shipped weights ({slug})", "",
             f"Machine: {cpu}. Shipped weights (B0 digits), 32x32, default inputs (photos, random, held-out "
             f"digits). Rule: rel L2 <= {GROWTH:g} x entering + local budget.", "",
             "| artifact | runtime computes | worst point excess | local budget | logits rel L2 | probe vs artifact | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['target']} {r['export_precision']} {r['runtime_options']} | - | - | - | - | - | {r['error']} |")
            continue
        lines.append(f"| {r['target']} {r['export_precision']} {r['runtime_options'] or ''} | {r['runtime_precision']} | "
                     f"{r['max_excess']:.2e} | {LOCAL_BUDGET.get(r['runtime_precision'], LOCAL_BUDGET['int8']):.2g} | "
                     f"{r['logits_rel_l2']:.2e} | {r['probe_vs_artifact']:.2g} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from mixformer_deploy.artifact import write_json_atomic
    from mixformer_deploy.errors import MixformerDeployError
    from mixformer_deploy.reports.bench_json import environment, fingerprint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    machine = fingerprint(environment("cpu", 2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target, precision, options in CASES:
            try:
                rows.append(curve(Path(tmp), target, precision, options))
            except MixformerDeployError as e:  # e.g. a CPU without fp16 execution
                rows.append({"target": target, "export_precision": precision, "runtime_options": options,
                             "error": str(e)})
            print(rows[-1].get("verdict") or rows[-1].get("error"), file=sys.stderr)
    slug = machine["slug"]
    write_json_atomic(args.out / f"debug-budgets-{slug}.json", {"machine": machine, "rows": rows})
    (args.out / f"debug-budgets-{slug}.md").write_text(markdown(slug, machine["cpu_model"], rows))
    print(args.out / f"debug-budgets-{slug}.md")


if __name__ == "__main__":
    main()
