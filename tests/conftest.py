"""Shared fixtures: the official tiny model (fixture weights) and real photos, loaded once; weights of other
tiny configs; the CLI as a real subprocess and through Typer's CliRunner."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mixformer_deploy.numerics import rel_l2  # noqa: F401 (tests import it from here)

DATA = Path(__file__).parent / "data"
# The official fixture: PaddleClas's MixFormer at this config, every BN statistic, affine, bias and bias
# table randomized (tests/data/REFERENCE.md). Tests that build their own tiny model start from TINY.
WEIGHTS = DATA / "tiny.pdparams"
TINY = dict(num_classes=10, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))

# The names a test module may import from here. Every folder's conftest.py is imported as the module
# "conftest" and the last one loaded stays in sys.modules, so tests/conformance/conftest.py re-exports
# these: ``from conftest import DATA`` works whichever conftest was loaded last.
SHARED = ("DATA", "WEIGHTS", "TINY", "rel_l2", "CliResult", "run_cli", "invoke_cli")

# The test models are tiny: one thread avoids idle-thread spinning on a busy 2-core CI machine (10x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI's root callback points logging at CliRunner's stream, which closes after each call."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def official_tiny():
    """The official fixture's model: every BN statistic, affine, bias and bias table randomized."""
    from mixformer_deploy.checkpoints import load_checkpoint

    return load_checkpoint(WEIGHTS).model


@pytest.fixture(scope="session")
def photo_batches():
    """Real photos at 224x224 and at a size whose stage maps need padding (256x192)."""
    from mixformer_deploy.data import photos

    return {size: torch.from_numpy(photos(*size, names=("chelsea", "astronaut", "coffee"))[0])
            for size in ((224, 224), (256, 192))}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """``tiny_weights(config)`` -> a weights file of that tiny config: WEIGHTS (the official fixture) for
    TINY or None; for any other config, seeded-random weights saved once per session. A test that asks for
    another config says why (e.g. a compile that costs per stage)."""
    made: dict[str, Path] = {}

    def make(config: dict | None = None) -> Path:
        if config is None or config == TINY:
            return WEIGHTS
        key = json.dumps(config, sort_keys=True)
        if key not in made:
            from mixformer_deploy import create_model
            from mixformer_deploy.checkpoints import save_safetensors

            folder = tmp_path_factory.mktemp("tiny-weights")
            made[key] = save_safetensors(create_model("custom", **{"seed": 0, **config}),
                                         folder / "tiny.safetensors")
        return made[key]

    return make


# ---------------------------------------------------------------- the CLI

@dataclass
class CliResult:
    """One CLI run: exit code, stdout, stderr (the same whether it ran as a subprocess or in-process)."""

    code: int
    stdout: str
    stderr: str

    def error_line(self, code: int | None = None) -> str:
        """The contract's failure: exactly one stderr line, starting ``error: ``, no traceback."""
        lines = self.stderr.strip().splitlines()
        assert code is None or self.code == code, (self.code, self.stderr[-600:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (self.code, self.stderr[-600:])
        return lines[0]


def run_cli(*args, env: dict | None = None, timeout: float = 600, cwd: str | Path | None = None) -> CliResult:
    """``mixformer-deploy ARGS`` as users run it: a fresh interpreter (``python -m mixformer_deploy``), so
    exit codes, stderr and imports are the real process's. ``env`` is added to this process's environment."""
    r = subprocess.run([sys.executable, "-m", "mixformer_deploy", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})
    return CliResult(r.returncode, r.stdout, r.stderr)


def invoke_cli(*args) -> CliResult:
    """``mixformer-deploy ARGS`` in this process through Typer's CliRunner: no interpreter start-up (use it
    for many calls; use run_cli where the process itself matters)."""
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, [str(a) for a in args])
    return CliResult(r.exit_code, r.stdout, r.stderr)


@pytest.fixture(scope="session")
def cli():
    """The CLI as a real subprocess: ``cli(*args, env=...)`` -> CliResult."""
    return run_cli


@pytest.fixture(scope="session")
def cli_invoke():
    """The CLI in this process through Typer's CliRunner: ``cli_invoke(*args)`` -> CliResult."""
    return invoke_cli


# tests/conformance/conftest.py imports SHARED from here under this name (see SHARED)
sys.modules.setdefault("tests_conftest", sys.modules[__name__])
