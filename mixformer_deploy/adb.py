"""Benchmarks on Android phones over adb, with each runtime's own benchmark tool.

``bench_on_device`` pushes an artifact and the runtime's benchmark binary to the device, has the
artifact's backend run the measurement there, and turns its timings into a ``mixformer-deploy/bench/1``
document whose machine is the phone (its SoC and model from ``getprop``), so ``report`` shows phones beside
CPUs and GPUs. Timing is the tool's own, on the phone's clock.

This module is the transport (push, shell) and the document. What a backend's tool is called, how it is
run and what its output means live in the backend (``spec.phone_bench`` names the binary; its package's
``phone.py`` has ``phone_bench(shell, ...)`` and the pure parser ``parse_phone_output``; tests/data/adb
holds output samples in the formats the tools' documentation shows). Missing ``adb`` or a device that is
not attached: MissingBackendError (exit 3); a tool that fails or prints nothing readable: DeviceToolError
(exit 5).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from .errors import ArtifactError, DeviceToolError, InputFileError, MissingBackendError, UsageError

REMOTE_DIR = "/data/local/tmp/mixformer-deploy"


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
    ``mixformer-deploy/bench/1`` document (one artifact, one result row; the machine is the phone).
    ``rounds``: for a tool that reports only totals, the number of processes whose means are the samples."""
    from .artifact import read_manifest, read_sidecar, size_bytes

    artifact, binary = Path(artifact), Path(benchmark_binary)
    if runs < 1 or threads < 1 or warmup < 0 or rounds < 1:
        raise UsageError("runs, threads and rounds must be >= 1 and warmup >= 0")
    spec = _phone_spec(artifact)
    if not binary.is_file():
        raise InputFileError(f"benchmark binary not found: {binary} (build {spec.phone_bench} for the phone's ABI)")
    manifest = read_sidecar(artifact) or read_manifest(artifact)  # the sidecar first: no runtime needed
    dev = Adb(serial, adb, timeout_s)
    remote_model = f"{remote_dir}/{artifact.name}"
    remote_tool = f"{remote_dir}/{binary.name}"
    dev.shell(f"mkdir -p {shlex.quote(remote_dir)}")
    dev.push(artifact, remote_model)
    dev.push(binary, remote_tool)
    dev.shell(f"chmod 755 {shlex.quote(remote_tool)}")
    phone = spec.phone()
    timing = phone.phone_bench(lambda command: dev.shell(command, check=False), remote_tool, remote_model,
                               threads=threads, runs=runs, warmup=warmup, rounds=rounds,
                               extra=" ".join(shlex.quote(a) for a in extra_args))
    dev.shell(f"rm -f {shlex.quote(remote_model)}", check=False)
    tool = {"tool": spec.phone_bench, "binary": binary.name, "runs": runs, "warmup": warmup, **timing["facts"]}
    runtime_version = (manifest.get("versions") or {}).get(phone.RUNTIME_DIST)
    return _document(artifact, manifest, spec, dev.describe(), threads, timing, size_bytes(artifact), tool,
                     runtime_version)


def _phone_spec(artifact: Path):
    """The spec of the backend that wrote ``artifact``, if it can be timed on a phone (else UsageError)."""
    from .artifact import target_of
    from .backends import all_specs

    if not artifact.exists():
        raise ArtifactError(f"artifact not found: {artifact}")
    spec = target_of(artifact)
    if spec is None or "phone_bench" not in spec.capabilities:
        phones = ", ".join(f"{s.key} ({s.suffix})" for s in all_specs() if "phone_bench" in s.capabilities)
        raise UsageError(f"{artifact.name}: phones run {phones} artifacts over adb")
    return spec


def _environment(device: dict, spec, threads: int, runtime_version: str | None) -> dict:
    from . import __version__

    cpu = " ".join(p for p in (device.get("soc"), f"({device['model']})" if device.get("model") else None) if p) \
        or f"android device {device['serial']}"
    return {"cpu_model": cpu, "cores": device.get("cores"), "physical_cores": None, "threads": threads,
            "memory_bytes": None, "gpu": None, "os": f"Android {device.get('android') or '?'} ({device.get('abi')})",
            "python": None, "backends": {spec.key: runtime_version}, "tool_version": __version__,
            "device": f"adb:{device['serial']}", "adb_device": device}


def _document(artifact, manifest, spec, device, threads, timing: dict, size, tool, runtime_version) -> dict:
    from . import __version__
    from .manifest import now_iso
    from .reports.bench_json import SCHEMA, fingerprint

    env = _environment(device, spec, threads, runtime_version)
    input_size, batch = manifest.get("input_size"), manifest.get("batch") or 1
    lat, peak = timing["latency_ms"], timing["peak_rss_bytes"]
    mean, std = lat.get("mean"), lat.get("std")
    common = {"index": 0, "role": "artifact", "runtime": spec.runtime, "device": env["device"], "threads": threads,
              "precision": manifest.get("precision"), "form": None, "peak_rss_bytes": peak,
              "peak_device_memory_bytes": None}
    row = {"artifact": artifact.name, **common, "variant": manifest.get("variant"), "input_size": input_size,
           "batch": batch, "first_inference_ms": timing["first_ms"], "iterations": timing["iterations"],
           "latency_ms": lat, "cv": (std / mean) if (std is not None and mean) else None,
           "throughput_ips": batch * 1000.0 / mean if mean else None, "ratio_to_first": 1.0,
           "ratio_to_reference": None, "floor_ms": None, "floor_fraction": None, "warnings": [],
           "samples_ms": [round(s, 5) for s in timing["samples_ms"]], "tool": tool}
    weights = manifest.get("weights") or {}
    art = {"name": artifact.name, **common, "path": str(artifact), "size_bytes": size, "load_ms": timing["load_ms"],
           "rss_before_load_bytes": None, "macs_per_image": None, "runner": {"tool": tool["tool"]},
           "manifest": {"target": spec.key, "variant": manifest.get("variant"), "input_size": input_size,
                        "precision": manifest.get("precision"), "batch": manifest.get("batch"),
                        "num_classes": manifest.get("num_classes"), "weights_sha256": weights.get("sha256"),
                        "seed": manifest.get("seed")}}
    settings = {"device": env["device"], "threads": threads, "timer": f"{tool['tool']} on the device",
                "runs": tool["runs"], "warmup": tool["warmup"], "batches": [batch], "inputs": "the tool's own"}
    notes = [f"timed on {env['cpu_model']} over adb by {tool['tool']}: {timing['how']}; x86 timings of the same "
             "artifact are not comparable"]
    machine = fingerprint(env)
    machine["slug"] = machine["slug"].replace("-Nonec-", "-")  # core count unknown
    return {"schema": SCHEMA, "created": now_iso(), "tool": {"name": "mixformer-deploy", "version": __version__},
            "machine": machine, "environment": env, "settings": settings, "floor": None,
            "artifacts": [art], "results": [row], "skipped": [], "warnings": notes}
