"""The table of targets. Nothing outside this table branches on a format name."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import UsageError
from .base import ExportOptions, Target, Tolerance

# key -> (module, class). `trt` is the spelling users type for tensorrt.
TARGETS: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "OnnxTarget"),
}
ALIASES = {"trt": "tensorrt"}
PLANNED = ("openvino", "coreml", "tensorrt", "executorch", "litert")

__all__ = ["ExportOptions", "Target", "Tolerance", "TARGETS", "get_target", "target_for_file"]


def get_target(key: str) -> Target:
    key = ALIASES.get(key.lower(), key.lower())
    if key not in TARGETS:
        planned = f" ({key} is planned, not built yet)" if key in PLANNED else ""
        raise UsageError(f"unknown target {key!r}{planned}: choose one of {', '.join(TARGETS)}")
    module, cls = TARGETS[key]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


def target_for_file(path: str | Path) -> Target | None:
    suffix = Path(path).suffix.lower()
    for key in TARGETS:
        t = get_target(key)
        if t.suffix == suffix:
            return t
    return None
