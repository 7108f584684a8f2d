"""One bounded check on a GPU machine: parity of the shipped weights through every GPU path, then latency
that means something, in one script that finishes within 5 minutes on an H100/H200.

Runs with Python, torch (CUDA), numpy, typer, rich and matplotlib only, plus this repository on
PYTHONPATH (no pip install). Called by gpu_check.sh, which kills it at 300 s; the plan below is sized
for a 270 s budget counted from the start of the process (imports and the CUDA context included).

    python benchmarks/gpu_check.py DIR [--device cuda|cpu] [--budget-s 270] [--dry-run] [--with-aoti]

CUDA, in this order (a step whose estimate no longer fits the budget is skipped and listed under
``skipped``; what the plan leaves out on purpose is under ``cut``, in the JSON and the printed summary):
 1. the verdict: parity of the shipped weights on the 360 held-out digits (32x32) through each GPU path,
    the product's runners as `parity` runs them: the torch runtime (reference form eager fp32, deploy form
    from CUDA graphs fp32 and fp16) and an AOTInductor CUDA package (fp16, from CUDA graphs), each
    against the CPU float32 reference with the target's tolerance and the shared accuracy gate;
 2. the fp16 (and float32, TF32 off) matrix-multiply rate of this GPU: the roofline;
 3. latency of B1 (seeded weights: latency only) at 224, batch 1, 32 and 128: eager PyTorch of the
    reference (the naive path: the torch runtime with CUDA graphs off) and the deploy form from CUDA
    graphs, fp32 and fp16; AOTInductor fp16 (one dynamic-batch package, replayed from CUDA graphs per batch
    size). Wall time and GPU time (CUDA events), images/s, and the fraction of the fp16 matmul roofline
    (2 x MACs x batch / GPU time / fp16 matmul rate).
Not run, by design: onnxruntime's CUDA provider and TensorRT (see NOT_RUN).

--device cpu: a rehearsal of the same code on the CPU (small batches, short timings, fp32, no CUDA graphs;
the roofline is the float32 matmul rate); AOTInductor only with --with-aoti (a CPU compile takes minutes).
--dry-run: import everything, print the plan (steps, estimates, cuts) as JSON, write nothing.

Writes into DIR (5 files): gpu_check.json (schema gpu-check/3: everything, with the verdict), gpu_check.log,
and the latency rows as a bench/1 document for `mixformer-deploy report` (bench-<machine>.json, with
Markdown and a plot beside it). Exit 0 when every parity check ran and passed and nothing failed, 1
otherwise, 3 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

T0 = time.monotonic()  # before torch: the budget counts its import and the CUDA context, as the hard cap does

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_check")
SCHEMA = "mixformer-deploy/gpu-check/3"
VARIANT, SIZE = "B1", (224, 224)
DIGITS_MAX_BATCH, PARITY_CHUNK = 64, 64
WRITE_S = 5  # writing the results, kept in reserve by every step
NOT_RUN = ["onnxruntime CUDA: not run: no onnxruntime-gpu on the GPU machines",
           "TensorRT engine: not run: no TensorRT on the GPU machines"]

MATRIX = {
    "cuda": {"batches": [1, 32, 128], "precisions": ["fp32", "fp16"], "aoti_precision": "fp16",
             "start_s": 15, "aoti_compile_s": 90, "digits_compile_s": 60, "per_row_overhead_s": 0.7,
             "latency": {"warmup_s": 0.2, "warmup_min_iters": 5, "duration_s": 0.6, "min_iters": 20},
             "cut": [
                 "AOTInductor fp32 latency of B1: a second B1 CUDA compile (~90 s) does not fit beside the fp16 "
                 "package and the digits package; fp32 latency is timed through the torch runtime only",
                 "AOTInductor fp32 on the held-out digits (a third compile): the fp32 digits parity runs through "
                 "the torch runtime; AOTInductor is judged at fp16",
                 "AOTInductor fixed-batch packages: one dynamic-batch package (1-128), replayed from CUDA graphs "
                 "per batch size",
                 "B4 (the earlier check's second variant): its own AOTInductor compile",
                 "parity on seeded random B1: random weights judge nothing; seeded B1 is timed, not judged",
                 "the deploy form eager without CUDA graphs (parity and latency): it runs from CUDA graphs, the "
                 "torch runtime's default on CUDA",
                 "the interleaved worker-process bench of the torch runtime (~45 s): the bench/1 document holds "
                 "this check's own timings, taken one row after another in one process"]},
    "cpu": {"batches": [1, 2], "precisions": ["fp32"], "aoti_precision": "fp32",
            "start_s": 10, "aoti_compile_s": 150, "digits_compile_s": 90, "per_row_overhead_s": 1.0,
            "latency": {"warmup_s": 0.1, "warmup_min_iters": 2, "duration_s": 0.3, "min_iters": 3},
            "cut": ["fp16 and CUDA graphs (CUDA only)", "batch 32 and 128 (a rehearsal of the code, not a benchmark)",
                    "AOTInductor unless --with-aoti (a CPU compile takes minutes)"]},
}


@dataclass
class Timed:
    """One latency subject: a runner and what it is (for the rows and the bench/1 document)."""

    name: str
    role: str          # bench/1: reference (eager fp32 of the reference form), model (torch), artifact (a package)
    runtime: str
    form: str
    precision: str
    runner: object
    load_ms: float
    path: str | None = None
    info: dict = field(default_factory=dict)   # the runner's describe(), kept when it is closed
    notes: list = field(default_factory=list)

    def close(self) -> None:
        self.info = self.runner.describe()
        self.runner.close()
        self.runner = None


def torch_subjects(kind: str, precisions: list[str]) -> list[tuple[str, str, str, bool]]:
    """(name, form, precision, cuda_graphs) of the torch runtime's latency rows: the naive path (eager, no
    graphs; the torch runtime replays graphs by default, so they are turned off) and the deploy form."""
    cuda = kind == "cuda"
    out = []
    for p in precisions:
        out.append((f"{VARIANT} torch reference eager {p}", "reference", p, False))
        out.append((f"{VARIANT} torch deploy {'CUDA graphs ' if cuda else ''}{p}", "deploy", p, cuda))
    return out


def digits_subjects(kind: str, precisions: list[str]) -> list[tuple[str, str, str, bool]]:
    """(path name, form, precision, cuda_graphs) of the torch runtime's held-out digits parity rows."""
    if kind != "cuda":
        return [("torch deploy form", "deploy", "fp32", False)]
    return [("torch reference eager", "reference", "fp32", False)] + [
        ("torch deploy form (CUDA graphs)", "deploy", p, True) for p in precisions]


