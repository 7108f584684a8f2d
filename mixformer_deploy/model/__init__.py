"""The MixFormer architecture, its variant table and its counts."""

from __future__ import annotations

import torch

from ..errors import UsageError
from .flops import count_macs, count_params
from .mixformer import MixFormer
from .variants import VARIANTS, MixFormerConfig, name_of, variant_config

__all__ = ["MixFormer", "MixFormerConfig", "VARIANTS", "create_model", "check_input_size", "count_macs",
           "count_params", "name_of", "variant_config"]


def create_model(variant: str = "B1", num_classes: int = 1000, seed: int | None = None, **overrides) -> MixFormer:
    """Build a MixFormer (B0-B6 or 'custom' with overrides) in eval mode.

    With ``seed`` the weights are seeded-random, reproducible across runs (for latency and parity work).
    """
    cfg = variant_config(variant, num_classes=num_classes, **overrides)
    if cfg.embed_dim % 2 or any(cfg.embed_dim * 2 ** i // 2 % h for i, h in enumerate(cfg.num_heads)):
        raise UsageError("embed_dim must be even and each stage's half width divisible by its heads")
    if len(cfg.depths) != len(cfg.num_heads):
        raise UsageError("depths and num_heads must have the same length")
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = MixFormer(cfg)
    else:
        model = MixFormer(cfg)
    return model.eval()


def check_input_size(cfg: MixFormerConfig, height: int, width: int) -> None:
    """Every downsampling needs even maps: each input side must be a multiple of the total stride."""
    s = cfg.stride
    if height <= 0 or width <= 0 or height % s or width % s:
        raise UsageError(f"input size {height}x{width} is not supported: each side must be a positive multiple of {s}")
