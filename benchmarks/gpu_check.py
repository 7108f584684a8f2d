"""One bounded check on a GPU machine: parity of the torch deploy form, then interleaved latency.

Runs with Python, torch (CUDA), numpy, onnx, onnxruntime, typer, rich and matplotlib only, plus this
repository on PYTHONPATH (no pip install). Called by gpu_check.sh, which caps it at 5 minutes.

    python benchmarks/gpu_check.py DIR [--device cuda|cpu] [--budget-s 270]

CUDA: B1 and B4 at 224x224, batch 1 and 32, fp32 and fp16, the reference form and the deploy form, all
on the torch runtime (seeded random weights). --device cpu: B1, batch 1 and 2, fp32, short durations (an
end-to-end rehearsal). Writes into DIR (at most 5 files): gpu_check.json (everything), gpu_check.log,
bench-<machine>.json (a `mixformer-deploy report` input), bench-<machine>.md and bench-<machine>.png.
Exit status 0 when every parity check passed and nothing failed, else 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_check")
SCHEMA = "mixformer-deploy/gpu-check/1"
SIZE = (224, 224)
PARITY_INPUTS = 8

MATRIX = {
    "cuda": {"variants": ["B1", "B4"], "batches": [1, 32], "precisions": ["fp32", "fp16"],
             "policy": {"warmup_s": 0.5, "duration_s": 2.0, "min_iters": 10}},
    "cpu": {"variants": ["B1"], "batches": [1, 2], "precisions": ["fp32"],
            "policy": {"warmup_s": 0.1, "duration_s": 0.5, "min_iters": 3}},
}


class Budget:
    """Wall-clock left for the whole check: a step that would start too late is skipped, not begun."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, needed_s: float) -> bool:
        return self.elapsed + needed_s <= self.seconds