def plan(kind: str, with_aoti: bool) -> list[dict]:
    """The steps in order, with estimates (s) for an H100/H200 (cuda) or a 2-core CPU (cpu). main() runs
    exactly these steps; a dry run prints them."""
    m = MATRIX[kind]
    aoti = kind == "cuda" or with_aoti
    batches = m["batches"]
    lat = m["latency"]
    per_row = lat["warmup_s"] + lat["duration_s"] + m["per_row_overhead_s"]
    torch_rows = torch_subjects(kind, m["precisions"])
    digits = digits_subjects(kind, m["precisions"])
    ap, mb = m["aoti_precision"], max(batches)
    steps = [
        {"id": "start", "what": "imports, CUDA context", "estimate_s": m["start_s"]},
        {"id": "digits", "what": "shipped weights, held-out digits, CPU float32 reference logits", "estimate_s": 5},
        {"id": "digits_torch", "what": "held-out digits parity: " + ", ".join(f"{n} {p}" for n, _, p, _ in digits),
         "estimate_s": 5 * len(digits)},
        {"id": "roofline", "what": "matmul rate: fp16 and fp32 (TF32 off)" if kind == "cuda" else "fp32 matmul rate",
         "estimate_s": 5},
        {"id": "latency_torch", "what": f"latency {VARIANT} {SIZE[0]}x{SIZE[1]} at batch {batches}: "
         + ", ".join(n for n, *_ in torch_rows), "estimate_s": round(len(torch_rows) * (2 + len(batches) * per_row))},
    ]
    if aoti:
        steps += [
            {"id": "aoti_digits", "what": f"AOTInductor {ap} package of the shipped weights (dynamic batch "
             f"1-{DIGITS_MAX_BATCH}): compile, held-out digits parity", "estimate_s": m["digits_compile_s"]},
            {"id": "aoti_b1", "what": f"AOTInductor {ap} package of {VARIANT} (dynamic batch 1-{mb}): compile",
             "estimate_s": m["aoti_compile_s"]},
            {"id": "latency_aoti", "what": f"latency of the AOTInductor {ap} package at batch {batches}",
             "estimate_s": round(3 + len(batches) * per_row)},
        ]
    steps.append({"id": "write", "what": "gpu_check.json, bench/1 document, Markdown, plot", "estimate_s": WRITE_S})
    return steps


