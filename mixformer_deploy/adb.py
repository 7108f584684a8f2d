"""Benchmarks on Android phones over adb, with each runtime's own benchmark tool.

``bench_on_device`` pushes an artifact and the runtime's benchmark binary (ExecuTorch's
``executor_runner`` built with the XNNPACK backend for a `.pte`, LiteRT's ``benchmark_model`` for a
`.tflite`) to the device, runs it there, and parses its output into a ``mixformer-deploy/bench/1``
document whose machine is the phone (its SoC and model from ``getprop``), so ``report`` shows phones
beside CPUs and GPUs. Timing is the tool's own, on the phone's clock:

- ``benchmark_model``: one run with ``--warmup_runs`` and ``--num_runs``; its statistics line gives count,
  first, min, max, avg, std and (newer builds) p5 / median / p95 in microseconds. It reports no per-run
  samples, so ``samples_ms`` is empty and p90/p99 are null. First inference is the summary line's
  "First inference" (the cold first run, before warm-up), load time its "Init".
- ``executor_runner``: it reports only the total time of ``--num_executions`` runs ("Model executed
  successfully N time(s) in T ms."), so it runs once with one execution (the first inference), once with
  ``warmup`` executions (discarded) and then ``rounds`` times; each round's mean is one sample. It reports
  no load time (null). That line is an ET_LOG line: a build without EXECUTORCH_ENABLE_LOGGING (upstream's
  default for Release) prints nothing to parse, which is a DeviceToolError (exit 5).

The parsers are pure functions over the tools' text output (tests/data/adb holds samples in the formats
their documentation shows). Missing ``adb`` or a device that is not attached: MissingBackendError (exit 3).
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from .errors import ArtifactError, InputFileError, MissingBackendError, MixformerDeployError, UsageError

REMOTE_DIR = "/data/local/tmp/mixformer-deploy"
TOOLS = {"executorch": "executor_runner", "litert": "benchmark_model"}

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_ET_RUN = re.compile(rf"Model executed successfully (\d+) time\(s\) in {_NUM} ms")
_ET_FAIL = re.compile(r"(Execution of method \S+ failed[^\n]*|Failed to parse model file[^\n]*|"
                      r"Loading of method \S+ failed[^\n]*)")
_ET_LOG = re.compile(r"^[DIWEF] [\d:.]+ executorch:", re.M)
_LITERT_STATS = re.compile(r"count=(\d+)((?:\s+\w+=" + _NUM + r")+)")
_LITERT_SUMMARY = re.compile(rf"Inference timings in us: Init: {_NUM}, First inference: {_NUM}, "
                             rf"Warmup \(avg\): {_NUM}, Inference \(avg\): {_NUM}")
_LITERT_MEMORY = re.compile(rf"(?:Peak memory footprint|Memory footprint delta from the start of the tool) "
                            rf"\(MB\): init={_NUM} overall={_NUM}")
_LITERT_DELEGATE = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \((\w+)\)")


class DeviceToolError(MixformerDeployError):
    """The benchmark tool ran on the device but failed or printed nothing we can read."""
    exit_code = 5


# ---------------------------------------------------------------- parsers (pure)

def parse_executor_runner(text: str) -> dict:
    """executor_runner's log -> {"runs": N, "total_ms": T, "mean_ms": T / N}."""
    m = _ET_RUN.search(text)
    if not m:
        fail = _ET_FAIL.search(text)
        silent = "" if fail or _ET_LOG.search(text) else (
            " (it printed no ET_LOG line: build executor_runner with -DEXECUTORCH_ENABLE_LOGGING=ON or the "
            "android preset; Release builds log nothing by default)")
        raise DeviceToolError("executor_runner did not report a successful run"
                              + (f": {fail.group(1).strip()}" if fail else "") + silent)
    runs, total = int(m.group(1)), float(m.group(2))
    if runs < 1:
        raise DeviceToolError("executor_runner reported 0 runs")
    return {"runs": runs, "total_ms": total, "mean_ms": total / runs}


