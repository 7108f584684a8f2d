"""MixFormer as a dense-task backbone at detection and segmentation sizes: onnxruntime and OpenVINO.

    python benchmarks/backbone_bench.py [--variant B1] [--sizes 512x512,800x1216] [--threads 2]
                                        [--duration-s 10] [--out benchmarks/results]

For each size: the seeded-random backbone (--head none, features_0..3) exported to ONNX and to OpenVINO
(fp32, batch 1), each parity-checked per output, then timed interleaved with PyTorch eager of the
reference backbone (one worker process each, mixformer_deploy.bench): p50 latency and the peak resident
memory of each worker (load + inference). Writes results/backbone-<machine-slug>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def run_size(variant: str, size: str, args) -> dict:
    from mixformer_deploy.bench import Policy, artifact_subject, benchmark_subjects, reference_subject
    from mixformer_deploy.export_api import export
    from mixformer_deploy.backends.openvino.runner import OpenVinoRunner

    work = args.work / size
    exports, paths = {}, {}
    for name, target in (("onnxruntime fp32", "onnx"), ("openvino f32", "openvino")):
        t0 = time.perf_counter()
        r = export(None, target=target, variant=variant, img_size=size, batch=1, head="none", output=work)
        exports[name] = {"seconds": round(time.perf_counter() - t0, 1), "passed": r.passed,
                         "max_abs": {k: m.max_abs for k, m in r.parity.outputs.items()}}
        paths[name] = r.path
    options = {"openvino f32": {"precision": "fp32"}}
    if OpenVinoRunner.status(probe=True).get("bf16"):
        paths["openvino bf16 execution"] = paths["openvino f32"]
        options["openvino bf16 execution"] = {"precision": "bf16"}
    subjects = [replace(artifact_subject(p, threads=args.threads, options=options.get(n)), name=n)
                for n, p in paths.items()]
    subjects.append(replace(reference_subject(subjects[0]), name="pytorch eager (reference backbone)"))
    doc = benchmark_subjects(subjects, [1], Policy(warmup_s=2.0, duration_s=args.duration_s, min_iters=20))
    doc["backbone"] = {"variant": variant, "size": size, "exports": exports,
                       "outputs": subjects[0].manifest.get("outputs")}
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B1")
    ap.add_argument("--sizes", default="512x512,800x1216")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=10.0)
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=Path("artifacts/backbone-bench"))
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from mixformer_deploy.artifact import write_json_atomic

    docs = [run_size(args.variant.upper(), s.strip(), args) for s in args.sizes.split(",")]
    env, slug = docs[0]["environment"], docs[0]["machine"]["slug"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"backbone-{slug}.json", {
        "schema": "mixformer-deploy/backbone-bench/1", "machine": docs[0]["machine"], "cpu": env.get("cpu_model"),
        "notes": args.note, "runs": docs})
    lines = [f"# {args.variant.upper()} backbone (features_0..3, seeded weights), batch 1, {args.threads} threads", "",
             f"Machine: `{slug}` ({env.get('cpu_model')}). Each size is one interleaved run; peak RSS is each "
             "worker process's (runtime loaded, inference run).", *(f"Note: {n}" for n in args.note), "",
             "| size | runtime | p50 ms | p90 ms | CV | peak RSS MiB | speed-up vs PyTorch eager |",
             "|---|---|---|---|---|---|---|"]
    for d in docs:
        ref = next(r for r in d["results"] if r["role"] == "reference")["latency_ms"]["p50"]
        for r in d["results"]:
            peak = r.get("peak_rss_bytes")
            lines.append(f"| {d['backbone']['size']} | {r['artifact']} | {r['latency_ms']['p50']:.1f} | "
                         f"{r['latency_ms']['p90']:.1f} | {r['cv']:.0%} | "
                         f"{peak / 2**20:.0f} | {ref / r['latency_ms']['p50']:.2f}x |" if peak else "| - |")
    lines += ["", "Exports (each with its per-output parity gate): " + "; ".join(
        f"{d['backbone']['size']} {k} {v['seconds']} s, passed {v['passed']}"
        for d in docs for k, v in d["backbone"]["exports"].items()), ""]
    (args.out / f"backbone-{slug}.md").write_text("\n".join(lines) + "\n")
    print(args.out / f"backbone-{slug}.md")


if __name__ == "__main__":
    main()