class Budget:
    """Wall-clock left for the whole check, counted from the process start: a step whose estimate would
    run past it is skipped, not begun (a compile cannot be stopped halfway)."""

    def __init__(self, seconds: float, start: float = T0):
        self.start, self.seconds = start, seconds

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, needed_s: float) -> bool:
        return self.elapsed + needed_s + WRITE_S <= self.seconds


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


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- runners

def torch_runner(model, device: str, form: str, precision: str, graphs: bool, threads: int | None):
    from mixformer_deploy.backends.torch.runner import TorchRunner
    return TorchRunner(model, device, precision, form == "deploy", threads, cuda_graphs=graphs)


def aoti_runner(package: Path, device: str):
    """The product's AOTInductor runner, replaying from CUDA graphs on CUDA (one graph per batch size)."""
    from mixformer_deploy.backends.aoti.runner import AotiRunner
    graphs = "on" if device.startswith("cuda") else "off"
    return AotiRunner.load(package, device=device, options={"cuda_graphs": graphs})


def compile_aoti(source, size: str | None, precision: str, device: str, max_batch: int, work: Path) -> dict:
    """An AOTInductor package through the product's export (dynamic batch up to max_batch), unchecked:
    this check judges it itself, on the device."""
    from mixformer_deploy.export_api import export

    t0 = time.perf_counter()
    r = export(source=source, target="aoti", img_size=size, batch="dynamic", precision=precision, output=work,
               check=False,
               target_options={"device": "cuda" if device.startswith("cuda") else "cpu", "max_batch": max_batch})
    return {"path": str(r.path), "compile": r.manifest.get("compile"), "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- parity (the verdict)

def shipped_digits():
    """The shipped weights, the held-out digits at their training size and the CPU float32 reference."""
    from mixformer_deploy.data import heldout_digits
    from mixformer_deploy.backends.torch.runner import TorchRunner
    from mixformer_deploy.source import load_source

    source = load_source(None)
    h, w = source.input_size or (32, 32)
    x, _, labels = heldout_digits(h, w, source.preprocessing)
    reference = TorchRunner(source.model).run(x)  # as `parity` computes it
    return source, x, labels, reference


def judge(name: str, runner, precision: str, target: str, x, labels, reference) -> dict:
    """One path on the held-out digits, as `parity` judges an artifact: the target's tolerance for this
    precision, per input, and the shared accuracy gate (fp32: no extra error; fp16: at most 1)."""
    from mixformer_deploy.data import run_batched
    from mixformer_deploy.parity import accuracy_gate, compare_outputs
    from mixformer_deploy.backends import get_spec

    t0 = time.perf_counter()
    logits = run_batched(runner, x, getattr(runner, "fixed_batch", None), PARITY_CHUNK)
    tol = get_spec(target).tolerance(precision)
    m = compare_outputs(logits, reference, tol, labels=labels)
    gate = accuracy_gate("held-out digits", logits, reference, labels, precision, True, None)
    failures = m.failures(tol) + ([] if gate.passed else [
        f"accuracy: {gate.artifact_errors} of {gate.count} misclassified vs {gate.reference_errors} ({gate.rule})"])
    row = {"path": name, "precision": precision, "device": runner.device, "inputs": len(x),
           "tolerance": {"target": target, "atol": tol.atol, "rtol": tol.rtol, "min_cosine": tol.min_cosine},
           "passed": bool(m.passed and gate.passed), "failures": failures, "accuracy_gate": gate.to_dict(),
           "metrics": m.to_dict(), "runner": runner.describe(), "seconds": round(time.perf_counter() - t0, 2)}
    log.info("digits parity %-34s %s: %s (max|a-r| %.3g, cosine %.8f, errors %d vs %d)", name, precision,
             "pass" if row["passed"] else "FAIL " + "; ".join(failures), m.max_abs, m.cosine,
             gate.artifact_errors, gate.reference_errors)
    return row


def digits_torch(kind: str, matrix: dict, digits, device: str, threads: int | None) -> list[dict]:
    source, x, labels, reference = digits
    rows = []
    for name, form, p, graphs in digits_subjects(kind, matrix["precisions"]):
        runner = torch_runner(source.model, device, form, p, graphs, threads)
        rows.append(judge(name, runner, p, "onnx", x, labels, reference))  # the torch runtime: the ONNX tolerances
        runner.close()
    return rows


# ---------------------------------------------------------------- roofline and latency

def matmul_rates(device: str) -> dict:
    """Best-of-10 n x n matmul rate: fp16 (the roofline of fp16 inference) and float32 with TF32 off."""
    import torch

    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 1024
    out = {}
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
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
        out[name] = {"tflops": 2 * n ** 3 / best / 1e3, "gflops": 2 * n ** 3 / best, "n": n,
                     "dtype": str(dtype).replace("torch.", ""), "device": device, "repeats": 10}
        log.info("matmul %s %dx%d: %.3f TFLOP/s", name, n, n, out[name]["tflops"])
    return out


def time_subject(s: Timed, batch: int, spec: dict) -> dict:
    """First call, warm-up (time and count), then at least ``min_iters`` and ``duration_s`` of timed calls on
    a device tensor (no host copies): wall time (perf_counter_ns + sync) and GPU time (CUDA events)."""
    import torch

    from mixformer_deploy.bench import latency_stats

    device = s.runner.device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *SIZE, generator=gen).to(device)
    cuda = device.startswith("cuda")
    with torch.no_grad():
        t0 = time.perf_counter_ns()
        s.runner.run_tensor(x)
        _sync(device)
        first_ms = (time.perf_counter_ns() - t0) / 1e6
        n, end_at = 0, time.perf_counter() + spec["warmup_s"]
        while n < spec["warmup_min_iters"] or time.perf_counter() < end_at:
            s.runner.run_tensor(x)
            n += 1
        _sync(device)
        wall, gpu = [], []
        end_at = time.perf_counter() + spec["duration_s"]
        while len(wall) < spec["min_iters"] or time.perf_counter() < end_at:
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter_ns()
                e0.record()
                s.runner.run_tensor(x)
                e1.record()
                torch.cuda.synchronize()
                wall.append((time.perf_counter_ns() - t0) / 1e6)
                gpu.append(e0.elapsed_time(e1))
            else:
                t0 = time.perf_counter_ns()
                s.runner.run_tensor(x)
                wall.append((time.perf_counter_ns() - t0) / 1e6)
    ws = latency_stats(wall)
    row = {"path": s.name, "runtime": s.runtime, "form": s.form, "precision": s.precision, "batch": batch,
           "first_ms": first_ms, "iterations": len(wall), "wall_ms": ws, "images_per_s": batch * 1000 / ws["mean"],
           "samples_ms": [round(v, 5) for v in wall]}
    if gpu:
        gs = latency_stats(gpu)
        row["gpu_ms"] = gs
        row["images_per_s_gpu"] = batch * 1000 / gs["mean"]
    return row


