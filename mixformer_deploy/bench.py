"""Latency benchmarks over any Runner: warm-up and timing policy, statistics, interleaving, FLOP floor.

Why it is shaped like this:
- each subject (an artifact, or the PyTorch reference of the same weights) lives in its own worker
  process (spawn), so its peak memory is its own and one runtime's threads never share a process with
  another's;
- the parent alternates short rounds between the workers ("run k iterations", raw timings back), so all
  subjects share the machine's drift (thermal, other jobs) instead of one getting the quiet minute;
- warm-up is by time with a minimum count, measurement runs for a minimum time *and* count, and every raw
  sample is kept, so a later run can be compared with a noise-aware test (mixformer_deploy.regression);
- the FLOP floor (2 x MACs over this machine's float32 matmul rate, measured in the same run with the same
  threads) says how far each row is from what the arithmetic alone costs.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import errors
from .errors import InputFileError, InternalError, MixformerDeployError, UsageError

log = logging.getLogger(__name__)

REFERENCE_NAME = "torch eager reference"

# Test-only: MIXFORMER_DEPLOY_TEST_HOLD=<phase>[:seconds] prints "test hold: <phase>" to stderr when a
# process reaches that phase, then sleeps there (default 30 s), so that a test can send SIGINT at a known
# point. Phases: start (each worker, before it has set anything up), timing (the parent, before the first
# timed round), end (each worker, closing after the run), write (`bench`, between its output files).
# Never set outside tests; it changes no result.
TEST_HOLD_ENV = "MIXFORMER_DEPLOY_TEST_HOLD"


@dataclass(frozen=True)
class Policy:
    """How long and how often to run. Defaults suit a quiet machine; CI uses shorter ones."""

    warmup_s: float = 1.0
    warmup_min_iters: int = 3
    duration_s: float = 5.0
    min_iters: int = 20
    round_s: float | None = None   # one worker's share of a round; default min(0.25 s, duration / 10)
    noise_cv: float = 0.10         # warn above this coefficient of variation
    input_seed: int = 0

    def __post_init__(self):
        if self.warmup_s < 0 or self.duration_s < 0 or self.min_iters < 1 or self.warmup_min_iters < 0:
            raise UsageError("warm-up and duration must be >= 0 s and --min-iters >= 1")

    @property
    def round_seconds(self) -> float:
        return self.round_s if self.round_s else max(0.005, min(0.25, self.duration_s / 10))


@dataclass
class Subject:
    """One thing to time: how its worker opens it, and what it is (for the report)."""

    name: str
    role: str                  # "artifact" (a file a runner opens) | "reference" (torch fp32 eager) | "model"
    runtime: str
    device: str
    threads: int
    manifest: dict             # the artifact's full manifest (a checkpoint's implied one)
    path: str | None = None    # the artifact; for a reference, the file it was resolved against
    weights: str | None = None  # reference only: weights file (None: what the manifest names)
    precision: str = "fp32"
    deploy: bool = False       # torch only: time the deploy form instead of the reference form
    notes: list[str] = field(default_factory=list)  # warnings found while resolving it
    options: dict = field(default_factory=dict)     # runtime options (--runtime-option KEY=VALUE)

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.manifest.get("input_size") or (224, 224)
        return int(h), int(w)

    @property
    def fixed_batch(self) -> int | None:
        b = self.manifest.get("batch")
        return b if isinstance(b, int) and self.role == "artifact" else None


# ---------------------------------------------------------------- subjects

def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_load(threads: int | None) -> dict:
    """The 1-minute load average when timing starts, against the cores the run needs: another busy process
    on the cores a runtime spins on (OpenMP's active wait: AOTInductor, PyTorch) can make it many times
    slower, so a run on a loaded machine says so (a warning, and ``settings.load`` in the JSON)."""
    usable = available_cores()
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return {"load_1m": None, "usable_cpus": usable, "free_cpus": None}
    free = round(max(usable - load, 0.0), 2)
    if (threads or usable) > free + 0.5:
        log.warning("the machine is busy: load %.2f on %d usable CPUs leaves %.1f free for %d timing threads; "
                    "latencies include the contention (compare runs of one load only)", load, usable, free,
                    threads or usable)
    return {"load_1m": load, "usable_cpus": usable, "free_cpus": free}


def artifact_subject(path: str | Path, runtime: str = "auto", device: str = "cpu", threads: int | None = None,
                     options: dict | None = None) -> Subject:
    """An exported artifact (or a weights file, which the torch runtime runs) and its manifest."""
    from .artifact import resolve_artifact
    from .parity import artifact_manifest
    from .backends import runner_class, runtime_for

    p = resolve_artifact(path)
    if not p.exists():
        raise InputFileError(f"artifact not found: {p}")
    key = runtime_for(p) if runtime in (None, "auto") else runtime
    options = runner_class(key).check_options(options)  # before any worker starts
    m = artifact_manifest(p)
    return Subject(p.name, "artifact", key, device, threads or available_cores(), m, str(p),
                   precision=options.get("precision") or m.get("precision") or "fp32", options=options)


def reference_subject(first: Subject, weights: str | Path | None = None) -> Subject:
    """PyTorch eager float32 of the weights ``first`` was exported from (checked in the parent now, so a
    wrong --weights fails before any worker starts)."""
    from .parity import resolve_reference

    if weights is not None and not Path(weights).is_file():
        raise InputFileError(f"weights not found: {weights}")
    warnings: list[str] = []
    ref = resolve_reference(Path(first.path or first.name), first.manifest, weights, warnings)
    manifest = {**first.manifest, "batch": "dynamic", "precision": "fp32", "target": None, "runtime": "torch"}
    if ref.sha256:
        manifest["weights"] = {**(manifest.get("weights") or {}), "sha256": ref.sha256}
    variant = manifest.get("variant") or "custom"
    return Subject(f"{REFERENCE_NAME} ({variant})", "reference", "torch", first.device, first.threads, manifest,
                   first.path, ref.path, notes=warnings)


def model_subject(variant: str, *, weights: str | Path | None = None, seed: int = 0, num_classes: int = 1000,
                  input_size: tuple[int, int] = (224, 224), precision: str = "fp32", deploy: bool = False,
                  device: str = "cpu", threads: int | None = None, name: str | None = None) -> Subject:
    """The torch runtime on given weights or a seeded random model, reference or deploy form, fp32 or
    fp16: what the GPU check times, where no exported artifact exists."""
    from .model import variant_config

    if weights is not None:
        from .parity import checkpoint_manifest
        manifest = checkpoint_manifest(weights)
    else:
        cfg = variant_config(variant, num_classes=num_classes)
        manifest = {"variant": cfg.name, "config": cfg.to_dict(), "num_classes": num_classes,
                    "weights": {"sha256": None}, "seed": seed}
    manifest.update(input_size=list(input_size), batch="dynamic", precision=precision, target=None, runtime="torch")
    form = "deploy" if deploy else "reference"
    name = name or f"{manifest['variant']} torch {form} {precision}"
    role = "reference" if form == "reference" and precision == "fp32" else "model"
    return Subject(name, role, "torch", device, threads or available_cores(), manifest,
                   str(weights) if weights else None, str(weights) if weights else None, precision, deploy)


def _unique_names(subjects: list[Subject]) -> list[Subject]:
    seen: dict[str, int] = {}
    out = []
    for s in subjects:
        seen[s.name] = seen.get(s.name, 0) + 1
        out.append(s if seen[s.name] == 1 else replace(s, name=f"{s.name} #{seen[s.name]}"))
    return out


def hold_for_test(phase: str) -> None:
    """The test-only hold of TEST_HOLD_ENV (see there): a marker on stderr, then a sleep, in ``phase``."""
    wanted, _, seconds = os.environ.get(TEST_HOLD_ENV, "").partition(":")
    if wanted == phase:
        _say(f"test hold: {phase}\n")
        end = time.monotonic() + float(seconds or 30)
        while time.monotonic() < end:   # in slices: the kernel may hand SIGINT to another of our threads, and
            time.sleep(0.05)            # only a wake-up lets the main thread raise KeyboardInterrupt


def _say(line: str) -> None:
    """A line on stderr in one write(2), whole even if the process is killed right after."""
    try:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), line.encode())
    except (AttributeError, OSError, ValueError):   # an in-memory stream (CliRunner)
        print(line, end="", file=sys.stderr, flush=True)


@contextmanager
def sigint_blocked():
    """SIGINT held pending (POSIX) while this block runs, delivered when it ends.

    Around a worker's start, so that the spawned process inherits the blocked signal: a terminal's Ctrl-C
    reaches every process of its group, and a worker still importing would print a traceback. Around the
    reaping, so that a second Ctrl-C cannot leave a worker behind. Elsewhere (Windows, no pthread_sigmask)
    a no-op: the worker then ignores SIGINT as soon as it runs (``_worker_main``)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------- the worker process

def _open(subject: Subject):
    if subject.role == "artifact":
        from .backends import open_runner
        return open_runner(subject.path, subject.runtime, subject.device, subject.threads, subject.options)
    from .parity import resolve_reference
    from .backends import runner_class
    TorchRunner = runner_class("torch")  # the reference runtime, through the registry
    ref = resolve_reference(Path(subject.path or subject.name), subject.manifest, subject.weights, [])
    return TorchRunner(ref.model, subject.device, subject.precision, subject.deploy, subject.threads)


def rss_bytes() -> int | None:
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            return None


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (the worker).

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own memory map. Not
    getrusage's ru_maxrss: it carries over the parent's peak through fork + exec, so every spawned
    worker would report at least the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    except ImportError:
        pass
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except ImportError:
        return None


def _device_peak() -> int | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


def _time(runner, x: np.ndarray, k: int) -> list[int]:
    """k timed iterations, each run + sync, in nanoseconds."""
    out = []
    for _ in range(k):
        t0 = time.perf_counter_ns()
        runner.run(x)
        runner.sync()
        out.append(time.perf_counter_ns() - t0)
    return out


def _warm_up(runner, x: np.ndarray, seconds: float, min_iters: int) -> list[int]:
    times: list[int] = []
    end = time.perf_counter_ns() + int(seconds * 1e9)
    while len(times) < min_iters or time.perf_counter_ns() < end:
        times += _time(runner, x, 1)
    return times


def _ignore_sigint() -> None:
    """Ctrl-C is the parent's to handle (it reaps the workers): a worker never raises KeyboardInterrupt."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _quietly(action: Callable[[], object]) -> None:
    """A pipe operation whose failure means only that the parent is gone: nothing left to tell it."""
    try:
        action()
    except (OSError, EOFError, ValueError):
        pass


def _worker_main(conn, subject: Subject) -> None:
    """Serve the parent's commands until "close"; errors go back as (type name, message)."""
    hold_for_test("start")
    _ignore_sigint()
    from .data import random_inputs

    runner, x, seed = None, None, 0

    def gpu_times() -> list[float]:
        """GPU compute time of the runs since the last call (the reference runner too: it is a Runner)."""
        return runner.take_gpu_times() if runner is not None else []

    try:
        rss0 = rss_bytes()
        while True:
            cmd, *args = conn.recv()
            if cmd == "close":
                break
            if cmd == "load":
                seed = args[0]
                t0 = time.perf_counter_ns()
                runner = _open(subject)
                load_ms = (time.perf_counter_ns() - t0) / 1e6
                reply = {"load_ms": load_ms, "rss_before_load_bytes": rss0, "describe": runner.describe()}
            elif cmd == "batch":
                x = random_inputs(args[0], *subject.input_size, seed=seed)[0]
                reply = _time(runner, x, 1)[0]
                gpu_times()   # the first inference (and a CUDA graph's capture) is not a timed sample
            elif cmd == "warmup":
                reply = _warm_up(runner, x, *args)
                gpu_times()
            elif cmd == "run":
                if args[0] > 1:   # one untimed lead-in: the switch from another worker (cold caches, its idle
                    _time(runner, x, 1)   # thread pool still spinning) is not timed, on the wall or the GPU
                    gpu_times()
                reply = (_time(runner, x, args[0]), gpu_times())
            elif cmd == "memory":
                reply = {"peak_rss_bytes": peak_rss_bytes(), "peak_device_memory_bytes": _device_peak()}
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", reply))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception as e:  # noqa: BLE001 - every failure goes back to the parent as one typed line
        name = type(e).__name__ if isinstance(e, MixformerDeployError) else "InternalError"
        text = str(e) if isinstance(e, MixformerDeployError) else (f"internal error in the benchmark worker: "
                                                                   f"{type(e).__name__}: {e} (rerun with --debug)")
        _quietly(lambda: conn.send(("error", name, " ".join(text.split())[:500])))
    finally:
        hold_for_test("end")
        if runner is not None:
            runner.close()
        _quietly(conn.close)


def worker_died(name: str, exitcode: int | None) -> InternalError:
    """A worker gone without a reply (a crash, an OOM kill) is not a verdict on the artifact: exit 70, never
    1, which CI reads as "the artifact is wrong"."""
    return InternalError(f"internal error: {name}: the benchmark worker exited (code {exitcode}) without answering; "
                         "its stderr says why (code that starts benchmarks must be importable, e.g. behind "
                         "`if __name__ == \"__main__\":`); rerun with --debug")


def worker_error(type_name: str, message: str) -> MixformerDeployError:
    """The worker's typed error by name; a name that is not one of ours is a bug (exit 70)."""
    cls = getattr(errors, type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, MixformerDeployError)) or cls is MixformerDeployError:
        cls = InternalError
    return cls(message)


