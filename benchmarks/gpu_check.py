"""One bounded check on a GPU machine: parity of every GPU path, then latency that means something.

Runs with Python, torch (CUDA), numpy, onnx, onnxruntime, typer, rich and matplotlib only, plus this
repository on PYTHONPATH (no pip install). Called by gpu_check.sh, which caps it at 5 minutes.

    python benchmarks/gpu_check.py DIR [--device cuda|cpu] [--budget-s 270] [--dry-run] [--with-aoti]

CUDA (in this order, each step only if the time budget still allows it; what was cut is listed under
``skipped`` in the JSON):
 1. parity, seeded B1 at 224 (8 random inputs): the torch deploy form fp32/fp16 against the reference fp32;
 2. parity of the shipped weights on the held-out digits (32x32) through each GPU path: torch reference
    fp32, deploy form fp32/fp16, deploy form replayed from CUDA graphs fp32/fp16, and AOTInductor
    fp16 (+ fp32 if time allows), each against the CPU float32 reference, with accuracy on the labels;
 3. the fp16 (and float32, TF32 off) matrix-multiply rate of this GPU: the roofline;
 4. latency of B1 (seeded) at 224, batch 1, 32 and 128, fp32 and fp16: eager PyTorch of the reference
    (the naive path), the deploy form from CUDA graphs, and AOTInductor (one dynamic-batch package per
    precision, replayed from CUDA graphs per batch size); wall time and GPU time (CUDA events), images/s,
    and the fraction of the fp16 matmul roofline (2 x MACs x batch / GPU time / fp16 matmul rate);
 5. the bench/1 document of the torch runtime (reference and deploy form, no graphs) at the same batches,
    for `mixformer-deploy report`.
Each AOTInductor CUDA compile costs ~40-90 s; the matrix above (3 compiles, the 4th only with time left)
is what fits 5 minutes on an H100/H200.

--device cpu: the same steps on the CPU with small batches and short timings (no CUDA graphs; the roofline
is the float32 matmul rate); AOTInductor only with --with-aoti (a CPU compile takes minutes on 2 cores).
--dry-run: import everything, print the plan as JSON, write nothing.

Writes into DIR (at most 5 files): gpu_check.json (everything: the one JSON for `report`), gpu_check.log,
bench-<machine>.json (bench/1), bench-<machine>.md and bench-<machine>.png.
Exit status 0 when every parity check passed and nothing failed, else 1 (3: no CUDA).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_check")
SCHEMA = "mixformer-deploy/gpu-check/2"
SIZE = (224, 224)
PARITY_INPUTS = 8
VARIANT = "B1"

MATRIX = {
    "cuda": {"variants": [VARIANT], "batches": [1, 32, 128], "precisions": ["fp32", "fp16"],
             "aoti_compile_s": 90, "latency": {"warmup": 10, "min_iters": 20, "seconds": 0.6},
             "policy": {"warmup_s": 0.3, "duration_s": 1.0, "min_iters": 10},
             "cut": ["B4 (the earlier check's second variant): each AOTInductor CUDA compile costs ~60 s",
                     "AOTInductor fixed-batch packages: one dynamic-batch package per precision, CUDA graphs "
                     "captured per batch size instead",
                     "AOTInductor fp32 on the held-out digits: only when time is left after everything else"]},
    "cpu": {"variants": [VARIANT], "batches": [1, 2], "precisions": ["fp32"],
            "aoti_compile_s": 150, "latency": {"warmup": 2, "min_iters": 3, "seconds": 0.3},
            "policy": {"warmup_s": 0.1, "duration_s": 0.5, "min_iters": 3}, "cut": []},
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


def setup_logging(out: Path | None) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handlers = [logging.StreamHandler(sys.stderr)]
    if out is not None:
        handlers.append(logging.FileHandler(out / "gpu_check.log", mode="w"))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)


def tolerance(precision: str, target: str = "onnx"):
    """A target's tolerances for this precision: the same numbers a deployed artifact must meet."""
    from mixformer_deploy.targets import get_target
    return get_target(target).tolerance(precision)


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- paths: each turns NCHW float32 -> logits