def latency(subjects: list[Timed], matrix: dict, macs: int, rates: dict, budget: Budget, report: dict) -> list[dict]:
    """Every subject at every batch; a row that no longer fits the budget, or fails (out of memory, say),
    is recorded and the rest go on."""
    rows = []
    roof = (rates.get("fp16") or rates.get("fp32") or {}).get("tflops")
    lat = matrix["latency"]
    per_row = lat["warmup_s"] + lat["duration_s"] + matrix["per_row_overhead_s"]
    for batch in matrix["batches"]:
        for s in subjects:
            if not budget.allows(per_row):
                report["skipped"].append(f"latency {s.name} batch {batch}: time budget")
                report["bench_skipped"].append({"artifact": s.name, "batch": batch, "reason": "time budget"})
                continue
            try:
                row = time_subject(s, batch, lat)
            except Exception as e:  # noqa: BLE001 - one row failing is recorded, the others still run
                report["errors"].append({"step": f"latency {s.name} b{batch}",
                                         "error": f"{type(e).__name__}: {e}"[:500]})
                log.error("latency %s batch %d: %s", s.name, batch, e)
                continue
            t_s = (row.get("gpu_ms") or row["wall_ms"])["p50"] / 1e3
            row["achieved_tflops"] = 2 * macs * batch / t_s / 1e12
            row["roofline"] = "fp16 matmul" if rates.get("fp16") else "fp32 matmul"
            row["roofline_fraction"] = row["achieved_tflops"] / roof if roof else None
            log.info("latency %-36s b%-4d wall p50 %.3f ms%s, %.0f img/s, %.1f%% of the %s roofline", s.name, batch,
                     row["wall_ms"]["p50"], f", GPU p50 {row['gpu_ms']['p50']:.3f} ms" if "gpu_ms" in row else "",
                     row["images_per_s"], 100 * (row["roofline_fraction"] or 0), row["roofline"])
            rows.append(row)
    return rows


