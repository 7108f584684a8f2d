"""AOTInductor .pt2 on this CPU beside onnxruntime and OpenVINO, interleaved in one run, with compile costs.

    python benchmarks/aoti_bench.py [--variant B1] [--size 224] [--threads 2] [--duration-s 20]
                                    [--out benchmarks/results] [--work artifacts/aoti-bench]

B1 (seeded random weights), 224x224, batch 1: the deploy form exported as an AOTInductor package in fp32
(and bf16 where the CPU has native bf16), as ONNX (onnxruntime), and as OpenVINO f32 (when the openvino
target is built), plus PyTorch eager of the reference. Each export runs in its own process with a cold
inductor cache, timed, with the peak resident memory of its whole process tree (Python and the C++
compiler) sampled every 50 ms. Every artifact is parity-checked, then all are timed interleaved by
mixformer_deploy.bench.benchmark (one worker process each). Writes results/aoti-<machine-slug>.json
(a bench/1 document with an `aoti` section) and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

EXPORT_ONE = """
import json, sys, logging
logging.basicConfig(level=logging.WARNING)
from mixformer_deploy.export_api import export
spec = json.loads(sys.argv[1])
r = export(None, target=spec["target"], variant=spec["variant"], img_size=spec["size"], batch=1,
           precision=spec["precision"], output=spec["work"], check=False)