class Path_:
    """One way to run a model on the device: eager reference, eager deploy form, deploy form from CUDA
    graphs, or an AOTInductor package. ``__call__`` takes and returns torch tensors on the device."""

    def __init__(self, name: str, precision: str, fn, device: str, close=None):
        self.name, self.precision, self.fn, self.device, self._close = name, precision, fn, device, close

    def __call__(self, x):
        return self.fn(x)

    def close(self) -> None:
        if self._close:
            self._close()


def torch_paths(model, h: int, w: int, device: str, precisions: list[str], graphs: bool) -> list[Path_]:
    """Eager reference, eager deploy form and (CUDA) the deploy form from CUDA graphs, per precision."""
    import copy

    import torch

    from mixformer_deploy.deploy import to_deploy
    from mixformer_deploy.runtimes.cuda_graphs import CudaGraphed

    dev = torch.device(device)
    out = []
    for p in precisions:
        dtype = torch.float16 if p == "fp16" else torch.float32
        ref = copy.deepcopy(model).to(dev, dtype).eval()
        dep = to_deploy(model, (h, w)).to(dev, dtype).eval()
        out.append(Path_("torch reference (eager)", p, lambda x, m=ref, d=dtype: m(x.to(d)).float(), device))
        out.append(Path_("torch deploy form (eager)", p, lambda x, m=dep, d=dtype: m(x.to(d)).float(), device))
        if graphs and dev.type == "cuda":
            g = CudaGraphed(lambda x, m=dep, d=dtype: m(x.to(d)).float(), dev)
            out.append(Path_("torch deploy form (CUDA graphs)", p, g, device))
    return out


def aoti_path(package: Path, device: str, precision: str) -> Path_:
    from mixformer_deploy.runtimes.aoti_runner import AotiRunner

    graphs = "on" if device.startswith("cuda") else "off"
    runner = AotiRunner.load(package, device=device, options={"cuda_graphs": graphs})
    name = "aoti (CUDA graphs)" if runner.cuda_graphs else "aoti"

    def fn(x):
        return runner.run_tensor(x.contiguous()).float()   # device tensors in and out: no host copies timed
    return Path_(name, precision, fn, runner.device, runner.close)