# ---------------------------------------------------------------- the bench/1 document for `report`

def bench_document(report: dict, subjects: list[Timed], device: str, threads: int, macs: int) -> dict | None:
    """The latency rows as a mixformer-deploy/bench/1 document (benchmarks/SCHEMA.md), so `report` shows
    them beside other machines. The reference row is eager fp32 of the reference form (the naive path),
    so the report's speed-up is over the naive path. ``floor`` is the float32 matmul rate (TF32 off) as
    everywhere else; each row also carries ``roofline_fraction`` against the fp16 matmul rate."""
    from mixformer_deploy.artifact import size_bytes
    from mixformer_deploy.bench import throughput
    from mixformer_deploy.reports.bench_json import build_document

    rows = report["latency"]
    if not rows:
        return None
    index = {s.name: i for i, s in enumerate(subjects)}
    ran = [s for s in subjects if any(r["path"] == s.name for r in rows)]
    artifacts = [{
        "name": s.name, "index": index[s.name], "role": s.role, "path": s.path, "runtime": s.runtime,
        "device": device, "threads": threads, "precision": s.precision, "form": s.form,
        "size_bytes": size_bytes(s.path) if s.path and Path(s.path).exists() else None, "load_ms": s.load_ms,
        "rss_before_load_bytes": None, "peak_rss_bytes": None, "peak_device_memory_bytes": None,
        "macs_per_image": macs, "runner": s.info or s.runner.describe(), "warnings": list(s.notes),
        "manifest": {"target": "aoti" if s.runtime == "aoti" else None, "variant": VARIANT, "input_size": list(SIZE),
                     "precision": s.precision, "batch": "dynamic", "num_classes": 1000, "weights_sha256": None,
                     "seed": 0}} for s in ran]
    fp32 = (report["matmul"] or {}).get("fp32")
    results = []
    for r in rows:
        s = next(s for s in subjects if s.name == r["path"])
        lat = {k: v for k, v in r["wall_ms"].items() if k != "cv"}
        floor_ms = r["batch"] * 2 * macs / (fp32["gflops"] * 1e9) * 1e3 if fp32 else None
        results.append({
            "artifact": s.name, "index": index[s.name], "role": s.role, "runtime": s.runtime, "device": device,
            "precision": s.precision, "form": s.form, "variant": VARIANT, "input_size": list(SIZE),
            "batch": r["batch"], "threads": threads, "first_inference_ms": r["first_ms"], "iterations": r["iterations"],
            "latency_ms": lat, "cv": r["wall_ms"]["cv"], "throughput_ips": throughput(r["batch"], lat["mean"]),
            "peak_rss_bytes": None, "peak_device_memory_bytes": None, "ratio_to_first": None,
            "ratio_to_reference": None, "floor_ms": floor_ms,
            "floor_fraction": floor_ms / lat["p50"] if floor_ms else None,
            "warnings": [f"{s.name} batch {r['batch']}: noisy, CV {r['wall_ms']['cv']:.0%} > 10%"]
            if r["wall_ms"]["cv"] > 0.10 else [],
            "samples_ms": r["samples_ms"], "round_sizes": [r["iterations"]], "gpu_ms": r.get("gpu_ms"),
            "roofline_fraction": r.get("roofline_fraction")})
    for b in {r["batch"] for r in results}:
        same = sorted((r for r in results if r["batch"] == b), key=lambda r: r["index"])
        ref = next((r for r in same if r["role"] == "reference"), None)
        for r in same:
            r["ratio_to_first"] = r["latency_ms"]["p50"] / same[0]["latency_ms"]["p50"]
            r["ratio_to_reference"] = r["latency_ms"]["p50"] / ref["latency_ms"]["p50"] if ref else None
    lat = report["matrix"]["latency"]
    settings = {**lat, "round_s": None, "noise_cv": 0.10, "input_seed": 0, "batches": report["matrix"]["batches"],
                "device": device, "threads": threads,
                "timer": "time.perf_counter_ns around each call + device sync (GPU time: CUDA events around the call)",
                "inputs": "seeded standard-normal, seed 0, already on the device (no host copies timed)"}
    floor = {"matmul": {**fp32, "threads": threads}, "macs_per_image": {s.name: macs for s in ran}} if fp32 else None
    notes = ["benchmarks/gpu_check.py: rows timed one after another in one process, not interleaved; "
             f"not run: {'; '.join(NOT_RUN)}"]
    return build_document(artifacts=artifacts, results=results, skipped=report["bench_skipped"], settings=settings,
                          floor=floor, device=device, threads=threads, notes=notes)