print(json.dumps({"path": str(r.path), "compile": r.manifest.get("compile"), "size_bytes": r.manifest.get("size_bytes")}))
"""


def timed_export(spec: dict, env: dict) -> dict:
    """One export in a child process: wall time and the peak summed RSS of its process tree."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_ONE, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak, top = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
            rss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)   # the child and the compilers it waited for
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"export {spec} failed (exit {proc.returncode}): {err.strip().splitlines()[-1:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_tree_rss_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B1")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "aoti-bench")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--note", action="append", default=[], help="a note recorded with the results")
    ap.add_argument("--reuse", action="store_true", help="reuse exports recorded in WORK/exports.json")
    args = ap.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from mixformer_deploy.backends import keys as backend_keys
    from mixformer_deploy.artifact import write_json_atomic
    from mixformer_deploy.bench import Policy, benchmark
    from mixformer_deploy.parity import check_parity
    from mixformer_deploy.reports.markdown import bench_markdown
    from mixformer_deploy.backends.aoti.spec import cpu_has_bf16

    args.work.mkdir(parents=True, exist_ok=True)
    specs = [("aoti", "fp32")] + ([("aoti", "bf16")] if cpu_has_bf16() else []) + [("onnx", "fp32")]
    if "openvino" in backend_keys() and not args.no_openvino:
        specs.append(("openvino", "fp32"))
    exports, paths = {}, []
    done_file = args.work / "exports.json"
    done = json.loads(done_file.read_text()) if args.reuse and done_file.is_file() else {}
    for target, precision in specs:
        label = f"{target}-{precision}"
        if label in done and Path(done[label]["path"]).exists():
            exports[label] = done[label]
            paths.append(done[label]["path"])
            continue
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache     # a cold compile, as from a fresh clone
            print(f"exporting {label} ...", flush=True)
            e = timed_export({"target": target, "variant": args.variant, "size": args.size,
                              "precision": precision, "work": str(args.work)}, env)
        report = check_parity(Path(e["path"]))
        e["parity"] = report.summary()
        print(f"  {label}: {e['wall_s']} s wall ({e['cpu_s']} s CPU), compile {(e.get('compile') or {}).get('compile_s')} s, "
              f"peak {e['peak_tree_rss_bytes'] / 2**20:.0f} MiB, parity "
              f"{'pass' if report.passed else 'FAIL'} (max|a-r| {e['parity'].get('max_abs'):.3g})", flush=True)
        exports[label] = e
        paths.append(e["path"])
        write_json_atomic(done_file, exports)

    policy = Policy(warmup_s=3.0, duration_s=args.duration_s, min_iters=100)
    doc = benchmark(paths, threads=args.threads, policy=policy, with_reference=True)
    p50 = {r["artifact"]: r["latency_ms"]["p50"] for r in doc["results"]}
    by_label = {label: Path(e["path"]).name for label, e in exports.items()}
    ort = p50[by_label["onnx-fp32"]]
    aoti = p50[by_label["aoti-fp32"]]
    doc["aoti"] = {
        "exports": exports, "p50_ms": {label: p50[name] for label, name in by_label.items()},
        "reference_p50_ms": next((r["latency_ms"]["p50"] for r in doc["results"] if r["role"] == "reference"), None),
        "aoti_fp32_vs_onnxruntime": ort / aoti,
        "goals": {"aoti_fp32_at_least_as_fast_as_onnxruntime": aoti <= ort,
                  "compile_under_90_s": (exports["aoti-fp32"]["compile"] or {}).get("compile_s", 1e9) < 90,
                  "export_cpu_s_under_90_on_2_cores": exports["aoti-fp32"]["cpu_s"] < 90},
        "torch": torch.__version__,
        "notes": [*args.note, "Compile: a cold inductor cache per export (TORCHINDUCTOR_CACHE_DIR fresh), "
                  "OMP_NUM_THREADS set to the benchmark's threads; peak memory is the summed RSS of the "
                  "export's process tree (Python + g++), sampled every 50 ms."],
    }
    slug = doc["machine"]["slug"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"aoti-{slug}.json", doc)
    ref = doc["aoti"]["reference_p50_ms"]
    lines = [f"# AOTInductor .pt2 vs onnxruntime and OpenVINO ({args.variant}, {args.size}x{args.size}, batch 1, "
             f"{args.threads} threads)", "",
             f"Machine: `{slug}`, torch {torch.__version__}. One interleaved run (each artifact in its own worker "
             "process); p50 latency." + "".join(f" {n}" for n in args.note), "",
             "| artifact | runtime | p50 ms | vs onnxruntime | vs eager reference | export+compile s (wall) | "
             "export+compile CPU s | compile s (wall) | peak compile memory MiB | size MiB | parity max abs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, e in exports.items():
        name = by_label[label]
        c = e.get("compile") or {}
        lines.append(f"| {label} | {label.split('-')[0]} | {p50[name]:.2f} | {ort / p50[name]:.2f}x | "
                     f"{(ref / p50[name]) if ref else float('nan'):.2f}x | {e['wall_s']:.0f} | {e['cpu_s']:.0f} | "
                     f"{c.get('compile_s', '-')} | {e['peak_tree_rss_bytes'] / 2**20:.0f} | "
                     f"{(e.get('size_bytes') or 0) / 2**20:.1f} | {e['parity'].get('max_abs', float('nan')):.2g} |")
    if ref:
        lines.append(f"| torch eager reference | torch | {ref:.2f} | {ort / ref:.2f}x | 1.00x | - | - | - | - | - | - |")
    g = doc["aoti"]["goals"]
    lines += ["", f"Goal AOTInductor fp32 at least as fast as onnxruntime: **{'met' if g['aoti_fp32_at_least_as_fast_as_onnxruntime'] else 'not met'}** "
              f"({doc['aoti']['aoti_fp32_vs_onnxruntime']:.2f}x). Goal compile of {args.variant} under 90 s on "
              f"{args.threads} cores: **{'met' if g['compile_under_90_s'] else 'not met'}** in wall time on this shared machine; "
              f"the whole export took {exports['aoti-fp32']['cpu_s']:.0f} CPU seconds (under 90 on 2 cores: "
              f"**{'yes' if g['export_cpu_s_under_90_on_2_cores'] else 'no'}**).", "",
              bench_markdown([doc])]
    (args.out / f"aoti-{slug}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in doc["aoti"].items() if k in ("p50_ms", "reference_p50_ms", "goals",
                                                                  "aoti_fp32_vs_onnxruntime")}, indent=2))
    print(args.out / f"aoti-{slug}.md")


if __name__ == "__main__":
    main()
