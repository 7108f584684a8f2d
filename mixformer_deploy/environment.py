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

from .backends import version_of

# key -> (pip distributions that provide it, first match wins; the extra that installs it)
_DISTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "torch": (("torch",), None),
    "onnx": (("onnx",), "onnx"),
    "onnxruntime": (("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"), "onnx"),
    "openvino": (("openvino",), "openvino"),
    "coreml": (("coremltools",), "coreml"),
    "tensorrt": (("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"), "tensorrt"),
    "executorch": (("executorch",), "executorch"),
    "litert": (("ai-edge-litert",), "litert"),
}
BACKENDS = tuple(_DISTS)


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

def _installed(key: str) -> tuple[str | None, str | None]:
    """(distribution, version) of the first installed distribution providing ``key``."""
    for dist in _DISTS[key][0]:
        v = version_of(dist)
        if v:
            return dist, v
    return None, None


def _entry(key: str, can_export, can_run, devices=(), note: str = "", missing_note: str = "") -> dict:
    dists, extra = _DISTS[key]
    dist, version = _installed(key)
    if not version:
        hint = f'pip install "mixformer-deploy[{extra}]"' if extra else f"pip install {dists[0]}"
        return {"key": key, "package": dists[0], "installed": False, "version": None,
                "can_export": False if can_export is not None else None,
                "can_run": False if can_run is not None else None, "devices": [],
                "note": f"not installed: {hint}" + (f"; {missing_note}" if missing_note else "")}
    return {"key": key, "package": dist, "installed": True, "version": version, "can_export": can_export,
            "can_run": can_run, "devices": list(devices), "note": note}


def _torch_entry() -> dict:
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # the package itself depends on torch; normally imported already
        except ImportError:
            return _entry("torch", False, False)
    devices, notes = ["cpu"], []
    try:
        if torch.cuda.is_available():
            devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        notes.append(f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            devices.append("mps")
    except Exception as e:  # a broken CUDA install must not break `info`
        notes.append(f"CUDA check failed: {type(e).__name__}")
    if devices == ["cpu"] and torch.version.cuda:
        notes.append("no CUDA GPU visible")
    return _entry("torch", True, True, devices, "; ".join(notes))


def _onnx_entry() -> dict:
    script = version_of("onnxscript")
    note = f"onnxscript {script} (dynamo exporter)" if script else "onnxscript missing: dynamo exporter unavailable"
    return _entry("onnx", True, None, (), f"format library; {note}")


def _onnxruntime_entry(probe: bool) -> dict:
    ort = sys.modules.get("onnxruntime")
    if ort is None and probe and _installed("onnxruntime")[1]:
        try:
            import onnxruntime as ort
        except Exception as e:
            return {**_entry("onnxruntime", None, False), "note": f"import failed: {type(e).__name__}: {e}"[:200]}
    if ort is None:
        return _entry("onnxruntime", None, True, ["CPUExecutionProvider"], "providers not probed")
    try:
        providers = list(ort.get_available_providers())
    except Exception as e:
        return {**_entry("onnxruntime", None, False), "note": f"provider query failed: {type(e).__name__}"}
    gpu = [p for p in providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    note = "" if not gpu or cuda_available() else "GPU providers present but no CUDA GPU visible"
    return _entry("onnxruntime", None, bool(providers), providers, note)


def _openvino_entry(probe: bool) -> dict:
    nncf = version_of("nncf")
    notes = [f"nncf {nncf} (int8)" if nncf else "nncf missing: no int8"]
    arch_ok = platform.machine().lower() in ("x86_64", "amd64", "arm64", "aarch64")
    devices: list[str] = ["CPU"] if arch_ok else []
    if probe and _installed("openvino")[1]:
        try:
            import openvino as ov
            devices = list(ov.Core().available_devices)
        except Exception as e:
            notes.append(f"device query failed: {type(e).__name__}")
    elif arch_ok:
        notes.append("devices not probed")
    if not arch_ok:
        notes.append(f"no CPU plugin for {platform.machine()}")
    return _entry("openvino", True, bool(devices), devices, "; ".join(notes))


def _coreml_entry() -> dict:
    mac = sys.platform == "darwin"
    note = "prediction runs on macOS" if mac else "conversion only: prediction needs macOS"
    return _entry("coreml", True, mac, ["ALL"] if mac else [], note, missing_note="" if mac else note)


def _tensorrt_entry() -> dict:
    gpu = cuda_available()
    note = "" if gpu else "needs an NVIDIA CUDA GPU; none visible here"
    return _entry("tensorrt", gpu, gpu, ["cuda"] if gpu else [], note, missing_note=note)


def _executorch_entry() -> dict:
    return _entry("executorch", True, True, ["cpu (XNNPACK)"])


def _litert_entry() -> dict:
    conv_dist, conv = next(((d, version_of(d)) for d in ("litert-torch", "ai-edge-torch") if version_of(d)),
                           ("litert-torch", None))
    note = f"converter {conv_dist} {conv}" if conv else 'converter litert-torch missing: pip install "mixformer-deploy[litert]"'
    entry = _entry("litert", bool(conv), True, ["cpu"], note,
                   missing_note=f"converter {conv_dist} {conv} installed" if conv else "")
    if conv and not entry["installed"]:  # the converter alone can still write .tflite files
        entry["can_export"] = True
    return entry


def backends_status(probe: bool = False) -> dict[str, dict]:
    """Each backend: installed, version, whether it can export and run here, on which devices.

    Versions come from package metadata. ``probe=True`` also imports onnxruntime and OpenVINO to list their
    execution providers / devices (slower); without it, a runtime already imported is asked anyway.
    """
    return {
        "torch": _torch_entry(),
        "onnx": _onnx_entry(),
        "onnxruntime": _onnxruntime_entry(probe),
        "openvino": _openvino_entry(probe),
        "coreml": _coreml_entry(),
        "tensorrt": _tensorrt_entry(),
        "executorch": _executorch_entry(),
        "litert": _litert_entry(),
    }
