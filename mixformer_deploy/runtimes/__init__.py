"""The table of runtimes. Modules are imported lazily so that a missing backend costs nothing."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import UsageError
from .base import Runner

# key -> (module, class name, artifact suffixes it opens)
RUNTIMES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "torch": ("torch_runner", "TorchRunner", (".safetensors", ".pt", ".pth", ".pdparams", ".ckpt", ".bin")),
    "onnxruntime": ("onnxruntime_runner", "OnnxRuntimeRunner", (".onnx",)),
}


def runner_class(key: str) -> type[Runner]:
    if key not in RUNTIMES:
        raise UsageError(f"unknown runtime {key!r}: choose one of {', '.join(RUNTIMES)}")
    module, cls, _ = RUNTIMES[key]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def runtime_for(artifact: str | Path) -> str:
    """The default runtime of an artifact, by its suffix."""
    suffix = Path(artifact).suffix.lower()
    for key, (_, _, suffixes) in RUNTIMES.items():
        if suffix in suffixes:
            return key
    raise UsageError(f"no runtime opens {suffix or 'files without a suffix'} artifacts "
                     f"({', '.join(s for *_, ss in RUNTIMES.values() for s in ss)})")


def open_runner(artifact: str | Path, runtime: str = "auto", device: str = "cpu", threads: int | None = None) -> Runner:
    key = runtime_for(artifact) if runtime in (None, "auto") else runtime
    return runner_class(key).load(artifact, device=device, threads=threads)
