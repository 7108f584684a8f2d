"""Mobile runtimes on this CPU: ExecuTorch (XNNPACK) and LiteRT (XNNPACK delegate), fp32 and int8, beside
onnxruntime fp32 and OpenVINO fp32, interleaved in one run per variant.

    python benchmarks/mobile_bench.py [--variants B0,B1] [--threads 2] [--duration-s 8]
                                      [--calibration-size 32] [--forms] [--out benchmarks/results]

Per variant (seeded random weights, 224x224, batch 1): exports with `mixformer_deploy.export_api.export`
(int8 calibrated on deterministic crops of the bundled photos: the seeded weights have no data set) and
times every subject through `mixformer_deploy.bench.benchmark_subjects` (each in its own worker process,
interleaved rounds, FLOP floor measured in the same run). `--forms` adds ExecuTorch and LiteRT fp32 of the
deploy form as is (`graph_form=deploy`), to measure what the XNNPACK form buys. Also records each
export's time, ExecuTorch's delegation report, and the relative L2 of every artifact to PyTorch fp32 on
the photos. x86 timings are a proxy for phones (XNNPACK picks AVX-512/AVX2 kernels here, NEON there).
Writes results/mobile-<machine-slug>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GOALS = {"fp32_vs_onnxruntime": 1.0, "int8_vs_own_fp32": 1.5}
ORDER = ["onnxruntime fp32", "openvino fp32", "executorch fp32", "executorch int8", "litert fp32", "litert int8",
         "executorch fp32 (deploy form)", "litert fp32 (deploy form)"]


def accuracy_vs_reference(paths: dict, model, h: int, w: int) -> dict:
    import torch

    from mixformer_deploy.data import fixed_batch, photos, run_batched
    from mixformer_deploy.artifact import read_manifest
    from mixformer_deploy.numerics import rel_l2
    from mixformer_deploy.backends import open_runner

    x = photos(h, w)[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = {}
    for name, p in paths.items():
        runner = open_runner(p, threads=2)
        out[name] = rel_l2(run_batched(runner, x, fixed_batch(read_manifest(p))), ref)
        runner.close()
    return out


def run_variant(variant: str, args, rows_md: list[str]) -> dict:
    from mixformer_deploy.bench import Policy, artifact_subject, benchmark_subjects
    from mixformer_deploy.source import load_source
    from openvino_bench import calibration_folder  # noqa: E402  (benchmarks/ is on sys.path)

    from mixformer_deploy.export_api import export
    from mixformer_deploy.backends import keys

    h = w = args.size
    work = args.work / variant.lower()
    work.mkdir(parents=True, exist_ok=True)
    cal = calibration_folder(args.work / "calibration", args.calibration_size, h)
    timings, manifests = {}, {}

    def timed(label, **kw):
        t0 = time.perf_counter()
        # the deploy-form rows have the same artifact names as the XNNPACK-form ones: a folder of their own
        out = work / "deploy-form" if "(deploy form)" in label else work
        r = export(None, variant=variant, img_size=h, batch=1, output=out, check=False, **kw)
        timings[label] = round(time.perf_counter() - t0, 1)
        manifests[label] = r.manifest
        print(f"{variant} {label}: exported in {timings[label]:.0f} s", flush=True)
        return r.path

    int8 = dict(precision="int8", calibration=cal, calibration_size=args.calibration_size)
    plan = [("onnxruntime fp32", dict(target="onnx"))]
    if "openvino" in keys():
        plan.append(("openvino fp32", dict(target="openvino")))
    plan += [("executorch fp32", dict(target="executorch")), ("executorch int8", dict(target="executorch", **int8)),
             ("litert fp32", dict(target="litert")), ("litert int8", dict(target="litert", **int8))]
    if args.forms:
        plan += [("executorch fp32 (deploy form)", dict(target="executorch", target_options={"graph_form": "deploy"})),
                 ("litert fp32 (deploy form)", dict(target="litert", target_options={"graph_form": "deploy"}))]
    paths, failed = {}, {}
    for label, kw in plan:
        try:
            paths[label] = timed(label, **kw)
        except Exception as e:  # a route that fails is a result too
            failed[label] = f"{type(e).__name__}: {e}"[:300]
            print(f"{variant} {label}: FAILED {failed[label]}", flush=True)
    options = {"openvino fp32": {"precision": "fp32"}}
    subjects = [replace(artifact_subject(p, threads=args.threads, options=options.get(name)), name=name)
                for name, p in paths.items()]
    policy = Policy(warmup_s=2.0, duration_s=args.duration_s, min_iters=30)
    doc = benchmark_subjects(subjects, [1], policy, progress=None)
    p50 = {r["artifact"]: r["latency_ms"]["p50"] for r in doc["results"]}

    def ratio(a, b):
        return p50[a] / p50[b] if a in p50 and b in p50 else None

    ratios = {"executorch_fp32_vs_onnxruntime": ratio("onnxruntime fp32", "executorch fp32"),
              "litert_fp32_vs_onnxruntime": ratio("onnxruntime fp32", "litert fp32"),
              "executorch_int8_vs_fp32": ratio("executorch fp32", "executorch int8"),
              "litert_int8_vs_fp32": ratio("litert fp32", "litert int8"),
              "executorch_xnnpack_form_vs_deploy_form": ratio("executorch fp32 (deploy form)", "executorch fp32"),
              "litert_xnnpack_form_vs_deploy_form": ratio("litert fp32 (deploy form)", "litert fp32")}
    source = load_source(None, variant)
    doc["mobile"] = {
        "variant": variant, "p50_ms": p50, "ratios": ratios, "goals": GOALS, "export_seconds": timings,
        "failed_exports": failed,
        "delegation": {k: m.get("delegation") for k, m in manifests.items() if m.get("delegation")},
        "rel_l2_vs_pytorch_on_photos": accuracy_vs_reference(paths, source.model, h, w),
    }
    rows_md.append(f"| {variant} | " + " | ".join(f"{p50[n]:.1f}" if n in p50 else "–" for n in ORDER) + " | "
                   + " | ".join(f"{v:.2f}x" if v else "–" for v in ratios.values()) + " |")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="B0,B1")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=8.0)
    ap.add_argument("--calibration-size", type=int, default=32)
    ap.add_argument("--forms", action="store_true", help="also time the deploy form as is (graph_form=deploy)")
    ap.add_argument("--note", action="append", default=[], help="a note recorded with the results")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=Path("artifacts/mobile-bench"))
    args = ap.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from mixformer_deploy.artifact import write_json_atomic

    rows_md: list[str] = []
    docs = [run_variant(v.strip().upper(), args, rows_md) for v in args.variants.split(",")]
    env = docs[0]["environment"]
    slug = docs[0]["machine"]["slug"]
    result = {"schema": "mixformer-deploy/mobile-bench/1", "machine": docs[0]["machine"],
              "cpu": env.get("cpu_model"), "notes": args.note, "runs": docs}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"mobile-{slug}.json", result)
    ratio_names = ["ET fp32 vs ORT", "LiteRT fp32 vs ORT", "ET int8 vs fp32", "LiteRT int8 vs fp32",
                   "ET XNNPACK form vs deploy form", "LiteRT XNNPACK form vs deploy form"]
    lines = [f"# Mobile runtimes on this CPU ({args.size}x{args.size}, batch 1, {args.threads} threads, seeded weights)",
             "", f"Machine: `{slug}` ({env.get('cpu_model')}). One interleaved run per variant; p50 ms "
             "(ratios: speed-ups, > 1 is faster). x86 XNNPACK timings are a proxy for phones.",
             *(f"Note: {n}" for n in args.note), "",
             "| variant | " + " | ".join(ORDER) + " | " + " | ".join(ratio_names) + " |",
             "|---|" + "---|" * (len(ORDER) + len(ratio_names)), *rows_md, "",
             f"Goals: ExecuTorch and LiteRT fp32 no slower than onnxruntime fp32; int8 >= "
             f"{GOALS['int8_vs_own_fp32']}x its own fp32.", ""]
    for d in docs:
        m = d["mobile"]
        lines += [f"## {m['variant']}", "", "Export seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in m["export_seconds"].items()), ""]
        if m["failed_exports"]:
            lines += ["Failed exports: " + "; ".join(f"{k}: {v}" for k, v in m["failed_exports"].items()), ""]
        for k, dl in m["delegation"].items():
            lines.append(f"- {k}: {dl['delegated_ops']} ops in {dl['subgraphs']} XNNPACK subgraph(s), "
                         f"{dl['non_delegated_ops']} off the delegate {dl['non_delegated'] or ''}")
        lines += ["", "Relative L2 vs PyTorch fp32 on the photos: " + ", ".join(
            f"{k} {v:.2g}" for k, v in m["rel_l2_vs_pytorch_on_photos"].items()), ""]
    from mixformer_deploy.reports.markdown import bench_markdown
    lines += ["## Full results", "", bench_markdown(docs)]
    (args.out / f"mobile-{slug}.md").write_text("\n".join(lines) + "\n")
    print(args.out / f"mobile-{slug}.md")


if __name__ == "__main__":
    main()
