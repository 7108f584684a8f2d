"""Precision keeps: which parts of the deploy form stay float32 when a target computes in fp16/bf16/int8.

Why these defaults: in window attention the fp16 failure sites are the LayerNorms (a variance of large
activations), the attention logits q@k^T + relative bias and their softmax (overflow, then a flat
distribution), and the final pooling + head (a sum over every token, then the logits users read). Each
target translates the resolved set of module names into its own mechanism (casts around a module, an
ignored scope, an op selector) and records it in the manifest.
"""

from __future__ import annotations

import copy
import fnmatch

import torch
from torch import nn

from ..errors import UsageError

DEFAULT_KEEP_PATTERNS = ("*.attention.logits", "pool", "head")
DEFAULT_KEEP_TYPES = (nn.LayerNorm,)


def resolve_keeps(deploy: nn.Module, patterns: tuple[str, ...] = (), defaults: bool = True) -> list[str]:
    """Module names of ``deploy`` to keep in float32: the defaults (unless turned off) plus every module
    matching a ``--keep-fp32`` glob. A pattern that matches nothing is a usage error (a typo would
    otherwise silently keep nothing). Nested names under a kept module are dropped (the parent covers them)."""
    named = dict(deploy.named_modules())
    keep: set[str] = set()
    if defaults:
        keep |= {n for n, m in named.items() if n and isinstance(m, DEFAULT_KEEP_TYPES)}
        keep |= {n for n in named for p in DEFAULT_KEEP_PATTERNS if n and fnmatch.fnmatchcase(n, p)}
    for p in patterns:
        hits = {n for n in named if n and fnmatch.fnmatchcase(n, p)}
        if not hits:
            raise UsageError(f"--keep-fp32 {p!r} matches no module of the deploy form "
                             "(names look like stages.0.0.attention.logits, stages.1.2.norm1, head)")
        keep |= hits
    return sorted(n for n in keep if not any(n.startswith(k + ".") for k in keep))


def kept_by(module: str, keeps) -> str | None:
    """The kept module that covers ``module`` (itself or an ancestor), or None: the one answer every
    backend's keep mechanism asks of a module (or node) name."""
    return next((k for k in keeps if module == k or module.startswith(k + ".")), None)


class Float32Island(nn.Module):
    """Runs a module in float32 inside a reduced-precision graph: casts tensor inputs up and the output
    back to the dtype that came in. Exporters see explicit Cast ops at the island's edges."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.float()

    def forward(self, *args):
        dtype = next((a.dtype for a in args if torch.is_tensor(a)), torch.float32)
        out = self.module(*(a.float() if torch.is_tensor(a) else a for a in args))
        return out.to(dtype)


def with_keeps(deploy: nn.Module, dtype: torch.dtype, keeps: list[str]) -> nn.Module:
    """A copy of ``deploy`` cast to ``dtype`` with each kept module wrapped in a Float32Island."""
    model = copy.deepcopy(deploy).to(dtype)
    for name in keeps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Float32Island(getattr(parent, child)))
    return model.eval()
