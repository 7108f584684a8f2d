"""The table of runtimes. Modules are imported lazily so that a missing backend costs nothing.

Which runtime opens an artifact is the artifact's target's (``Target.runtime``), read from its manifest;
weights files are run by the torch runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..errors import ArtifactError, UsageError
from .base import Runner, parse_runtime_options

# key -> (module, class name)
RUNTIMES: dict[str, tuple[str, str]] = {
    "torch": ("torch_runner", "TorchRunner"),
    "onnxruntime": ("onnxruntime_runner", "OnnxRuntimeRunner"),
    "openvino": ("openvino_runner", "OpenVinoRunner"),
    "tensorrt": ("tensorrt_runner", "TensorRtRunner"),
    "coreml": ("coreml_runner", "CoreMlRunner"),
    "executorch": ("executorch_runner", "ExecuTorchRunner"),
    "litert": ("litert_runner", "LiteRtRunner"),
    "aoti": ("aoti_runner", "AotiRunner"),
}

__all__ = ["RUNTIMES", "Runner", "built", "keys", "open_runner", "parse_runtime_options", "runner_class", "runtime_for"]


def built(key: str) -> bool:
    """Whether a runtime's module exists (a row may name a runtime that is still being built)."""
    return importlib.util.find_spec(f"{__name__}.{RUNTIMES[key][0]}") is not None


def keys() -> list[str]:
    return [k for k in RUNTIMES if built(k)]


def runner_class(key: str) -> type[Runner]:
    if key not in RUNTIMES or not built(key):
        raise UsageError(f"unknown runtime {key!r}: choose one of {', '.join(keys())}")
    module, cls = RUNTIMES[key]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def runtime_for(artifact: str | Path) -> str:
    """The default runtime of an artifact: its target's runtime (a weights file: torch)."""
    from ..artifact import target_of
    from ..checkpoints import SUFFIXES

    artifact = Path(artifact)
    if artifact.suffix.lower() in SUFFIXES and artifact.is_file():
        return "torch"
    target = target_of(artifact)
    if target is None:
        if not artifact.exists():
            raise ArtifactError(f"artifact not found: {artifact}")
        raise ArtifactError(f"{artifact.name}: not an artifact any target writes (no manifest, unknown suffix)")
    return target.runtime_for(artifact)


def open_runner(artifact: str | Path, runtime: str = "auto", device: str = "cpu", threads: int | None = None,
                options: dict[str, str] | None = None) -> Runner:
    key = runtime_for(artifact) if runtime in (None, "auto") else runtime
    cls = runner_class(key)
    return cls.load(artifact, device=device, threads=threads, options=cls.check_options(options))
