"""The conformance suite: each contract of an export target written once, parametrized over the registry
(``all_specs(exporting=True)``) by capability. A backend whose package is missing skips, and under ``CI``
fails: a broken install never passes as skips. What cannot run on this machine (a TensorRT engine, Core
ML prediction off macOS) is covered up to what runs here, and the skip says why.

Each backend is exported once per session (``exported``) and the artifact is shared by every contract that
only reads it; contracts that need another export (a second one, another precision, a backbone) make it
themselves, and those of the costly backends (``Plan.costly``) are marked slow.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Re-exported, so that ``from conftest import DATA`` works whichever conftest pytest loaded last (see
# SHARED in tests/conftest.py); tests/conftest.py registers itself as ``tests_conftest``.
from tests_conftest import DATA, SHARED, TINY, WEIGHTS, CliResult, invoke_cli, rel_l2, run_cli  # noqa: F401

from mixformer_deploy.backends import all_specs
from mixformer_deploy.backends.spec import BackendSpec

assert set(SHARED) <= set(globals()), "re-export every name of tests/conftest.py's SHARED"

EPOCH = "1700000000"   # SOURCE_DATE_EPOCH of every export here: the reproducibility contract compares bytes

# Two stages, 64-wide head: what the backends that compile or lower per block get instead of TINY.
MICRO = dict(num_classes=10, embed_dim=16, depths=(1, 1), num_heads=(1, 2), head_dim=64)


@dataclass(frozen=True)
class Plan:
    """How the suite exports one backend. ``config``: the tiny config (None: TINY, the official fixture
    weights) and ``why`` another; ``costly``: a second export of it belongs to the slow run."""

    config: dict | None = None
    size: int = 64                     # OpenVINO 2026.4 segfaults compiling TINY at 32x32; 64 runs everywhere
    target_options: dict = field(default_factory=dict)
    costly: bool = False
    why: str = ""
    threads_shape_bytes: str = ""      # why the thread count the export runs with is part of the artifact


PLANS = {
    "tensorrt": Plan(target_options={"onnx_only": True},
                     why="an engine needs TensorRT and an NVIDIA GPU: the TensorRT-ready ONNX is what runs here"),
    "coreml": Plan(costly=True),        # a coremltools conversion: ~8 s on 2 cores
    "executorch": Plan(config=MICRO, size=32, costly=True,
                       why="XNNPACK lowering costs per block: two stages halve it"),
    "litert": Plan(config=MICRO, size=32, costly=True, why="the MLIR lowering costs per block: two stages halve it"),
    "aoti": Plan(config=MICRO, size=32, costly=True,
                 why="a C++ compile per kernel (~25 s on 2 cores for TINY): two stages halve it",
                 threads_shape_bytes="Inductor generates the kernels' C++ for the thread count it compiles with"),
}


def plan_of(spec: BackendSpec) -> Plan:
    return PLANS.get(spec.key, Plan())


def _marks(spec: BackendSpec, slow: bool) -> list:
    marks = [getattr(pytest.mark, spec.key)] if spec.key.isidentifier() else []
    return marks + [pytest.mark.slow] if slow else marks


def costly(spec: BackendSpec) -> bool:
    return plan_of(spec).costly


def backends(*capabilities: str, slow=None, where=None) -> list:
    """pytest params of every export target with all ``capabilities`` (and ``where(spec)``), id its key,
    marked with its key; those for which ``slow(spec)`` marked slow too."""
    out = []
    for spec in all_specs(exporting=True):
        if not set(capabilities) <= set(spec.capabilities) or (where and not where(spec)):
            continue
        out.append(pytest.param(spec, id=spec.key, marks=_marks(spec, bool(slow and slow(spec)))))
    return out or [pytest.param(None, id="none", marks=pytest.mark.skip(reason=f"no backend has {capabilities}"))]


def selected(request, test: str) -> list[BackendSpec]:
    """The backends this run selected for ``test`` (a fixture that serves them all at once, in one process,
    makes only what will be asked for)."""
    specs = {}
    for item in request.session.items:
        spec = getattr(item, "callspec", None) and item.callspec.params.get("spec")
        if item.originalname == test and spec is not None:
            specs[spec.key] = spec
    return list(specs.values())


def exports_here(spec: BackendSpec, exported) -> bool:
    """Whether the session's export of ``spec`` exists (a backend that cannot export: its test says why)."""
    try:
        exported(spec)
        return True
    except (Exception, pytest.skip.Exception, pytest.fail.Exception):
        return False


def missing(reason: str):
    """A missing package: skip here, fail under CI (a broken install never passes as skips)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


def needs_export(spec: BackendSpec) -> None:
    status = spec.status()
    if not status.get("can_export"):
        missing(f"{spec.key} cannot export here: {status.get('note') or 'not installed'}")


def export_kwargs(spec: BackendSpec, weights_of, **changes) -> dict:
    """export()'s arguments for this backend's plan (weights, size, target options), with ``changes``."""
    plan = plan_of(spec)
    kwargs = dict(target=spec.key, img_size=plan.size, check=False, target_options=dict(plan.target_options) or None)
    kwargs.update(changes)
    return {"weights": weights_of(plan.config), **kwargs}


def export_here(spec: BackendSpec, weights_of, output: Path, **changes):
    """One export under SOURCE_DATE_EPOCH (so that any two give the same bytes)."""
    from mixformer_deploy.export_api import export

    needs_export(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", EPOCH)
        return export(output=output, **export_kwargs(spec, weights_of, **changes))


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_weights):
    """``exported(spec)`` -> the ExportResult of the backend's fp32 artifact, exported once per session
    (each into its own folder, nothing else there) with its plan. Read it, never change it: copy first."""
    done: dict[str, object] = {}

    def get(spec: BackendSpec):
        if spec.key not in done:
            needs_export(spec)
            try:
                done[spec.key] = export_here(spec, tiny_weights, tmp_path_factory.mktemp(f"export-{spec.key}"))
            except Exception as e:   # once: every contract that reads it fails with the same reason
                done[spec.key] = e
        result = done[spec.key]
        if isinstance(result, Exception):
            pytest.fail(f"{spec.key}: the export failed: {type(result).__name__}: {result}")
        return result

    return get


@pytest.fixture(scope="session")
def weights_of(tiny_weights):
    """``weights_of(spec)`` -> the weights file the backend's artifacts were exported from."""
    return lambda spec: tiny_weights(plan_of(spec).config)


def copy_artifact(path: Path, dst: Path) -> Path:
    """A copy of a file or directory artifact (without its sidecar)."""
    if path.is_dir():
        shutil.copytree(path, dst)
    else:
        shutil.copyfile(path, dst)
    return dst


def artifact_bytes(spec: BackendSpec, path: Path) -> dict[str, bytes]:
    """Every file of an artifact by its path inside it (a file artifact: one entry, '')."""
    path = Path(path)
    if not path.is_dir():
        return {"": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
