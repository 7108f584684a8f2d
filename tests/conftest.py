"""Shared fixtures: the official tiny model (fixture weights) and real photos, loaded once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mixformer_deploy.numerics import rel_l2  # noqa: F401 (tests import it from here)

DATA = Path(__file__).parent / "data"

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

    return load_checkpoint(DATA / "tiny.pdparams").model


@pytest.fixture(scope="session")
def photo_batches():
    """Real photos at 224x224 and at a size whose stage maps need padding (256x192)."""
    from mixformer_deploy.data import photos

    return {size: torch.from_numpy(photos(*size, names=("chelsea", "astronaut", "coffee"))[0])
            for size in ((224, 224), (256, 192))}
