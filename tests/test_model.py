"""The PyTorch MixFormer against the official implementation: the fixture, the counts, the key names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mixformer_deploy.numerics import rel_l2  # noqa: F401 (tests import it from here)
import torch.nn.functional as F

from mixformer_deploy.checkpoints import load_checkpoint
from mixformer_deploy.model import check_input_size, count_macs, count_params, create_model
from mixformer_deploy.model.mixformer import window_partition, window_reverse
from mixformer_deploy.errors import UsageError

DATA = Path(__file__).parent / "data"
TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def official():
    ck = load_checkpoint(DATA / "tiny.pdparams")
    ref = dict(np.load(DATA / "tiny.npz"))
    with torch.no_grad():
        out = ck.model.forward_stages(torch.from_numpy(ref["input"]))
    return ck, ref, {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("ours, theirs", [("stem", "patch_embed"), ("stage0", "stage0"), ("stage1", "stage1"),
                                          ("stage2", "stage2"), ("stage3", "stage3"), ("features", "features"),
                                          ("logits", "logits")])
def test_official_fixture_per_stage(official, ours, theirs):
    _, ref, out = official
    assert out[ours].shape == ref[theirs].shape
    assert rel_l2(out[ours], ref[theirs]) < 1e-5


def test_official_fixture_config(official):
    ck, ref, out = official
    cfg = ck.config
    assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.num_classes) == (16, (1, 1, 2, 1), (1, 2, 4, 8), 10)
    assert cfg.name == "custom" and ck.format == "paddle"
    assert count_params(ck.model) == 545_936  # tiny.json: trainable parameters
    assert out["logits"].argmax() == ref["logits"].argmax()


# the paper's table at 224x224, 1000 classes: (params M, GMACs)
OFFICIAL_COUNTS = {"B0": (5.10, 0.40), "B1": (7.89, 0.70), "B2": (9.89, 0.90), "B3": (16.75, 1.80),
                   "B4": (34.80, 3.48)}


@pytest.mark.parametrize("variant", list(OFFICIAL_COUNTS))
def test_parameter_counts(variant):
    model = create_model(variant, 1000)
    assert round(count_params(model) / 1e6, 2) == OFFICIAL_COUNTS[variant][0]


@pytest.mark.parametrize("variant", list(OFFICIAL_COUNTS))
def test_multiply_add_counts(variant):
    model = create_model(variant, 1000)
    assert round(count_macs(model, 224, 224) / 1e9, 2) == OFFICIAL_COUNTS[variant][1]


def test_official_b1_key_names_and_shapes():
    official = {}
    for line in (DATA / "keys_B1.txt").read_text().splitlines():
        if not line.strip():
            continue
        name, shape, dtype = line.split("\t")
        official[name] = (tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), dtype)

    def to_paddle(name: str, t: torch.Tensor):
        name = name.replace(".running_mean", "._mean").replace(".running_var", "._variance")
        shape = tuple(t.shape)
        if name.endswith(".weight") and t.ndim == 2:  # Paddle stores Linear weights [in, out]
            shape = shape[::-1]
        return name, (shape, str(t.dtype).removeprefix("torch."))

    ours = dict(to_paddle(k, v) for k, v in create_model("B1", 1000).state_dict().items()
                if not k.endswith("num_batches_tracked"))
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    assert len(ours) == 826


# ---------------------------------------------------------------- windows that need padding

@pytest.fixture(scope="module")
def tiny_model():
    model = create_model("custom", 10, seed=0, **TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move norms and statistics off their initial values
        for name, t in model.state_dict().items():
            if t.is_floating_point() and ("norm" in name or "running" in name or name.endswith(".bias")):
                t.copy_(t + 0.2 * torch.rand(t.shape, generator=g))
    return model


@pytest.mark.parametrize("size", [(96, 64), (160, 96)])
def test_padded_windows_batch_consistent(tiny_model, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        both = tiny_model(x)
        alone = torch.cat([tiny_model(x[:1]), tiny_model(x[1:])])
    assert both.shape == (2, 10) and torch.isfinite(both).all()
    assert rel_l2(both, alone) < 1e-5


def test_padded_block_matches_manual(tiny_model):
    """A 24x16 map pads to 28x21 with zeros at the right and bottom, unmasked, and is cropped back."""
    blk = tiny_model.layers[0].blocks[0]
    H, W, C = 24, 16, 16
    torch.manual_seed(0)
    x = torch.randn(2, H * W, C)
    with torch.no_grad():
        got = blk(x, H, W)
        n = F.pad(blk.norm1(x).reshape(2, H, W, C), (0, 0, 0, 5, 0, 4))
        mixed = blk.attn(window_partition(n, 7).reshape(-1, 49, C), 28, 21).reshape(-1, 7, 7, C)
        y = x + window_reverse(mixed, 7, 28, 21)[:, :H, :W].reshape(2, H * W, C)
        want = y + blk.mlp(blk.norm2(y))
    assert rel_l2(got, want) < 1e-6


def test_input_side_must_be_multiple_of_32(tiny_model):
    check_input_size(tiny_model.cfg, 96, 64)
    for h, w in [(100, 100), (224, 200), (0, 32)]:
        with pytest.raises(UsageError, match="multiple of 32"):
            check_input_size(tiny_model.cfg, h, w)
