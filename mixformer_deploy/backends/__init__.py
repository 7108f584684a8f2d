"""The registry of backends: one package per backend under this folder, plus any distribution that
declares an entry point in the group ``mixformer_deploy.backends`` (``name = "module:SPEC"``).

Each package's ``spec.py`` defines ``SPEC``, the backend's light facts (``spec.BackendSpec``); generic
code reads only specs. The exporter (``export.py``) and the runner (``runner.py``) are imported when
used, so running an artifact never imports an exporter. Nothing outside this folder branches on a
backend's name.
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
from importlib import metadata
from pathlib import Path

from ..errors import ArtifactError, UsageError
from .spec import BackendSpec

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "mixformer_deploy.backends"
ALIASES = {"trt": "tensorrt"}   # the spelling users type
# Display order: these first, then any other export target by name, then the runtimes that export nothing.
ORDER = ("onnx", "openvino", "tensorrt", "coreml", "executorch", "litert", "aoti")

__all__ = ["BackendSpec", "ENTRY_POINT_GROUP", "all_specs", "get_spec", "keys", "open_runner", "option_owners",
           "runner_class", "runtime_for", "runtime_keys", "spec_of_runtime"]


def _builtin_specs() -> list[BackendSpec]:
    specs = []
    for mod in pkgutil.iter_modules(__path__):
        if mod.ispkg:
            specs.append(importlib.import_module(f"{__name__}.{mod.name}.spec").SPEC)
    return specs


def _entry_point_specs() -> list[BackendSpec]:
    specs = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        spec = ep.load()
        spec = spec() if isinstance(spec, type) else spec
        if not isinstance(spec, BackendSpec):
            raise TypeError(f"entry point {ep.name} ({ep.value}) is not a BackendSpec")
        specs.append(spec)
    return specs


@functools.cache
def _registry() -> dict[str, BackendSpec]:
    found: dict[str, BackendSpec] = {}
    for spec in _builtin_specs() + _entry_point_specs():
        if spec.key in found:
            raise TypeError(f"two backends claim the key {spec.key!r}")
        found[spec.key] = spec
    rank = {k: i for i, k in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (not kv[1].exporter_name, rank.get(kv[0], len(ORDER)), kv[0])))


def all_specs(exporting: bool = False) -> list[BackendSpec]:
    """Every backend (``exporting``: only those that export artifacts, i.e. export targets)."""
    return [s for s in _registry().values() if s.exporter_name or not exporting]


def keys() -> list[str]:
    """The export targets' keys (the CLI's --target choices)."""
    return [s.key for s in all_specs(exporting=True)]


def get_spec(key: str) -> BackendSpec:
    key = ALIASES.get(key.lower(), key.lower())
    spec = _registry().get(key)
    if spec is None or not spec.exporter_name:
        aliases = ", ".join(f"{a} (= {k})" for a, k in ALIASES.items())
        raise UsageError(f"unknown target {key!r}: choose one of {', '.join(keys())}, {aliases}, "
                         "or all (export: every target)")
    return spec


def option_owners() -> dict:
    """Every export option by name -> (its declaration, the targets that take it)."""
    out: dict = {}
    for s in all_specs(exporting=True):
        for opt in s.options:
            out.setdefault(opt.name, (opt, []))[1].append(s.key)
    return out


def _runtimes() -> dict[str, BackendSpec]:
    return {rt: s for s in all_specs() for rt in s.runners}


def runtime_keys() -> list[str]:
    return list(_runtimes())


def spec_of_runtime(runtime: str) -> BackendSpec:
    spec = _runtimes().get(runtime)
    if spec is None:
        raise UsageError(f"unknown runtime {runtime!r}: choose one of {', '.join(runtime_keys())}")
    return spec


def runner_class(runtime: str):
    return spec_of_runtime(runtime).runner_class(runtime)


def runtime_for(artifact: str | Path) -> str:
    """The default runtime of an artifact: its backend's runtime (a weights file: torch)."""
    from ..artifact import target_of
    from ..checkpoints import SUFFIXES

    artifact = Path(artifact)
    if artifact.suffix.lower() in SUFFIXES and artifact.is_file():
        return "torch"
    spec = target_of(artifact)
    if spec is None:
        if not artifact.exists():
            raise ArtifactError(f"artifact not found: {artifact}")
        raise ArtifactError(f"{artifact.name}: not an artifact any target writes (no manifest, unknown suffix)")
    return spec.runtime_for(artifact)


def open_runner(artifact: str | Path, runtime: str = "auto", device: str = "cpu", threads: int | None = None,
                options: dict[str, str] | None = None):
    key = runtime_for(artifact) if runtime in (None, "auto") else runtime
    with spec_of_runtime(key).quietly(" runtime"):  # importing and loading print: library probes, banners
        cls = runner_class(key)
        return cls.load(artifact, device=cls.check_device(device), threads=threads,
                        options=cls.check_options(options))
