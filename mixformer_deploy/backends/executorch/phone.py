"""ExecuTorch on a phone: ``executor_runner`` built with the XNNPACK backend, its command line and its output.

executor_runner reports only the total time of ``--num_executions`` runs ("Model executed successfully N
time(s) in T ms."), so the benchmark runs it once with one execution (the first inference), once with
``warmup`` executions (discarded) and then in rounds; each round's mean is one sample. It reports no load
time (null). That line is an ET_LOG line: a build without EXECUTORCH_ENABLE_LOGGING (upstream's default for
Release) prints nothing to parse, which is a DeviceToolError (exit 5).

The interface every backend's ``phone.py`` offers ``adb.bench_on_device``: ``phone_command`` (one run's
command line), ``parse_phone_output`` (one run's output, pure), ``phone_bench`` (the whole measurement
through a device shell) and ``RUNTIME_DIST`` (the distribution whose manifest version names the runtime).
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Callable

from ...errors import DeviceToolError

RUNTIME_DIST = "executorch"
_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_RUN = re.compile(rf"Model executed successfully (\d+) time\(s\) in {_NUM} ms")
_FAIL = re.compile(r"(Execution of method \S+ failed[^\n]*|Failed to parse model file[^\n]*|"
                   r"Loading of method \S+ failed[^\n]*)")
_LOG = re.compile(r"^[DIWEF] [\d:.]+ executorch:", re.M)


def phone_command(tool: str, model: str, threads: int, runs: int, warmup: int = 0, extra: str = "") -> str:
    """One process of ``runs`` executions (executor_runner has no warm-up of its own: ``warmup`` unused)."""
    return (f"{shlex.quote(tool)} --model_path={shlex.quote(model)} --cpu_threads={threads} {extra}".strip()
            + f" --num_executions={runs}")


def parse_phone_output(text: str) -> dict:
    """executor_runner's log -> {"runs": N, "total_ms": T, "mean_ms": T / N}."""
    m = _RUN.search(text)
    if not m:
        fail = _FAIL.search(text)
        silent = "" if fail or _LOG.search(text) else (
            " (it printed no ET_LOG line: build executor_runner with -DEXECUTORCH_ENABLE_LOGGING=ON or the "
            "android preset; Release builds log nothing by default)")
        raise DeviceToolError("executor_runner did not report a successful run"
                              + (f": {fail.group(1).strip()}" if fail else "") + silent)
    runs, total = int(m.group(1)), float(m.group(2))
    if runs < 1:
        raise DeviceToolError("executor_runner reported 0 runs")
    return {"runs": runs, "total_ms": total, "mean_ms": total / runs}


def phone_bench(shell: Callable[[str], str], tool: str, model: str, threads: int, runs: int, warmup: int,
                rounds: int, extra: str = "") -> dict:
    """The first inference (its own process), the warm-up, then about ``runs`` executions in ``rounds``
    processes: each round's mean is one sample."""
    from ...bench import latency_stats

    def timed(n: int) -> float:
        return parse_phone_output(shell(phone_command(tool, model, threads, n, extra=extra)))["mean_ms"]

    per_round = max(1, math.ceil(runs / rounds))
    first = timed(1)
    if warmup > 0:
        timed(warmup)
    samples = [timed(per_round) for _ in range(math.ceil(runs / per_round))]
    latency = latency_stats(samples)
    latency.pop("cv")
    return {"first_ms": first, "load_ms": None, "latency_ms": latency, "samples_ms": samples,
            "iterations": len(samples) * per_round, "peak_rss_bytes": None,
            "facts": {"executions_per_sample": per_round},
            "how": f"each sample is the mean of {per_round} executions in one process"}
