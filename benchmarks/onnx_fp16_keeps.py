"""ONNX fp16 with and without the default precision keeps: error against PyTorch float32 and latency,
beside the fp32 artifact, interleaved in one run on onnxruntime's CPU provider.

    python benchmarks/onnx_fp16_keeps.py [--variant B1] [--threads 2] [--duration-s 10] [--out benchmarks/results]

Seeded random weights of the variant at 224x224, batch 1. Writes results/onnx-fp16-keeps-<machine>.json/.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def ort_cpu_precisions(path: str) -> dict:
    """What onnxruntime's CPU provider actually computes an fp16 graph in: the optimized graph it runs,
    each op counted by the type of its inputs (fp16 or fp32), Casts apart."""
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as work:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = f"{work}/optimized.onnx"
        so.log_severity_level = 3
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        m = onnx.shape_inference.infer_shapes(onnx.load(so.optimized_model_filepath))
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    types.update({t.name: t.data_type for t in m.graph.initializer})
    count: Counter = Counter()
    for n in m.graph.node:
        ins = {types.get(i) for i in n.input if i}
        kind = "cast" if n.op_type == "Cast" else "fp16" if onnx.TensorProto.FLOAT16 in ins else "fp32"
        count[(kind, n.op_type)] += 1
    return {kind: dict(sorted(((op, c) for (k, op), c in count.items() if k == kind), key=lambda x: -x[1]))
            for kind in ("fp16", "fp32", "cast")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=Path("artifacts/onnx-fp16-keeps"))
    args = ap.parse_args()

    import logging
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from mixformer_deploy.artifact import write_json_atomic
    from mixformer_deploy.bench import Policy, benchmark
    from mixformer_deploy.export_api import export

    rows = {}
    for label, precision, keeps in (("fp32", "fp32", True), ("fp16 + default keeps", "fp16", True),
                                    ("fp16, no keeps", "fp16", False)):
        out = args.work / label.replace(" ", "-").replace(",", "").replace("+", "with")
        r = export(None, "onnx", args.variant, 224, 1, precision, output=out, default_keeps=keeps)
        o = r.parity.overall
        rows[label] = {"path": str(r.path), "passed": r.passed, "max_abs": o.max_abs, "rel_l2": o.rel_l2,
                       "min_cosine": o.min_sample_cosine, "top1_agreement": o.top1_agreement,
                       "kept_modules": len((r.manifest.get("precision_keeps") or {}).get("modules", []))}
    doc = benchmark([r["path"] for r in rows.values()], runtime="onnxruntime", threads=args.threads,
                    policy=Policy(warmup_s=2.0, duration_s=args.duration_s, min_iters=50))
    for i, v in enumerate(rows.values()):  # by position: two fp16 files share a name, in different folders
        v["p50_ms"] = next(r["latency_ms"]["p50"] for r in doc["results"] if r["index"] == i)
    doc["fp16_keeps"] = rows
    doc["ort_cpu_fp16_graph_runs_in"] = ort_cpu_precisions(rows["fp16 + default keeps"]["path"])
    slug = doc["machine"]["slug"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"onnx-fp16-keeps-{slug}.json", doc)
    fp32 = rows["fp32"]["p50_ms"]
    lines = [f"# ONNX fp16 with and without the precision keeps ({args.variant} seeded, 224x224, batch 1, "
             f"onnxruntime CPU, {args.threads} threads)", "", f"Machine: `{slug}` ({doc['machine'].get('cpu_model', '')}). "
             "Interleaved in one run.", "",
             "| artifact | kept modules | max abs err | rel L2 | min cosine | top-1 agree | parity | p50 ms | vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, v in rows.items():
        lines.append(f"| {label} | {v['kept_modules']} | {v['max_abs']:.3g} | {v['rel_l2']:.3g} | {v['min_cosine']:.6f} "
                     f"| {100 * v['top1_agreement']:.0f}% | {'pass' if v['passed'] else 'FAIL'} | {v['p50_ms']:.2f} "
                     f"| {fp32 / v['p50_ms']:.2f}x |")
    runs = doc["ort_cpu_fp16_graph_runs_in"]
    lines += ["", "What onnxruntime's CPU provider computes the fp16 graph in (its optimized graph, ops by input type):",
              f"fp16: {runs['fp16']}", f"fp32: {runs['fp32']}", f"Casts: {sum(runs['cast'].values())}"]
    (args.out / f"onnx-fp16-keeps-{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
