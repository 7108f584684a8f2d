"""LiteRT on a phone: ``benchmark_model``, its command line and its output.

One run with ``--warmup_runs`` and ``--num_runs``; its statistics line gives count, first, min, max, avg,
std and (newer builds) p5 / median / p95 in microseconds. It reports no per-run samples, so ``samples_ms``
is empty and p90/p99 are null. First inference is the summary line's "First inference" (the cold first
run, before warm-up), load time its "Init". The interface is the one ``executorch/phone.py`` describes.
"""

from __future__ import annotations

import re
import shlex
from typing import Callable

from ...errors import DeviceToolError

RUNTIME_DIST = "ai-edge-litert"
_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_STATS = re.compile(r"count=(\d+)((?:\s+\w+=" + _NUM + r")+)")
_SUMMARY = re.compile(rf"Inference timings in us: Init: {_NUM}, First inference: {_NUM}, "
                      rf"Warmup \(avg\): {_NUM}, Inference \(avg\): {_NUM}")
_MEMORY = re.compile(rf"(?:Peak memory footprint|Memory footprint delta from the start of the tool) "
                     rf"\(MB\): init={_NUM} overall={_NUM}")
_DELEGATE = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \((\w+)\)")


def phone_command(tool: str, model: str, threads: int, runs: int, warmup: int = 0, extra: str = "") -> str:
    return (f"{shlex.quote(tool)} --graph={shlex.quote(model)} --num_threads={threads} --warmup_runs={warmup} "
            f"--num_runs={runs} --use_xnnpack=true {extra}").strip()


def parse_phone_output(text: str) -> dict:
    """benchmark_model's output -> statistics of the timed runs in ms (the last ``count=`` line is the
    timed one, the first the warm-up), the summary line, memory and delegation. ``first_ms`` is the
    summary's "First inference" (cold); ``timed_first_ms`` the first of the timed runs."""
    stats = list(_STATS.finditer(text))
    summary = _SUMMARY.search(text)
    if not stats or not summary:
        raise DeviceToolError("benchmark_model printed no timing summary"
                              + (f" (last line: {text.strip().splitlines()[-1][:160]})" if text.strip() else ""))
    fields = {k: float(v) * 1e-3 for k, v in re.findall(rf"(\w+)={_NUM}", stats[-1].group(2))}
    init, first, warm, avg = (float(summary.group(i)) * 1e-3 for i in range(1, 5))
    out = {"count": int(stats[-1].group(1)), "first_ms": first, "timed_first_ms": fields.get("first"),
           "min_ms": fields.get("min"), "max_ms": fields.get("max"), "mean_ms": fields.get("avg", avg),
           "std_ms": fields.get("std"), "p5_ms": fields.get("p5"), "median_ms": fields.get("median"),
           "p95_ms": fields.get("p95"), "init_ms": init, "warmup_mean_ms": warm,
           "warmup_count": int(stats[0].group(1)) if len(stats) > 1 else None}
    mem = _MEMORY.search(text)
    out["memory_mb"] = {"init": float(mem.group(1)), "overall": float(mem.group(2))} if mem else None
    deleg = _DELEGATE.search(text)
    out["delegate"] = ({"name": deleg.group(3), "nodes": int(deleg.group(1)), "of": int(deleg.group(2))}
                       if deleg else None)
    return out


def phone_bench(shell: Callable[[str], str], tool: str, model: str, threads: int, runs: int, warmup: int,
                rounds: int, extra: str = "") -> dict:
    """One run of the tool: its own statistics (``rounds`` unused: it reports no per-run samples)."""
    parsed = parse_phone_output(shell(phone_command(tool, model, threads, runs, warmup, extra)))
    latency = {"p50": parsed["median_ms"], "p90": None, "p95": parsed["p95_ms"], "p99": None,
               "mean": parsed["mean_ms"], "std": parsed["std_ms"], "min": parsed["min_ms"], "max": parsed["max_ms"]}
    peak = int(parsed["memory_mb"]["overall"] * 2**20) if parsed["memory_mb"] else None
    return {"first_ms": parsed["first_ms"], "load_ms": parsed["init_ms"], "latency_ms": latency, "samples_ms": [],
            "iterations": parsed["count"], "peak_rss_bytes": peak, "facts": parsed,
            "how": "the tool's own statistics, no per-run samples and no p90/p99"}
