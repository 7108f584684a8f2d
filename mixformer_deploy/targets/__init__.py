"""The table of targets. Nothing outside this table branches on a format name.

A new target is one row here (key -> module, class), one module in this package, one runner in
``runtimes/``, one extra in pyproject.toml and one test file.
"""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import UsageError
from .base import Calibration, ExportOptions, Target, TargetOption, Tolerance

# key -> (module, class). `trt` is the spelling users type for tensorrt.
TARGETS: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "OnnxTarget"),
    "openvino": ("openvino", "OpenVinoTarget"),
    "tensorrt": ("tensorrt", "TensorRtTarget"),
    "coreml": ("coreml", "CoreMlTarget"),
    "executorch": ("executorch", "ExecuTorchTarget"),
    "litert": ("litert", "LiteRtTarget"),
    "aoti": ("aoti", "AotiTarget"),
}
ALIASES = {"trt": "tensorrt"}

__all__ = ["Calibration", "ExportOptions", "Target", "TargetOption", "Tolerance", "TARGETS", "all_targets",
           "built", "get_target", "keys", "option_owners"]


def built(key: str) -> bool:
    """Whether a target's module exists (a row may name a target that is still being built)."""
    return importlib.util.find_spec(f"{__name__}.{TARGETS[key][0]}") is not None


def keys() -> list[str]:
    return [k for k in TARGETS if built(k)]


def get_target(key: str) -> Target:
    key = ALIASES.get(key.lower(), key.lower())
    if key not in TARGETS or not built(key):
        planned = f" ({key} is not built yet)" if key in TARGETS else ""
        raise UsageError(f"unknown target {key!r}{planned}: choose one of {', '.join(keys())}")
    module, cls = TARGETS[key]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


def all_targets() -> list[Target]:
    return [get_target(k) for k in keys()]


def option_owners() -> dict[str, tuple[TargetOption, list[str]]]:
    """Every target option by name -> (its declaration, the targets that take it)."""
    out: dict[str, tuple[TargetOption, list[str]]] = {}
    for t in all_targets():
        for opt in t.options:
            out.setdefault(opt.name, (opt, []))[1].append(t.key)
    return out
