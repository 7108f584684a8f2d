"""Building blocks of the deploy form: channel-last (NHWC) maps, static window ops of rank <= 5, and
the small modules that the rewrite passes swap in by type."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def partition(x: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Tokens of (B, h, w) maps, (B*h*w, C) -> window tokens (B*nW*ws*ws, C), windows image-major then
    row-major, tokens row-major inside a window.

    The batch is folded with the window-row axis so that no rank-6 tensor appears and no size is
    computed at run time (the batch stays a free -1 axis).
    """
    c = x.shape[-1]
    return x.reshape(-1, ws, w // ws, ws, c).permute(0, 2, 1, 3, 4).reshape(-1, c)


def reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Window tokens (B*nW*ws*ws, C) -> map tokens (B*h*w, C), the inverse of ``partition``."""
    c = windows.shape[-1]
    return windows.reshape(-1, w // ws, ws, ws, c).permute(0, 2, 1, 3, 4).reshape(-1, c)


class TokenBatchNorm(nn.Module):
    """An eval-mode BatchNorm applied to channel-last tokens (the reference applies it to a map)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return x * scale + (bn.bias - bn.running_mean * scale)


class ChannelBias(nn.Module):
    """What is left of a BatchNorm once its scale is folded into the preceding projection."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x):
        return x + self.bias


class TokenPointwise(nn.Module):
    """Runs a Sequential of 1x1 convs / BatchNorms / GELUs on channel-last tokens as matmuls, so the
    spatial interaction needs no window-to-map round trip."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        for m in self.seq:
            if isinstance(m, nn.Conv2d):
                x = F.linear(x, m.weight.flatten(1), m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                x = TokenBatchNorm(m)(x)
            else:
                x = m(x)
        return x


class RelativeBiasLookup(nn.Module):
    """The reference's gather from the relative-position table (replaced by a constant when folded)."""

    def __init__(self, table: nn.Parameter, index: torch.Tensor, ws: int):
        super().__init__()
        self.table, self.n = table, ws * ws
        self.register_buffer("index", index.reshape(-1).clone(), persistent=False)

    def forward(self):
        return self.table[self.index].reshape(self.n, self.n, -1).permute(2, 0, 1)


class ConstantBias(nn.Module):
    """The relative-position bias of one block, precomputed: (heads, N, N)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("bias", bias.detach().clone().contiguous())

    def forward(self):
        return self.bias


class AttentionLogits(nn.Module):
    """softmax(q @ k^T + relative bias): the attention's fp16 overflow and accuracy site, one module so
    that reduced-precision exports can keep it in float32 (the default precision keeps)."""

    def __init__(self, rel_bias: nn.Module):
        super().__init__()
        self.rel_bias = rel_bias

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-2, -1) + self.rel_bias(), dim=-1)


class TokenMean(nn.Module):
    """Global average pooling of a (B*N, C) token matrix with N tokens per image -> (B, C)."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.tokens, x.shape[-1]).mean(dim=1)


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with rank-4 tensors only."""

    def __init__(self, qkv: nn.Linear, rel_bias: nn.Module, heads: int, scale: float):
        super().__init__()
        self.qkv, self.logits, self.heads, self.scale = qkv, AttentionLogits(rel_bias), heads, scale

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Window tokens (B*nW*n, C) -> attention output (B*nW, n, C)."""
        c = x.shape[-1]
        h, d = self.heads, c // self.heads
        q, k, v = self.qkv(x).reshape(-1, n, 3 * h, d).permute(0, 2, 1, 3).split(h, dim=1)
        if self.scale != 1.0:
            q = q * self.scale
        return (self.logits(q, k) @ v).permute(0, 2, 1, 3).reshape(-1, n, c)
