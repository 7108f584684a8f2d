"""The deploy form's ONNX against naive exports of the reference model, timed side by side.

    python benchmarks/onnx_speedup.py [--variant B1] [--threads 2] [--duration-s 20] [--out benchmarks/results]

B1 (seeded random weights), 224x224, batch 1, onnxruntime CPU, interleaved in one run (each artifact in
its own worker process): the deploy-form ONNX as `mixformer-deploy export` ships it, and
`torch.onnx.export` of the reference model at opset 17, unsimplified, with each exporter
(dynamo=False, dynamo=True), and the TorchScript one simplified by the same simplifier the deploy form
uses (onnxslim), so that the rewrite's own gain shows apart from simplification's. The naive files get a
manifest sidecar only.
Writes results/onnx-speedup-<machine-slug>.json (bench/1 document + node counts) and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def naive_export(model, path: Path, dynamo: bool, h: int, w: int) -> dict:
    import onnx
    import torch

    x = torch.zeros(1, 3, h, w)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model.requires_grad_(False)
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    m = onnx.load(str(path), load_external_data=False)
    return {"nodes": len(m.graph.node), "opset": m.opset_import[0].version,
            "ops": dict(Counter(n.op_type for n in m.graph.node).most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B1")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=Path("artifacts/onnx-speedup"))
    args = ap.parse_args()

    import logging

    import onnx

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("onnxscript").setLevel(logging.CRITICAL)  # the dynamo exporter's opset fallback chatter
    from mixformer_deploy.bench import Policy, benchmark
    from mixformer_deploy.export_api import export
    from mixformer_deploy.source import load_source
    from mixformer_deploy.artifact import sidecar_path, size_bytes, write_json_atomic
    from mixformer_deploy.reports.markdown import bench_markdown

    h = w = args.size
    args.work.mkdir(parents=True, exist_ok=True)
    deploy = export(None, "onnx", args.variant, args.size, 1, "fp32", output=args.work, check=True)
    if not deploy.passed:
        sys.exit("the deploy-form export failed its parity check")
    shipped = onnx.load(str(deploy.path))
    nodes = {"deploy-form": {**deploy.manifest["nodes"], "opset": deploy.manifest["opset"],
                             "ops": dict(Counter(n.op_type for n in shipped.graph.node).most_common())}}
    model = load_source(None, args.variant).model
    paths = [deploy.path]
    def naive_sidecar(path: Path, label: str, facts: dict) -> None:
        """The deploy form's manifest (same weights, size, batch) with this file's own form and facts."""
        write_json_atomic(sidecar_path(path), {
            **deploy.manifest, "form": label, "opset": facts["opset"], "size_bytes": size_bytes(path),
            "nodes": {"exported": facts["nodes"], "shipped": facts["nodes"]}, "stage_outputs": None, "parity": None})

    for label, dynamo in (("naive-torchscript", False), ("naive-dynamo", True)):
        opset = 18 if dynamo else 17   # the dynamo exporter starts at 18 (its down-conversion fails here)
        path = args.work / f"{label}-{args.variant.lower()}-{h}x{w}-opset{opset}.onnx"
        facts = naive_export(model, path, dynamo, h, w)
        assert facts["opset"] == opset, facts["opset"]
        nodes[label] = facts
        naive_sidecar(path, label, facts)
        paths.append(path)
    import onnxslim
    slim_path = args.work / f"naive-torchscript-slim-{args.variant.lower()}-{h}x{w}-opset17.onnx"
    slim = onnxslim.slim(onnx.load(str(paths[1])))
    onnx.save(slim, str(slim_path))
    nodes["naive-torchscript+onnxslim"] = {"nodes": len(slim.graph.node), "opset": 17,
                                           "ops": dict(Counter(n.op_type for n in slim.graph.node).most_common())}
    naive_sidecar(slim_path, "naive-torchscript+onnxslim", nodes["naive-torchscript+onnxslim"])
    paths.append(slim_path)

    policy = Policy(warmup_s=3.0, duration_s=args.duration_s, min_iters=100)
    doc = benchmark(paths, runtime="onnxruntime", threads=args.threads, policy=policy)
    p50 = {r["artifact"]: r["latency_ms"]["p50"] for r in doc["results"]}
    deploy_p50 = p50[deploy.path.name]
    naive = {n: v for n, v in p50.items() if n != deploy.path.name}
    fastest = min(naive, key=naive.get)
    doc["onnx_speedup"] = {
        "nodes": nodes, "p50_ms": p50, "fastest_naive": fastest,
        "speedup_vs_fastest_naive": naive[fastest] / deploy_p50,
        "speedup_vs_each": {n: v / deploy_p50 for n, v in naive.items()}, "goal": 1.3,
        "speedup_vs_same_simplifier": p50[slim_path.name] / deploy_p50,
    }
    slug = doc["machine"]["slug"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"onnx-speedup-{slug}.json", doc)
    lines = [f"# Deploy-form ONNX vs naive exports ({args.variant}, {h}x{w}, batch 1, onnxruntime, "
             f"{args.threads} threads)", "", f"Machine: `{slug}`. Interleaved in one run; p50 latency.", "",
             "| artifact | exported nodes | shipped nodes | opset | p50 ms | deploy form is faster by |",
             "|---|---|---|---|---|---|"]
    for name, path in zip(["deploy-form", "naive-torchscript", "naive-dynamo", "naive-torchscript+onnxslim"], paths):
        n = nodes[name]
        ratio = "-" if name == "deploy-form" else f"{p50[path.name] / deploy_p50:.2f}x"
        lines.append(f"| {name} | {n.get('exported', n['nodes'] if 'nodes' in n else '')} | "
                     f"{n.get('shipped', n.get('nodes'))} | {n['opset']} | {p50[path.name]:.2f} | {ratio} |")
    lines += ["", f"Speed-up against the faster naive export ({fastest}): "
              f"**{doc['onnx_speedup']['speedup_vs_fastest_naive']:.2f}x** (goal 1.3x); against the naive export "
              f"simplified by the same simplifier (the rewrite's own gain): "
              f"**{doc['onnx_speedup']['speedup_vs_same_simplifier']:.2f}x**.", "",
              bench_markdown([doc])]
    (args.out / f"onnx-speedup-{slug}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in doc["onnx_speedup"].items() if k != "nodes"}, indent=2))
    print(args.out / f"onnx-speedup-{slug}.md")


if __name__ == "__main__":
    main()