def parse_benchmark_model(text: str) -> dict:
    """benchmark_model's output -> statistics of the timed runs in ms (the last ``count=`` line is the
    timed one, the first the warm-up), the summary line, memory and delegation. ``first_ms`` is the
    summary's "First inference" (cold); ``timed_first_ms`` the first of the timed runs."""
    stats = list(_LITERT_STATS.finditer(text))
    summary = _LITERT_SUMMARY.search(text)
    if not stats or not summary:
        raise DeviceToolError("benchmark_model printed no timing summary"
                              + (f" (last line: {text.strip().splitlines()[-1][:160]})" if text.strip() else ""))
    fields = {k: float(v) for k, v in re.findall(rf"(\w+)={_NUM}", stats[-1].group(2))}
    us = 1e-3
    out = {"count": int(stats[-1].group(1)),
           "first_ms": float(summary.group(2)) * us,
           "timed_first_ms": fields["first"] * us if "first" in fields else None,
           "min_ms": fields["min"] * us if "min" in fields else None,
           "max_ms": fields["max"] * us if "max" in fields else None,
           "mean_ms": fields.get("avg", float(summary.group(4))) * us,
           "std_ms": fields["std"] * us if "std" in fields else None,
           "p5_ms": fields["p5"] * us if "p5" in fields else None,
           "median_ms": fields["median"] * us if "median" in fields else None,
           "p95_ms": fields["p95"] * us if "p95" in fields else None,
           "init_ms": float(summary.group(1)) * us, "warmup_mean_ms": float(summary.group(3)) * us,
           "warmup_count": int(stats[0].group(1)) if len(stats) > 1 else None}
    mem = _LITERT_MEMORY.search(text)
    out["memory_mb"] = {"init": float(mem.group(1)), "overall": float(mem.group(2))} if mem else None
    deleg = _LITERT_DELEGATE.search(text)
    out["delegate"] = ({"name": deleg.group(3), "nodes": int(deleg.group(1)), "of": int(deleg.group(2))}
                       if deleg else None)
    return out


# ---------------------------------------------------------------- adb

def find_adb(adb: str | None = None) -> str:
    path = shutil.which(adb or "adb")
    if not path:
        raise MissingBackendError(f"{adb or 'adb'} not found: install the Android platform tools "
                                  "(https://developer.android.com/tools/releases/platform-tools) and put adb on PATH")
    return path