def setup_logging(out: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.FileHandler(out / "gpu_check.log", mode="w"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def tolerance(precision: str):
    """The ONNX target's tolerances for this precision: the same numbers a deployed artifact must meet."""
    from mixformer_deploy.targets import get_target
    return get_target("onnx").tolerance(precision)


def parity(variant: str, precisions: list[str], device: str) -> list[dict]:
    """The deploy form at each precision against the reference form in float32 (the torch runtime turns TF32
    off for fp32 on CUDA), on the device."""
    import torch

    from mixformer_deploy import create_model
    from mixformer_deploy.data import random_inputs
    from mixformer_deploy.parity import compare_outputs
    from mixformer_deploy.runtimes.torch_runner import TorchRunner

    x = random_inputs(PARITY_INPUTS, *SIZE, seed=0)[0]
    reference = TorchRunner(create_model(variant, seed=0), device).run(x)
    out = []
    for precision in precisions:
        t0 = time.perf_counter()
        runner = TorchRunner(create_model(variant, seed=0), device, precision, deploy=True)
        logits = runner.run(x)
        tol = tolerance(precision)
        m = compare_outputs(logits, reference, tol)
        row = {"variant": variant, "precision": precision, "device": device, "inputs": f"{PARITY_INPUTS} seeded random",
               "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "min_cosine": tol.min_cosine},
               "passed": m.passed, "failures": m.failures(tol), "metrics": m.to_dict(),
               "seconds": round(time.perf_counter() - t0, 2)}
        log.info("parity %s %s: %s (max|a-r| %.3g, cosine %.8f, top-1 %.0f%%)", variant, precision,
                 "pass" if m.passed else "FAIL " + "; ".join(row["failures"]), m.max_abs, m.cosine,
                 100 * m.top1_agreement)
        out.append(row)
        runner.close()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def bench_variant(variant: str, matrix: dict, device: str, threads: int | None) -> dict:
    """Reference and deploy form at every precision, interleaved in one run (one worker process each)."""
    from mixformer_deploy.bench import Policy, benchmark_subjects, model_subject

    subjects = [model_subject(variant, input_size=SIZE, precision=p, deploy=deploy, device=device, threads=threads)
                for p in matrix["precisions"] for deploy in (False, True)]
    last = [0.0]

    def progress(fraction: float, text: str) -> None:
        if time.monotonic() - last[0] > 10 or fraction >= 1:
            last[0] = time.monotonic()
            log.info("bench %s: %s %.0f%%", variant, text, 100 * fraction)

    return benchmark_subjects(subjects, matrix["batches"], Policy(**matrix["policy"]), progress=progress)


def write_outputs(out: Path, report: dict, docs: list[dict]) -> None:
    from mixformer_deploy.artifact import write_json_atomic

    write_json_atomic(out / "gpu_check.json", report)
    if not docs:
        return
    from mixformer_deploy.reports.bench_json import merge
    from mixformer_deploy.reports.markdown import bench_markdown

    doc = merge(docs)
    slug = doc["machine"]["slug"]
    write_json_atomic(out / f"bench-{slug}.json", doc)
    plots = {}
    try:
        from mixformer_deploy.reports.plots import labelled_rows, latency_distribution
        latency_distribution(labelled_rows([doc]), out / f"bench-{slug}.png")
        plots = {"Latency distribution": f"bench-{slug}.png"}
    except Exception as e:  # noqa: BLE001 - a plot is optional; the numbers are not
        log.warning("no plot: %s", e)
    (out / f"bench-{slug}.md").write_text(bench_markdown([doc], plots))


def step(report: dict, name: str, fn, *args):
    """Run one step; a failure is recorded and logged, and the check goes on with the next step."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        log.error("%s failed: %s: %s", name, type(e).__name__, e)
        report["errors"].append({"step": name, "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc(limit=8)})
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="output directory (created)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a reduced rehearsal)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new steps after this (s)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable)")
    args = ap.parse_args(argv)
    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    budget = Budget(args.budget_s)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    matrix = MATRIX[kind]

    import torch
    from mixformer_deploy import __version__
    from mixformer_deploy.reports.bench_json import environment

    if kind == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device visible to torch %s (use --device cpu for a rehearsal)", torch.__version__)
        return 3
    report = {"schema": SCHEMA, "device": args.device, "matrix": matrix, "tool_version": __version__,
              "environment": environment(args.device, args.threads), "parity": [], "bench_runs": 0,
              "skipped": [], "errors": [], "elapsed_s": None, "passed": None}
    log.info("gpu check on %s: %s", args.device, json.dumps(report["environment"].get("gpu") or
                                                              report["environment"]["cpu_model"]))
    docs = []
    for variant in matrix["variants"]:
        if budget.allows(30):
            report["parity"] += step(report, f"parity {variant}", parity, variant, matrix["precisions"],
                                     args.device) or []
        else:
            report["skipped"].append(f"parity {variant}: time budget")
        write_outputs(out, {**report, "elapsed_s": round(budget.elapsed, 1)}, docs)
    for variant in matrix["variants"]:
        if not budget.allows(90 if kind == "cuda" else 45):
            report["skipped"].append(f"bench {variant}: time budget")
            log.warning("skipping bench %s: %.0f s of %.0f s used", variant, budget.elapsed, budget.seconds)
            continue
        doc = step(report, f"bench {variant}", bench_variant, variant, matrix, args.device, args.threads)
        if doc:
            docs.append(doc)
            report["bench_runs"] = len(docs)
        write_outputs(out, {**report, "elapsed_s": round(budget.elapsed, 1)}, docs)
    report["passed"] = bool(report["parity"]) and all(p["passed"] for p in report["parity"]) and not report["errors"]
    report["elapsed_s"] = round(budget.elapsed, 1)
    write_outputs(out, report, docs)
    log.info("done in %.0f s: %s; files in %s", budget.elapsed, "PASSED" if report["passed"] else "FAILED", out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