def write_outputs(out: Path, report: dict, doc: dict | None) -> None:
    """Called after every step, so a run killed by the hard cap still leaves what it measured."""
    from mixformer_deploy.artifact import write_json_atomic

    if doc is not None:
        from mixformer_deploy.reports.markdown import bench_markdown

        slug = doc["machine"]["slug"]
        report["bench_document"] = f"bench-{slug}.json"
        write_json_atomic(out / f"bench-{slug}.json", doc)
        plots = {}
        try:
            from mixformer_deploy.reports.plots import labelled_rows, latency_distribution
            latency_distribution(labelled_rows([doc]), out / f"bench-{slug}.png")
            plots = {"Latency distribution": f"bench-{slug}.png"}
        except Exception as e:  # noqa: BLE001 - a plot is optional; the numbers are not
            log.warning("no plot: %s", e)
        (out / f"bench-{slug}.md").write_text(bench_markdown([doc], plots))
    write_json_atomic(out / "gpu_check.json", report)


def run_step(report: dict, name: str, fn, *args):
    """Run one step: its result, or None when it failed (recorded and logged; the check goes on) or its
    backend is missing (no C++ compiler for AOTInductor, say: a skip with its reason, not a failure)."""
    from mixformer_deploy.errors import MissingBackendError
    try:
        return fn(*args)
    except MissingBackendError as e:
        log.warning("%s skipped: %s", name, e)
        report["skipped"].append(f"{name}: {e}")
    except Exception as e:  # noqa: BLE001
        log.error("%s failed: %s: %s", name, type(e).__name__, e)
        report["errors"].append({"step": name, "error": f"{type(e).__name__}: {e}"[:2000],
                                 "traceback": traceback.format_exc(limit=8)})
    return None


