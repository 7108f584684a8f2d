"""The one door to optional dependencies: import lazily, and name the extra to install when missing."""

from __future__ import annotations

import importlib
import sys
from importlib import metadata

from .errors import MissingBackendError


def require(module: str, extra: str):
    """Import ``module`` or raise MissingBackendError naming ``pip install "mixformer-deploy[extra]"``.
    The first import of a converter or runtime prints (library probes, deprecation notes, banners on file
    descriptor 2): captured, shown only with --debug."""
    from .quiet import captured

    try:
        if sys.modules.get(module) is not None:  # imported already: nothing to capture
            return sys.modules[module]
        with captured(f"import {module}"):
            return importlib.import_module(module)
    except ImportError as e:
        raise MissingBackendError(f"{module} is not installed: pip install \"mixformer-deploy[{extra}]\"") from e


def version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
