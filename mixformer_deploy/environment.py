"""What this machine is and which backends can run on it, as plain JSON-ready dicts.

Used by ``mixformer-deploy info`` and recorded in every benchmark result. Both functions are quick
(versions come from package metadata, not imports) and never print or raise for a missing piece:
whatever cannot be found is ``None``.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


# ---------------------------------------------------------------- hardware

def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _cpu_model() -> str:
    info = _read("/proc/cpuinfo") or ""
    for field in ("model name", "Hardware", "Processor", "cpu model"):
        for line in info.splitlines():
            if line.split(":")[0].strip() == field and ":" in line:
                value = line.split(":", 1)[1].strip()
                if value:
                    return value
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=2).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores() -> int | None:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except Exception:  # psutil missing or unsupported platform
        pass
    cores, phys = set(), None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (Linux)."""
    line = (_read("/proc/stat") or "").partition("\n")[0].split()
    if len(line) < 5 or line[0] != "cpu":
        return None
    ticks = [int(v) for v in line[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)   # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def free_cpus_now(sample_s: float = 0.1) -> int:
    """The usable CPUs that other processes leave idle right now (a short /proc/stat sample, at least 1;
    all usable CPUs where it cannot be read). Why: a runtime whose threads spin-wait (OpenMP's active
    wait) on a core another process holds runs many times slower; the load average lags by a minute."""
    import time

    usable = _usable_cpus() or 1
    first = _cpu_jiffies()
    if first is None:
        return usable
    time.sleep(sample_s)
    second = _cpu_jiffies()
    total = (second[1] - first[1]) if second else 0
    if total <= 0:
        return usable
    busy = (second[0] - first[0]) / total * (os.cpu_count() or usable)
    return max(1, min(usable, int(usable - busy + 0.5)))


def _cgroup_cpu_quota() -> float | None:
    """CPUs granted by a cgroup v2 quota (containers), when one is set."""
    text = _read("/sys/fs/cgroup/cpu.max")
    if not text:
        return None
    quota, _, period = text.strip().partition(" ")
    try:
        return round(int(quota) / int(period), 2) if quota != "max" else None
    except ValueError:
        return None


def _memory_bytes() -> int | None:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except Exception:
        pass
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@functools.lru_cache(maxsize=1)
def _nvidia_smi() -> tuple[dict, ...]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else ():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            mem = int(parts[2]) * 2 ** 20 if parts[2].isdigit() else None
            gpus.append({"name": parts[0], "driver": parts[1], "memory_bytes": mem, "source": "nvidia-smi"})
    return tuple(gpus)


def _torch_cuda() -> list[dict]:
    """CUDA devices as torch sees them; only asked when torch is already imported (it is heavy)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_bytes": int(p.total_memory),
                         "compute_capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
                         "source": "torch"})
        return gpus
    except Exception:
        return []


def gpus() -> list[dict]:
    """NVIDIA GPUs: nvidia-smi's view (name, driver, memory), completed with torch's (capability, CUDA)."""
    smi = [dict(g) for g in _nvidia_smi()]
    tc = _torch_cuda()
    if not smi:
        return tc
    for g, t in zip(smi, tc):
        g.update({k: t[k] for k in ("compute_capability", "cuda")})
    return smi


def cuda_available() -> bool:
    """A CUDA GPU is usable from here (torch says so, or nvidia-smi lists one)."""
    return bool(_torch_cuda() or _nvidia_smi())


def hardware() -> dict:
    """CPU model, physical/logical/usable cores, memory, OS, Python and GPUs of this machine."""
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "physical_cores": _physical_cores(),
        "logical_cores": os.cpu_count(),
        "usable_cpus": _usable_cpus(),
        "cpu_quota": _cgroup_cpu_quota(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "gpus": gpus(),
    }


# ---------------------------------------------------------------- backends

def _rows() -> list[tuple[str, object, object]]:
    """(key, spec that exports under that key or None, runner class or None): one row per export target
    and per runtime, the reference runtime and ONNX's first."""
    from .backends import all_specs

    rows: dict[str, tuple] = {}
    for spec in all_specs():
        if spec.exporter_name:
            rows[spec.key] = (spec, spec.runner_class(spec.key) if spec.key in spec.runners else None)
        for rt in spec.runners:
            if rt != spec.key or not spec.exporter_name:
                rows[rt] = (None, spec.runner_class(rt))
    order = list(dict.fromkeys(["torch", "onnx", "onnxruntime", *rows]))
    return [(k, *rows[k]) for k in order if k in rows]


def backends_status(probe: bool = False) -> dict[str, dict]:
    """Each backend's export target and runtimes: installed, version, whether it can export and run here,
    on which devices. ``probe=True`` lets runtimes import themselves to list devices (slower)."""
    out: dict[str, dict] = {}
    for key, target, runner in _rows():
        try:
            run = runner.status(probe) if runner else None
        except Exception as e:  # a broken runtime install must not break `info`
            run = {"installed": False, "package": key, "version": None, "can_run": False, "devices": [],
                   "note": f"status check failed: {type(e).__name__}"}
        exp = target.status() if target else None
        base = run if run else exp  # the runtime is what users know a backend by (TensorRT, not its ONNX tools)
        notes = [n for n in ((exp or {}).get("note"), (run or {}).get("note")) if n]
        out[key] = {"key": key, "package": base["package"], "installed": bool(base["installed"]),
                    "version": base["version"], "can_export": exp["can_export"] if exp else None,
                    "can_run": run["can_run"] if run else None, "devices": (run or {}).get("devices", []),
                    "note": "; ".join(dict.fromkeys(notes))}
    return out