def _join(proc, timeout: float) -> None:
    """``proc.join(timeout)`` in short slices: the kernel may hand a Ctrl-C to another thread of ours, and
    only a wake-up lets the main thread raise KeyboardInterrupt (at most 0.1 s late, not ``timeout``)."""
    end = time.monotonic() + timeout
    while proc.is_alive() and time.monotonic() < end:
        proc.join(min(0.1, max(0.0, end - time.monotonic())))


def _tracker_running() -> None:
    """multiprocessing's resource tracker started now: the first spawn starts it, and unblocks SIGINT
    after doing so (Python 3.8-3.13), which would undo our block for that very worker."""
    if hasattr(signal, "pthread_sigmask"):
        from multiprocessing import resource_tracker
        resource_tracker.ensure_running()


class _Worker:
    """The parent's handle on one worker process (``start`` it; ``close`` or, after Ctrl-C, ``reap`` it)."""

    def __init__(self, ctx, subject: Subject, start: bool = True):
        self.subject = subject
        self.conn, self._child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(self._child, subject), daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        _tracker_running()
        with sigint_blocked():   # inherited: the spawned interpreter never sees the terminal's Ctrl-C
            self.proc.start()
            self._child.close()

    def call(self, *message):
        try:
            self.conn.send(message)
            while not self.conn.poll(0.5):
                if not self.proc.is_alive() and not self.conn.poll():
                    raise EOFError
            status, *reply = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise worker_died(self.subject.name, self.proc.exitcode) from None
        if status == "error":
            raise worker_error(reply[0], f"{self.subject.name}: {reply[1]}")
        return reply[0]

    def close(self) -> None:
        if self.proc.pid is None:   # never started
            return self.reap()
        try:
            self.conn.send(("close",))
        except (OSError, BrokenPipeError):
            pass
        _join(self.proc, 10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self._child.close()

    def reap(self, timeout: float = 5.0) -> None:
        """End the worker without a word (after Ctrl-C the pipe may hold half a message): SIGTERM, then
        SIGKILL if it has not gone within ``timeout``."""
        if self.proc.pid is not None:
            if self.proc.is_alive():
                self.proc.terminate()
            _join(self.proc, timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout)
        self.conn.close()
        self._child.close()


# ---------------------------------------------------------------- statistics

def latency_stats(samples_ms: Sequence[float]) -> dict:
    """Percentiles (numpy's linear interpolation), mean, sample std (ddof=1), min, max, in ms; cv unitless."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples")
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {"p50": float(p50), "p90": float(p90), "p95": float(p95), "p99": float(p99), "mean": mean,
            "std": std, "min": float(a.min()), "max": float(a.max()), "cv": std / mean if mean > 0 else 0.0}


def throughput(batch: int, mean_ms: float) -> float:
    """Images per second over the whole measurement (total images / total time)."""
    return batch * 1000.0 / mean_ms if mean_ms > 0 else float("nan")


# ---------------------------------------------------------------- FLOP floor

def matmul_rate(device: str = "cpu", threads: int | None = None, n: int | None = None, repeats: int = 7) -> dict:
    """Best-of-``repeats`` float32 n x n matrix-multiply rate, in GFLOP/s, with the benchmark's threads."""
    import torch

    n = n or (4096 if device.startswith("cuda") else 1024)
    dev = torch.device(device)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen).to(dev) for _ in range(2))
        c = torch.empty(n, n, device=dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        torch.mm(a, b, out=c)
        sync()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            torch.mm(a, b, out=c)
            sync()
            best = min(best, time.perf_counter_ns() - t0)
    finally:
        torch.set_num_threads(old)
    return {"gflops": 2 * n ** 3 / best, "n": n, "dtype": "float32", "device": device,
            "threads": threads or old, "repeats": repeats}


_MACS: dict[tuple, int] = {}


def macs_per_image(manifest: dict) -> int | None:
    """Multiply-adds of one image of the manifest's architecture and input size (None if unknown)."""
    import json

    from .model import MixFormer, MixFormerConfig, count_macs, variant_config

    h, w = manifest.get("input_size") or (224, 224)
    try:
        cfg = (MixFormerConfig.from_dict(manifest["config"]) if manifest.get("config")
               else variant_config(manifest["variant"], num_classes=manifest.get("num_classes") or 1000))
    except (KeyError, MixformerDeployError, TypeError) as e:
        log.warning("no FLOP floor: cannot tell the architecture (%s)", e)
        return None
    key = (json.dumps(cfg.to_dict(), sort_keys=True), int(h), int(w))
    if key not in _MACS:
        _MACS[key] = int(count_macs(MixFormer(cfg).eval(), int(h), int(w)))
    return _MACS[key]


# ---------------------------------------------------------------- the run

Progress = Callable[[float, str], None]


def plan(subjects: Sequence[Subject], batches: Sequence[int]) -> tuple[list[tuple[int, list[int]]], list[dict]]:
    """Which subjects run at which batch: a fixed-batch artifact runs only its own batch size."""
    groups, skipped = [], []
    for b in batches:
        group = []
        for i, s in enumerate(subjects):
            if s.fixed_batch is not None and s.fixed_batch != b:
                skipped.append({"artifact": s.name, "batch": b,
                                "reason": f"fixed batch {s.fixed_batch} (export with --batch dynamic or {b})"})
            else:
                group.append(i)
        if group:
            groups.append((b, group))
    return groups, skipped


def _enough(samples: list[int], policy: Policy) -> float:
    """Fraction of the measurement target reached (1.0 = enough time and iterations)."""
    t = sum(samples) / 1e9 / policy.duration_s if policy.duration_s > 0 else 1.0
    return min(1.0, t, len(samples) / policy.min_iters)


def _measure_batch(workers: list[_Worker], batch: int, policy: Policy, tick: Callable[[float], None]) -> dict:
    """First inference, warm-up, then interleaved rounds until every worker has enough samples."""
    first = {w: w.call("batch", batch) for w in workers}
    est = {}
    for w in workers:
        warm = w.call("warmup", policy.warmup_s, policy.warmup_min_iters)
        est[w] = float(np.median(warm)) if warm else 1e6
    samples: dict[_Worker, list[int]] = {w: [] for w in workers}
    rounds: dict[_Worker, list[int]] = {w: [] for w in workers}
    gpu: dict[_Worker, list[float]] = {w: [] for w in workers}
    order = list(workers)
    while True:
        progress = min(_enough(samples[w], policy) for w in workers)
        tick(progress)
        if progress >= 1.0:
            break
        if not any(samples.values()):
            hold_for_test("timing")
        for w in order:
            k = max(1, min(100_000, int(policy.round_seconds * 1e9 / max(est[w], 1.0))))
            times, gpu_ms = w.call("run", k)
            gpu[w] += gpu_ms
            samples[w] += times
            rounds[w].append(len(times))
            est[w] = float(np.median(times))
        order = order[1:] + order[:1]  # rotate, so no subject always runs right after the same one
    return {w: (first[w], samples[w], rounds[w], gpu[w]) for w in workers}


def percent_pair(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` as percentages, ``value`` with as many decimals (up to 3) as it takes not to
    read as the limit it exceeds: "10.4%" against "10%", never "10%" > "10%"."""
    v, lim = value * 100, limit * 100
    decimals = next((d for d in range(3) if round(v, d) != round(lim, d)), 3)
    return f"{v:.{decimals}f}%", f"{lim:.3g}%"


def _row(subject: Subject, index: int, info: dict, batch: int, first_ns: int, samples_ns: list[int],
         memory: dict, policy: Policy) -> dict:
    samples_ms = [round(t / 1e6, 5) for t in samples_ns]
    stats = latency_stats(samples_ms)
    d = info["describe"]
    h, w = subject.input_size
    row = {
        "artifact": subject.name, "index": index, "role": subject.role,
        "runtime": d.get("runtime", subject.runtime), "device": d.get("device", subject.device),
        "precision": d.get("precision", subject.precision), "form": d.get("form"),
        "variant": subject.manifest.get("variant"), "input_size": [h, w], "batch": batch,
        "threads": subject.threads, "first_inference_ms": first_ns / 1e6, "iterations": len(samples_ms),
        "latency_ms": {k: v for k, v in stats.items() if k != "cv"}, "cv": stats["cv"],
        "throughput_ips": throughput(batch, stats["mean"]), **memory,
        "ratio_to_first": None, "ratio_to_reference": None, "floor_ms": None, "floor_fraction": None,
        "warnings": [], "samples_ms": samples_ms,
    }
    if stats["cv"] > policy.noise_cv:
        cv, limit = percent_pair(stats["cv"], policy.noise_cv)
        msg = (f"{subject.name} batch {batch}: noisy, CV {cv} > {limit} "
               "(quiet the machine, pin threads, or run longer)")
        log.warning("%s", msg)
        row["warnings"].append(msg)
    return row


def _add_ratios(rows: list[dict]) -> None:
    """Each row's p50 over the first subject's (and the reference's) p50 at the same batch."""
    for b in {r["batch"] for r in rows}:
        same = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["index"])
        ref = next((r for r in same if r["role"] == "reference"), None)
        for r in same:
            r["ratio_to_first"] = r["latency_ms"]["p50"] / same[0]["latency_ms"]["p50"]
            if ref is not None:
                r["ratio_to_reference"] = r["latency_ms"]["p50"] / ref["latency_ms"]["p50"]


def _add_floor(rows: list[dict], macs: dict[str, int | None], rate: dict | None) -> None:
    if not rate:
        return
    for r in rows:
        m = macs.get(r["artifact"])
        if m:
            r["floor_ms"] = r["batch"] * 2 * m / (rate["gflops"] * 1e9) * 1e3
            r["floor_fraction"] = r["floor_ms"] / r["latency_ms"]["p50"]


def _size_bytes(path: str | None) -> int | None:
    """Every byte of the artifact (external data, a directory's tree), as the manifest counts it."""
    if not path or not Path(path).exists():
        return None
    from .artifact import size_bytes
    return size_bytes(path)


def _artifact_entry(s: Subject, index: int, info: dict, memory: dict, macs: int | None) -> dict:
    m = s.manifest
    weights = m.get("weights") or {}
    return {
        "name": s.name, "index": index, "role": s.role, "path": s.path if s.role == "artifact" else s.weights,
        "runtime": s.runtime, "device": s.device, "threads": s.threads,
        "precision": info["describe"].get("precision", s.precision), "form": info["describe"].get("form"),
        "size_bytes": _size_bytes(s.path if s.role == "artifact" else s.weights),
        "load_ms": info["load_ms"], "rss_before_load_bytes": info["rss_before_load_bytes"], **memory,
        "macs_per_image": macs, "runner": info["describe"], "warnings": list(s.notes),
        "manifest": {"target": m.get("target"), "variant": m.get("variant"), "input_size": list(s.input_size),
                     "precision": m.get("precision"), "batch": m.get("batch"), "num_classes": m.get("num_classes"),
                     "weights_sha256": weights.get("sha256"), "seed": m.get("seed")},
    }


@contextmanager
def _running(subjects: dict[int, Subject]):
    """One started worker per subject, by key, each closed in turn when the block ends or fails with an
    error (ours or a runtime's: the pipes are whole). After Ctrl-C, even one that cuts a close short,
    every worker is reaped at once instead, so that none outlives the parent."""
    ctx = multiprocessing.get_context("spawn")
    workers: dict[int, _Worker] = {}
    closed = False
    try:
        for i, s in subjects.items():
            workers[i] = w = _Worker(ctx, s, start=False)   # registered before it starts: reaped whatever
            w.start()
        try:
            yield workers
        except Exception:
            _close_all(workers)
            closed = True
            raise
        _close_all(workers)
        closed = True
    finally:
        if not closed:
            with sigint_blocked():   # a second Ctrl-C waits until every worker is gone
                for w in workers.values():
                    w.reap()


def _close_all(workers: dict[int, _Worker]) -> None:
    for w in workers.values():
        w.close()


def benchmark_subjects(subjects: Sequence[Subject], batches: Sequence[int] = (1,), policy: Policy = Policy(),
                       floor: bool = True, progress: Progress | None = None) -> dict:
    """Time every subject at every batch it can run, interleaved; returns the bench/1 JSON document."""
    from .reports.bench_json import build_document

    subjects = _unique_names(list(subjects))
    batches = sorted(set(int(b) for b in batches))
    if not subjects or not batches or min(batches) < 1:
        raise UsageError("nothing to benchmark: give at least one artifact and positive batch sizes")
    groups, skipped = plan(subjects, batches)
    if not groups:
        raise UsageError("nothing is runnable: every artifact has a fixed batch other than "
                         f"{', '.join(map(str, batches))}")
    for s in skipped:
        log.warning("skipping %s at batch %d: %s", s["artifact"], s["batch"], s["reason"])
    used = sorted({i for _, g in groups for i in g})
    tick = progress or (lambda fraction, text: None)
    rows = []
    device, threads = subjects[used[0]].device, subjects[used[0]].threads
    with _running({i: subjects[i] for i in used}) as workers:
        tick(0.0, "counting multiply-adds")  # while the workers start
        macs = {subjects[i].name: macs_per_image(subjects[i].manifest) for i in used} if floor else {}
        infos = {}
        for i in used:  # one at a time, so that load times do not compete
            tick(0.0, f"loading {subjects[i].name}")
            infos[i] = workers[i].call("load", policy.input_seed)
        tick(0.0, "measuring the float32 matmul rate")
        rate = matmul_rate(device, threads) if floor else None
        load = machine_load(threads) if device == "cpu" else None  # when timing starts: every artifact loaded
        for gi, (batch, group) in enumerate(groups):
            label = f"batch {batch}"
            measured = _measure_batch([workers[i] for i in group], batch, policy,
                                      lambda f, gi=gi, label=label: tick((gi + f) / len(groups), label))
            for i in group:
                first, samples, round_sizes, gpu_ms = measured[workers[i]]
                row = _row(subjects[i], i, infos[i], batch, first, samples, workers[i].call("memory"), policy)
                rows.append({**row, "round_sizes": round_sizes,
                             "gpu_ms": latency_stats(gpu_ms) if gpu_ms else None})
        memory = {i: workers[i].call("memory") for i in used}
    _add_ratios(rows)
    _add_floor(rows, macs, rate)
    artifacts = [_artifact_entry(subjects[i], i, infos[i], memory[i], macs.get(subjects[i].name)) for i in used]
    settings = {**asdict(policy), "round_s": policy.round_seconds, "batches": batches, "device": device,
                "threads": threads, "load": load, "timer": "time.perf_counter_ns around run + sync",
                "inputs": f"seeded standard-normal, seed {policy.input_seed}"}
    floor_info = {"matmul": rate, "macs_per_image": macs} if floor else None
    return build_document(artifacts=artifacts, results=rows, skipped=skipped, settings=settings,
                          floor=floor_info, device=device, threads=threads,
                          notes=[f"{subjects[i].name}: {n}" for i in used for n in subjects[i].notes])


def benchmark(artifacts: Sequence[str | Path], runtime: str = "auto", device: str = "cpu",
              batches: Sequence[int] = (1,), threads: int | None = None, policy: Policy = Policy(),
              with_reference: bool = False, weights: str | Path | None = None, floor: bool = True,
              progress: Progress | None = None, runtime_options: dict | None = None) -> dict:
    """Time artifacts (and, with_reference, PyTorch eager of the same weights) through their runners.

    Returns the ``mixformer-deploy/bench/1`` document (see benchmarks/SCHEMA.md); never prints.
    """
    if not artifacts:
        raise UsageError("give at least one artifact to benchmark")
    threads = threads or available_cores()
    subjects = [artifact_subject(a, runtime, device, threads, runtime_options) for a in artifacts]
    if with_reference:
        subjects.append(reference_subject(subjects[0], weights))
    elif weights is not None:
        log.warning("--weights is used only with --with-reference; ignoring it")
    return benchmark_subjects(subjects, batches, policy, floor, progress)


__all__ = ["Policy", "Subject", "artifact_subject", "reference_subject", "model_subject", "benchmark",
           "benchmark_subjects", "latency_stats", "throughput", "matmul_rate", "macs_per_image", "plan",
           "peak_rss_bytes", "available_cores"]