def compile_aoti(weights, variant: str | None, size: int, precision: str, device: str, max_batch: int,
                 work: Path, check: bool) -> dict:
    """An AOTInductor package through the product's export (dynamic batch up to max_batch)."""
    from mixformer_deploy.export_api import export

    t0 = time.perf_counter()
    r = export(weights, target="aoti", variant=variant, img_size=size, batch="dynamic", precision=precision,
               output=work, check=check, target_options={"device": "cuda" if device.startswith("cuda") else "cpu",
                                                         "max_batch": max_batch})
    return {"path": str(r.path), "passed": r.passed, "parity": r.manifest.get("parity"),
            "compile": r.manifest.get("compile"), "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- steps

def parity_random(variant: str, precisions: list[str], device: str) -> list[dict]:
    """The torch deploy form at each precision against the reference form in float32, on the device."""
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
        row = {"variant": variant, "precision": precision, "device": device, "path": "torch deploy form (eager)",
               "inputs": f"{PARITY_INPUTS} seeded random",
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


def shipped_digits():
    """The shipped weights (reference, CPU float32) and the held-out digits at their training size."""
    from mixformer_deploy.data import heldout_digits
    from mixformer_deploy.source import load_source

    source = load_source(None)
    h, w = source.input_size or (32, 32)
    x, _, labels = heldout_digits(h, w, source.preprocessing)
    return source, x, labels, (h, w)


def parity_paths(paths: list[Path_], x, labels, reference, what: str, target: str = "onnx") -> list[dict]:
    """Each path's logits on ``x`` against the CPU float32 reference, in chunks of 64, with accuracy."""
    import numpy as np
    import torch

    from mixformer_deploy.parity import compare_outputs

    rows = []
    for p in paths:
        t0 = time.perf_counter()
        chunks = []
        with torch.no_grad():
            for i in range(0, len(x), 64):
                xb = torch.from_numpy(np.ascontiguousarray(x[i:i + 64])).to(p.device)
                chunks.append(p(xb).float().cpu().numpy().copy())
        logits = np.concatenate(chunks)
        tol = tolerance(p.precision, target if "aoti" in p.name else "onnx")
        m = compare_outputs(logits, reference, tol, labels=labels)
        acc, ref_acc = float((logits.argmax(1) == labels).mean()), float((reference.argmax(1) == labels).mean())
        row = {"what": what, "path": p.name, "precision": p.precision, "device": p.device, "inputs": len(x),
               "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "min_cosine": tol.min_cosine},
               "passed": bool(m.passed) and acc >= ref_acc - 2 / len(x), "failures": m.failures(tol),
               "accuracy": acc, "reference_accuracy": ref_acc, "metrics": m.to_dict(),
               "seconds": round(time.perf_counter() - t0, 2)}
        log.info("digits parity %-32s %s: %s (max|a-r| %.3g, accuracy %.4f vs %.4f)", p.name, p.precision,
                 "pass" if row["passed"] else "FAIL " + "; ".join(row["failures"]), m.max_abs, acc, ref_acc)
        rows.append(row)
    return rows


def matmul_rates(device: str) -> dict:
    """Best-of-10 n x n matmul rate: fp16 (the roofline of fp16 inference) and float32 with TF32 off."""
    import torch

    dev = torch.device(device)
    out = {}
    for name, dtype, n in (("fp16", torch.float16, 8192 if dev.type == "cuda" else 1024),
                           ("fp32", torch.float32, 8192 if dev.type == "cuda" else 1024)):
        if dev.type != "cuda" and dtype == torch.float16:
            continue
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            gen = torch.Generator().manual_seed(0)
            a, b = (torch.randn(n, n, generator=gen).to(dev, dtype) for _ in range(2))
            c = torch.mm(a, b)
            _sync(device)
            best = float("inf")
            for _ in range(10):
                t0 = time.perf_counter_ns()
                torch.mm(a, b, out=c)
                _sync(device)
                best = min(best, time.perf_counter_ns() - t0)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out[name] = {"tflops": 2 * n ** 3 / best / 1e3, "n": n, "dtype": str(dtype).replace("torch.", "")}
        log.info("matmul %s %dx%d: %.3f TFLOP/s", name, n, n, out[name]["tflops"])
    return out


def time_path(p: Path_, batch: int, h: int, w: int, spec: dict) -> dict:
    """Warm-up, then at least ``min_iters`` and ``seconds`` of timed calls: wall (perf_counter + sync) and
    GPU time (CUDA events around each call)."""
    import numpy as np
    import torch

    from mixformer_deploy.bench import latency_stats

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, h, w, generator=gen).to(p.device)
    cuda = p.device.startswith("cuda")
    with torch.no_grad():
        t0 = time.perf_counter_ns()
        p(x)
        _sync(p.device)
        first_ms = (time.perf_counter_ns() - t0) / 1e6
        for _ in range(spec["warmup"]):
            p(x)
        _sync(p.device)
        wall, gpu = [], []
        end_at = time.perf_counter() + spec["seconds"]
        while len(wall) < spec["min_iters"] or time.perf_counter() < end_at:
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            t0 = time.perf_counter_ns()
            p(x)
            if cuda:
                e1.record()
            _sync(p.device)
            wall.append((time.perf_counter_ns() - t0) / 1e6)
            if cuda:
                gpu.append(e0.elapsed_time(e1))
            if len(wall) >= 2000:
                break
    ws = latency_stats(wall)
    row = {"path": p.name, "precision": p.precision, "batch": batch, "iterations": len(wall),
           "first_call_ms": first_ms, "wall_ms": ws, "images_per_s": batch * 1000.0 / ws["p50"]}
    if gpu:
        gs = latency_stats(gpu)
        row["gpu_ms"] = gs
        row["images_per_s_gpu"] = batch * 1000.0 / gs["p50"]
    row["_median_ms"] = float(np.median(gpu or wall))
    return row


def latency(paths: list[Path_], batches: list[int], h: int, w: int, spec: dict, macs: int, rates: dict,
            budget: Budget, report: dict) -> list[dict]:
    rows = []
    roof = (rates.get("fp16") or rates.get("fp32") or {}).get("tflops")
    for batch in batches:
        for p in paths:
            if not budget.allows(5):
                report["skipped"].append(f"latency {p.name} {p.precision} batch {batch}: time budget")
                continue
            try:
                row = time_path(p, batch, h, w, spec)
            except Exception as e:  # noqa: BLE001 - one path failing (e.g. out of memory) is recorded
                report["errors"].append({"step": f"latency {p.name} {p.precision} b{batch}",
                                         "error": f"{type(e).__name__}: {e}"[:500]})
                log.error("latency %s %s batch %d: %s", p.name, p.precision, batch, e)
                continue
            t_s = row.pop("_median_ms") / 1e3
            row["achieved_tflops"] = 2 * macs * batch / t_s / 1e12
            row["roofline"] = "fp16 matmul" if rates.get("fp16") else "fp32 matmul"
            row["roofline_fraction"] = row["achieved_tflops"] / roof if roof else None
            log.info("latency %-32s %s b%-4d wall p50 %.3f ms%s, %.0f img/s, %.1f%% of the %s roofline",
                     p.name, p.precision, batch, row["wall_ms"]["p50"],
                     f", GPU p50 {row['gpu_ms']['p50']:.3f} ms" if "gpu_ms" in row else "",
                     row.get("images_per_s_gpu", row["images_per_s"]), 100 * (row["roofline_fraction"] or 0),
                     row["roofline"])
            rows.append(row)
    return rows


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
    """Run one step; a failure is recorded and logged, and the check goes on with the next step. A backend
    that is missing (no C++ compiler for AOTInductor, say) is a skip with its reason, not a failure."""
    from mixformer_deploy.errors import MissingBackendError
    try:
        return fn(*args)
    except MissingBackendError as e:
        log.warning("%s skipped: %s", name, e)
        report["skipped"].append(f"{name}: {e}")
        return None
    except Exception as e:  # noqa: BLE001
        log.error("%s failed: %s: %s", name, type(e).__name__, e)
        report["errors"].append({"step": name, "error": f"{type(e).__name__}: {e}"[:2000],
                                 "traceback": traceback.format_exc(limit=8)})
        return None


def plan(kind: str, with_aoti: bool) -> list[dict]:
    """The steps in order with their time estimates (s) on an H100/H200 (cuda) or this 2-core CPU (cpu)."""
    m = MATRIX[kind]
    c = m["aoti_compile_s"]
    aoti = kind == "cuda" or with_aoti
    steps = [{"step": "parity random B1 (torch deploy form)", "estimate_s": 15},
             {"step": "parity held-out digits (torch paths)", "estimate_s": 15},
             {"step": "matmul roofline", "estimate_s": 5}]
    if aoti:
        steps += [{"step": "aoti compile B1 fp16 (dynamic batch)" if kind == "cuda" else "aoti compile B1 fp32",
                   "estimate_s": c},
                  {"step": "aoti compile shipped digits fp16 + parity" if kind == "cuda" else
                   "aoti compile shipped digits fp32 + parity", "estimate_s": c * 0.6}]
        if kind == "cuda":
            steps.append({"step": "aoti compile B1 fp32 (dynamic batch)", "estimate_s": c})
    n_paths = 3 if aoti else 2
    per = m["latency"]["seconds"] + 1.0
    steps.append({"step": "latency B1", "estimate_s": round(per * n_paths * len(m["precisions"]) * len(m["batches"]))})
    steps.append({"step": "bench/1 document (torch runtime)", "estimate_s": 45 if kind == "cuda" else 30})
    if kind == "cuda":
        steps.append({"step": "aoti compile shipped digits fp32 + parity (only with time left)", "estimate_s": c * 0.6})
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="output directory (created)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a reduced rehearsal)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new steps after this (s)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable)")
    ap.add_argument("--with-aoti", action="store_true", help="cpu: also compile AOTInductor packages (slow)")
    ap.add_argument("--dry-run", action="store_true", help="import everything, print the plan, write nothing")
    args = ap.parse_args(argv)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    matrix = MATRIX[kind]
    steps = plan(kind, args.with_aoti)

    import torch

    from mixformer_deploy import __version__
    from mixformer_deploy.bench import macs_per_image  # noqa: F401 - a dry run proves the imports
    from mixformer_deploy.reports.bench_json import environment
    from mixformer_deploy.runtimes.aoti_runner import AotiRunner  # noqa: F401
    from mixformer_deploy.targets.aoti import can_compile

    if args.dry_run:
        print(json.dumps({"device": args.device, "matrix": matrix, "plan": steps,
                          "estimate_s": sum(s["estimate_s"] for s in steps), "budget_s": args.budget_s,
                          "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                          "aoti_can_compile": can_compile() or "yes"}, indent=2))
        return 0

    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    budget = Budget(args.budget_s)
    if kind == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device visible to torch %s (use --device cpu for a rehearsal)", torch.__version__)
        return 3
    if kind == "cuda":  # fp32 means IEEE float32 on every path (the torch runtime does the same)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"schema": SCHEMA, "device": args.device, "matrix": matrix, "plan": steps, "tool_version": __version__,
              "environment": environment(args.device, args.threads), "parity": [], "digits_parity": [],
              "aoti_packages": {}, "matmul": None, "latency": [], "bench_runs": 0, "skipped": list(matrix["cut"]),
              "errors": [], "elapsed_s": None, "passed": None}
    log.info("gpu check on %s: %s", args.device, json.dumps(report["environment"].get("gpu") or
                                                              report["environment"]["cpu_model"]))
    docs: list[dict] = []
    aoti = kind == "cuda" or args.with_aoti
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))   # packages live outside DIR (at most 5 files there)

    def save():
        write_outputs(out, {**report, "elapsed_s": round(budget.elapsed, 1)}, docs)

    # 1. parity of the torch deploy form, seeded B1
    report["parity"] += step(report, "parity random", parity_random, VARIANT, matrix["precisions"], args.device) or []
    save()

    # 2. held-out digits through the torch paths (CPU float32 reference)
    digits = step(report, "load shipped weights", shipped_digits)
    ref_logits = None
    if digits:
        source, x_digits, labels, (dh, dw) = digits
        with torch.no_grad():
            ref_logits = source.model.float().eval()(torch.from_numpy(x_digits)).numpy()
        paths = step(report, "digits torch paths", torch_paths, source.model, dh, dw, args.device,
                     matrix["precisions"], True) or []
        report["digits_parity"] += step(report, "digits parity (torch)", parity_paths, paths, x_digits, labels,
                                        ref_logits, "shipped weights, held-out digits") or []
        for p in paths:
            p.close()
        save()

    # 3. roofline
    rates = step(report, "matmul roofline", matmul_rates, args.device) or {}
    report["matmul"] = rates

    # 4. AOTInductor packages: B1 latency packages first, then the shipped weights' digits package
    aoti_prec = ["fp16", "fp32"] if kind == "cuda" else ["fp32"]
    max_b = max(matrix["batches"])
    b1_packages: dict[str, str] = {}

    def digits_aoti(precision: str) -> None:
        r = step(report, f"aoti digits {precision}", compile_aoti, None, None, None, precision, args.device, 64,
                 work, True)
        if not r:
            return
        report["aoti_packages"][f"digits-{precision}"] = r
        if ref_logits is not None:
            p = step(report, f"aoti digits {precision} load", aoti_path, Path(r["path"]), args.device, precision)
            if p:
                report["digits_parity"] += step(report, f"digits parity aoti {precision}", parity_paths, [p],
                                                x_digits, labels, ref_logits, "shipped weights, held-out digits",
                                                "aoti") or []
                p.close()
        save()

    if not aoti:
        report["skipped"].append("AOTInductor: not asked (--with-aoti) on the CPU")
    elif (why := can_compile()) is not None:
        report["skipped"].append(f"AOTInductor: {why}")
        aoti = False
    if aoti:
        first = aoti_prec[0]
        if budget.allows(matrix["aoti_compile_s"] + 60):
            r = step(report, f"aoti compile B1 {first}", compile_aoti, None, VARIANT, SIZE[0], first, args.device,
                     max_b, work, False)
            if r:
                report["aoti_packages"][f"B1-{first}"] = r
                b1_packages[first] = r["path"]
            save()
        else:
            report["skipped"].append(f"aoti compile B1 {first}: time budget")
        if budget.allows(matrix["aoti_compile_s"] * 0.6 + 60):
            digits_aoti(first)
        else:
            report["skipped"].append(f"aoti digits {first}: time budget")
        for p in aoti_prec[1:]:
            if budget.allows(matrix["aoti_compile_s"] + 60):
                r = step(report, f"aoti compile B1 {p}", compile_aoti, None, VARIANT, SIZE[0], p, args.device,
                         max_b, work, False)
                if r:
                    report["aoti_packages"][f"B1-{p}"] = r
                    b1_packages[p] = r["path"]
                save()
            else:
                report["skipped"].append(f"aoti compile B1 {p}: time budget")

    # 5. latency of B1: eager reference, deploy form from CUDA graphs, AOTInductor
    from mixformer_deploy import create_model
    from mixformer_deploy.bench import macs_per_image as macs_of

    b1 = create_model(VARIANT, seed=0)
    macs = macs_of({"variant": VARIANT, "input_size": list(SIZE), "num_classes": 1000})
    report["macs_per_image"] = macs
    for precision in matrix["precisions"]:
        paths = [p for p in (step(report, "B1 torch paths", torch_paths, b1, *SIZE, args.device, [precision],
                                  kind == "cuda") or [])
                 if p.name != "torch deploy form (eager)" or kind == "cpu"]
        if precision in b1_packages:
            p = step(report, f"aoti B1 {precision} load", aoti_path, Path(b1_packages[precision]), args.device,
                     precision)
            if p:
                paths.append(p)
        report["latency"] += latency(paths, matrix["batches"], *SIZE, matrix["latency"], macs, rates, budget, report)
        for p in paths:
            p.close()
        if kind == "cuda":
            torch.cuda.empty_cache()
        save()

    # 6. the bench/1 document of the torch runtime, for `report`
    if budget.allows(45 if kind == "cuda" else 30):
        doc = step(report, f"bench {VARIANT}", bench_variant, VARIANT, matrix, args.device, args.threads)
        if doc:
            docs.append(doc)
            report["bench_runs"] = len(docs)
        save()
    else:
        report["skipped"].append(f"bench {VARIANT} (bench/1 document): time budget")

    # 7. with time left: the remaining AOTInductor precision on the digits
    if aoti:
        for p in aoti_prec[1:]:
            if budget.allows(matrix["aoti_compile_s"] * 0.6 + 10):
                digits_aoti(p)
            else:
                report["skipped"].append(f"aoti digits {p}: time budget")

    checks = report["parity"] + report["digits_parity"]
    report["passed"] = bool(checks) and all(p["passed"] for p in checks) and not report["errors"]
    report["summary"] = summarize(report)
    report["elapsed_s"] = round(budget.elapsed, 1)
    write_outputs(out, report, docs)
    log.info("done in %.0f s: %s; files in %s", budget.elapsed, "PASSED" if report["passed"] else "FAILED", out)
    return 0 if report["passed"] else 1


def summarize(report: dict) -> dict:
    """The headline numbers: images/s at each batch per path and precision, against the naive path
    (eager PyTorch fp32 of the reference), and the best roofline fraction."""
    rows = report["latency"]
    ips = {f"{r['path']} {r['precision']} b{r['batch']}": r.get("images_per_s_gpu", r["images_per_s"]) for r in rows}
    naive = {r["batch"]: r.get("images_per_s_gpu", r["images_per_s"]) for r in rows
             if r["path"] == "torch reference (eager)" and r["precision"] == "fp32"}
    speedup = {k: v / naive[int(k.rsplit("b", 1)[1])] for k, v in ips.items() if int(k.rsplit("b", 1)[1]) in naive}
    best = max(rows, key=lambda r: r.get("roofline_fraction") or 0, default=None)
    return {"images_per_s": ips, "vs_naive_eager_fp32": speedup,
            "best_roofline_fraction": best and {"path": best["path"], "precision": best["precision"],
                                                "batch": best["batch"], "fraction": best["roofline_fraction"]}}


if __name__ == "__main__":
    sys.exit(main())