class Adb:
    """One attached device, through the adb client (every call a subprocess)."""

    def __init__(self, serial: str, adb: str | None = None, timeout_s: float = 600):
        self.exe, self.serial, self.timeout_s = find_adb(adb), serial, timeout_s
        state = self._run(["get-state"], check=False)
        if state.returncode != 0 or state.stdout.strip() != "device":
            why = (state.stderr or state.stdout).strip().splitlines()
            raise MissingBackendError(f"no Android device {serial!r} attached and authorized"
                                      + (f" ({why[-1][:160]})" if why else "") + ": see `adb devices`")

    def _run(self, args: list[str], check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run([self.exe, "-s", self.serial, *args], capture_output=True, text=True,
                                  timeout=timeout or self.timeout_s)
        except subprocess.TimeoutExpired as e:
            raise DeviceToolError(f"adb {' '.join(args[:2])} timed out after {e.timeout:.0f} s") from e
        except OSError as e:
            raise MissingBackendError(f"cannot run {self.exe}: {e}") from e
        if check and proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise DeviceToolError(f"adb {' '.join(args[:2])} failed: {msg[-1][:200] if msg else proc.returncode}")
        return proc

    def push(self, local: Path, remote: str) -> None:
        self._run(["push", str(local), remote])

    def shell(self, command: str, check: bool = True) -> str:
        proc = self._run(["shell", command], check=False)
        out = (proc.stdout or "") + (proc.stderr or "")
        if check and proc.returncode != 0:
            raise DeviceToolError(f"on the device: `{command[:80]}` exited {proc.returncode}: "
                                  f"{out.strip().splitlines()[-1][:200] if out.strip() else ''}")
        return out

    def prop(self, name: str) -> str:
        return self.shell(f"getprop {name}", check=False).strip()

    def describe(self) -> dict:
        soc = self.prop("ro.soc.model") or self.prop("ro.board.platform") or self.prop("ro.hardware")
        model = self.prop("ro.product.model")
        cores = self.shell("cat /sys/devices/system/cpu/present", check=False).strip()
        m = re.fullmatch(r"0-(\d+)", cores)
        return {"serial": self.serial, "model": model, "soc": soc, "abi": self.prop("ro.product.cpu.abi"),
                "android": self.prop("ro.build.version.release"), "cores": int(m.group(1)) + 1 if m else None}


# ---------------------------------------------------------------- the benchmark

def bench_on_device(artifact: str | Path, serial: str, benchmark_binary: str | Path, runs: int = 50,
                    threads: int = 2, warmup: int = 5, *, rounds: int = 10, adb: str | None = None,
                    remote_dir: str = REMOTE_DIR, timeout_s: float = 600, extra_args: tuple[str, ...] = ()) -> dict:
    """Run ``artifact`` on the device ``serial`` with the runtime's own benchmark tool and return a
    ``mixformer-deploy/bench/1`` document (one artifact, one result row; the machine is the phone)."""
    from .artifact import read_manifest, read_sidecar, size_bytes, target_of

    artifact, binary = Path(artifact), Path(benchmark_binary)
    if runs < 1 or threads < 1 or warmup < 0 or rounds < 1:
        raise UsageError("runs, threads and rounds must be >= 1 and warmup >= 0")
    if not artifact.exists():
        raise ArtifactError(f"artifact not found: {artifact}")
    target = target_of(artifact)
    if target is None or target.key not in TOOLS:
        raise UsageError(f"{artifact.name}: phones run executorch (.pte) or litert (.tflite) artifacts over adb")
    if not binary.is_file():
        raise InputFileError(f"benchmark binary not found: {binary} (build {TOOLS[target.key]} for the phone's ABI)")
    manifest = read_sidecar(artifact) or read_manifest(artifact)  # the sidecar first: no runtime needed
    dev = Adb(serial, adb, timeout_s)
    remote_model = f"{remote_dir}/{artifact.name}"
    remote_tool = f"{remote_dir}/{binary.name}"
    dev.shell(f"mkdir -p {shlex.quote(remote_dir)}")
    dev.push(artifact, remote_model)
    dev.push(binary, remote_tool)
    dev.shell(f"chmod 755 {shlex.quote(remote_tool)}")
    extra = " ".join(shlex.quote(a) for a in extra_args)
    if target.key == "litert":
        out = dev.shell(f"{shlex.quote(remote_tool)} --graph={shlex.quote(remote_model)} --num_threads={threads} "
                        f"--warmup_runs={warmup} --num_runs={runs} --use_xnnpack=true {extra}".strip(), check=False)
        parsed = parse_benchmark_model(out)
        samples, first = [], parsed["first_ms"]
        lat = {"p50": parsed["median_ms"], "p90": None, "p95": parsed["p95_ms"], "p99": None,
               "mean": parsed["mean_ms"], "std": parsed["std_ms"], "min": parsed["min_ms"], "max": parsed["max_ms"]}
        iterations, tool_facts = parsed["count"], parsed
        peak = int(parsed["memory_mb"]["overall"] * 2**20) if parsed["memory_mb"] else None
        load_ms = parsed["init_ms"]
    else:
        per_round = max(1, math.ceil(runs / rounds))
        cmd = (f"{shlex.quote(remote_tool)} --model_path={shlex.quote(remote_model)} --cpu_threads={threads} "
               f"{extra}").strip()
        first = parse_executor_runner(dev.shell(f"{cmd} --num_executions=1", check=False))["mean_ms"]
        if warmup > 0:
            parse_executor_runner(dev.shell(f"{cmd} --num_executions={warmup}", check=False))
        samples = [parse_executor_runner(dev.shell(f"{cmd} --num_executions={per_round}", check=False))["mean_ms"]
                   for _ in range(math.ceil(runs / per_round))]
        from .bench import latency_stats
        lat = latency_stats(samples)
        lat.pop("cv")
        iterations, tool_facts, peak, load_ms = len(samples) * per_round, {"executions_per_sample": per_round}, None, None
    dev.shell(f"rm -f {shlex.quote(remote_model)}", check=False)
    return _document(artifact, manifest, target, dev.describe(), threads, lat, samples, iterations, first,
                     load_ms, peak, size_bytes(artifact), {"tool": TOOLS[target.key], "binary": binary.name,
                                                           "runs": runs, "warmup": warmup, **tool_facts})


def _document(artifact, manifest, target, device, threads, lat, samples, iterations, first_ms, load_ms, peak,
              size, tool) -> dict:
    from . import __version__
    from .manifest import now_iso
    from .reports.bench_json import SCHEMA, fingerprint

    cpu = " ".join(p for p in (device.get("soc"), f"({device['model']})" if device.get("model") else None) if p) \
        or f"android device {device['serial']}"
    env = {"cpu_model": cpu, "cores": device.get("cores"), "physical_cores": None, "threads": threads,
           "memory_bytes": None, "gpu": None, "os": f"Android {device.get('android') or '?'} ({device.get('abi')})",
           "python": None, "backends": {target.key: (manifest.get("versions") or {}).get(
               "executorch" if target.key == "executorch" else "ai-edge-litert")},
           "tool_version": __version__, "device": f"adb:{device['serial']}", "adb_device": device}
    input_size = manifest.get("input_size")
    batch = manifest.get("batch") or 1
    mean = lat.get("mean")
    std = lat.get("std")
    row = {"artifact": artifact.name, "index": 0, "role": "artifact", "runtime": target.runtime,
           "device": env["device"], "precision": manifest.get("precision"), "form": None,
           "variant": manifest.get("variant"), "input_size": input_size, "batch": batch, "threads": threads,
           "first_inference_ms": first_ms, "iterations": iterations, "latency_ms": lat,
           "cv": (std / mean) if (std is not None and mean) else None,
           "throughput_ips": batch * 1000.0 / mean if mean else None, "peak_rss_bytes": peak,
           "peak_device_memory_bytes": None, "ratio_to_first": 1.0, "ratio_to_reference": None, "floor_ms": None,
           "floor_fraction": None, "warnings": [], "samples_ms": [round(s, 5) for s in samples], "tool": tool}
    weights = manifest.get("weights") or {}
    art = {"name": artifact.name, "index": 0, "role": "artifact", "path": str(artifact), "runtime": target.runtime,
           "device": env["device"], "threads": threads, "precision": manifest.get("precision"), "form": None,
           "size_bytes": size, "load_ms": load_ms, "rss_before_load_bytes": None, "peak_rss_bytes": peak,
           "peak_device_memory_bytes": None, "macs_per_image": None, "runner": {"tool": tool["tool"]},
           "manifest": {"target": target.key, "variant": manifest.get("variant"), "input_size": input_size,
                        "precision": manifest.get("precision"), "batch": manifest.get("batch"),
                        "num_classes": manifest.get("num_classes"), "weights_sha256": weights.get("sha256"),
                        "seed": manifest.get("seed")}}
    settings = {"device": env["device"], "threads": threads, "timer": f"{tool['tool']} on the device",
                "runs": tool["runs"], "warmup": tool["warmup"], "batches": [batch], "inputs": "the tool's own"}
    how = (f"each sample is the mean of {tool['executions_per_sample']} executions in one process"
           if "executions_per_sample" in tool else "the tool's own statistics, no per-run samples and no p90/p99")
    notes = [f"timed on {cpu} over adb by {tool['tool']}: {how}; x86 timings of the same artifact are not comparable"]
    machine = fingerprint(env)
    machine["slug"] = machine["slug"].replace("-Nonec-", "-")  # core count unknown
    return {"schema": SCHEMA, "created": now_iso(), "tool": {"name": "mixformer-deploy", "version": __version__},
            "machine": machine, "environment": env, "settings": settings, "floor": None,
            "artifacts": [art], "results": [row], "skipped": [], "warnings": notes}