def summarize(report: dict) -> dict:
    """The headline: images/s (wall) per path and batch against the naive path (eager PyTorch fp32 of the
    reference) at the same batch, the best fp16 roofline fraction, the verdict, and what was left out."""
    rows = report["latency"]
    ips = {f"{r['path']} b{r['batch']}": r["images_per_s"] for r in rows}
    naive = {r["batch"]: r["images_per_s"] for r in rows if r["form"] == "reference" and r["precision"] == "fp32"}
    speedup = {f"{r['path']} b{r['batch']}": r["images_per_s"] / naive[r["batch"]] for r in rows if r["batch"] in naive}
    best = max(rows, key=lambda r: r.get("roofline_fraction") or 0, default=None)
    return {"passed": report["passed"], "complete": report.get("complete"), "elapsed_s": report["elapsed_s"],
            "budget_s": report["budget_s"],
            "estimate_s": report["estimate_s"],
            "parity": [f"{p['path']} {p['precision']}: {'pass' if p['passed'] else 'FAIL'} "
                       f"(max|a-r| {p['metrics']['max_abs']:.3g}, {p['accuracy_gate']['artifact_errors']} errors "
                       f"vs {p['accuracy_gate']['reference_errors']})" for p in report["digits_parity"]],
            "images_per_s": ips, "vs_naive_eager_fp32": speedup,
            "best_roofline_fraction": best and {"path": best["path"], "batch": best["batch"],
                                                "fraction": best["roofline_fraction"]},
            "cut": report["cut"], "not_run": report["not_run"], "skipped": report["skipped"],
            "errors": [e["step"] for e in report["errors"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="output directory (created)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a reduced rehearsal)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no step that would end after this (s)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable)")
    ap.add_argument("--with-aoti", action="store_true", help="cpu: also compile AOTInductor packages (slow)")
    ap.add_argument("--dry-run", action="store_true", help="import everything, print the plan, write nothing")
    args = ap.parse_args(argv)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    matrix = MATRIX[kind]
    steps = plan(kind, args.with_aoti)
    estimate = sum(s["estimate_s"] for s in steps)

    import torch

    from mixformer_deploy import __version__, create_model
    from mixformer_deploy.bench import available_cores, macs_per_image
    from mixformer_deploy.reports.bench_json import environment
    from mixformer_deploy.backends.aoti.runner import AotiRunner  # noqa: F401 - a dry run proves the imports
    from mixformer_deploy.backends.aoti.spec import can_compile

    if args.dry_run:
        print(json.dumps({"device": args.device, "matrix": matrix, "plan": steps, "estimate_s": estimate,
                          "budget_s": args.budget_s, "fits": estimate <= args.budget_s, "cut": matrix["cut"],
                          "not_run": NOT_RUN, "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
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
    threads = args.threads or available_cores()
    if estimate > args.budget_s:
        log.warning("the plan's estimate (%.0f s) exceeds the budget (%.0f s): later steps will be skipped",
                    estimate, args.budget_s)
    report = {"schema": SCHEMA, "device": args.device, "matrix": matrix, "plan": steps, "estimate_s": estimate,
              "budget_s": args.budget_s, "tool_version": __version__,
              "environment": environment(args.device, threads), "cut": list(matrix["cut"]),
              "not_run": list(NOT_RUN), "digits_parity": [], "aoti_packages": {}, "matmul": None, "latency": [],
              "skipped": [], "bench_skipped": [], "errors": [], "elapsed_s": None, "passed": None}
    log.info("gpu check on %s: %s", args.device, json.dumps(report["environment"].get("gpu") or
                                                              report["environment"]["cpu_model"]))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))   # packages live outside DIR (5 files there)
    macs = macs_per_image({"variant": VARIANT, "input_size": list(SIZE), "num_classes": 1000})
    report["macs_per_image"] = macs
    subjects: list[Timed] = []
    state: dict = {}
    aoti = kind == "cuda" or args.with_aoti
    if aoti and (why := can_compile()) is not None:
        report["skipped"].append(f"AOTInductor: {why}")
        aoti = False

    def save():
        report["elapsed_s"] = round(budget.elapsed, 1)
        write_outputs(out, report, run_step(report, "bench/1 document", bench_document, report, subjects,
                                            args.device, threads, macs))

    def do_digits():
        state["digits"] = shipped_digits()

    def do_digits_torch():
        report["digits_parity"] += digits_torch(kind, matrix, state["digits"], args.device, args.threads)

    def do_roofline():
        report["matmul"] = matmul_rates(args.device)

    def do_latency_torch():
        b1 = create_model(VARIANT, seed=0)
        new = []
        for name, form, p, graphs in torch_subjects(kind, matrix["precisions"]):
            t0 = time.perf_counter()
            runner = torch_runner(b1, args.device, form, p, graphs, args.threads)
            role = "reference" if form == "reference" and p == "fp32" else "model"
            new.append(Timed(name, role, "torch", form, p, runner, (time.perf_counter() - t0) * 1e3))
        subjects.extend(new)
        report["latency"] += latency(new, matrix, macs, report["matmul"] or {}, budget, report)
        for s in new:
            s.close()

    def do_aoti_digits():
        p = matrix["aoti_precision"]
        source, x, labels, reference = state["digits"]
        r = compile_aoti(source, None, p, args.device, DIGITS_MAX_BATCH, work / "digits")
        report["aoti_packages"][f"digits-{p}"] = r
        runner = aoti_runner(Path(r["path"]), args.device)
        report["digits_parity"].append(judge(f"aoti ({'CUDA graphs' if runner.cuda_graphs else 'no graphs'})",
                                             runner, p, "aoti", x, labels, reference))
        runner.close()

    def do_aoti_b1():
        from mixformer_deploy.source import load_source
        p = matrix["aoti_precision"]
        report["aoti_packages"][f"{VARIANT}-{p}"] = compile_aoti(
            load_source(None, VARIANT), f"{SIZE[0]}x{SIZE[1]}", p, args.device, max(matrix["batches"]), work / "b1")

    def do_latency_aoti():
        p = matrix["aoti_precision"]
        path = Path(report["aoti_packages"][f"{VARIANT}-{p}"]["path"])
        t0 = time.perf_counter()
        runner = aoti_runner(path, args.device)
        s = Timed(f"{VARIANT} aoti {'CUDA graphs ' if runner.cuda_graphs else ''}{p} ({path.name})", "artifact",
                  "aoti", "deploy", p, runner, (time.perf_counter() - t0) * 1e3, str(path))
        subjects.append(s)
        report["latency"] += latency([s], matrix, macs, report["matmul"] or {}, budget, report)
        s.close()

    actions = {"digits": do_digits, "digits_torch": do_digits_torch, "roofline": do_roofline,
               "latency_torch": do_latency_torch, "aoti_digits": do_aoti_digits, "aoti_b1": do_aoti_b1,
               "latency_aoti": do_latency_aoti}
    needs = {"digits_torch": "digits", "aoti_digits": "digits", "latency_aoti": "aoti_b1"}
    done = {"start"}
    steps[0]["took_s"] = round(budget.elapsed, 1)
    for st in steps:
        sid = st["id"]
        if sid not in actions:
            continue
        if "aoti" in sid and not aoti:   # no compiler here: said under skipped
            continue
        if sid in needs and needs[sid] not in done:
            report["skipped"].append(f"{st['what']}: {needs[sid]} did not run")
            continue
        if not budget.allows(st["estimate_s"]):
            report["skipped"].append(f"{st['what']}: time budget ({budget.elapsed:.0f} s used, "
                                     f"~{st['estimate_s']} s needed of {args.budget_s:.0f} s)")
            log.warning("skipped for time: %s", st["what"])
            continue
        t0 = time.monotonic()
        log.info("step %s (estimate %s s): %s", sid, st["estimate_s"], st["what"])
        if run_step(report, sid, lambda f=actions[sid]: f() or True):
            done.add(sid)
        st["took_s"] = round(time.monotonic() - t0, 1)
        save()

    judged = {st["id"] for st in steps} & {"digits_torch", "aoti_digits"}   # what the plan promised to judge
    checks = report["digits_parity"]
    report["complete"] = judged <= done
    report["passed"] = bool(checks) and all(p["passed"] for p in checks) and report["complete"] \
        and not report["errors"]
    report["elapsed_s"] = round(budget.elapsed, 1)
    report["summary"] = summarize(report)
    save()
    print(json.dumps(report["summary"], indent=2))
    log.info("done in %.0f s: %s; files in %s", budget.elapsed, "PASSED" if report["passed"] else "FAILED", out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
