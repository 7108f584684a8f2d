"""Parameter and multiply-add counts, counted the way the official numbers are: conv + linear + matmul."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .mixformer import MixFormer


def count_params(model: torch.nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics and derived buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: MixFormer, height: int, width: int) -> int:
    """Multiply-adds of one image: convolutions, linear layers and the attention matmuls.

    torch's FLOP counter counts exactly these ops (2 FLOPs per multiply-add); element-wise work,
    norms and softmax are not counted, as in the paper's table.
    """
    with torch.device("meta"):  # shapes only: the count needs no arithmetic
        twin = MixFormer(model.cfg).eval()
    x = torch.zeros(1, model.cfg.in_chans, height, width, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        twin(x)
    return counter.get_total_flops() // 2
