"""Probes: the deploy form with extra outputs at named points (block boundaries, a block's branches).

``debug`` exports a probe with the artifact's own backend, precision, keeps and calibration, and compares
each point with the same point of the float32 deploy form in PyTorch. A point is a module of the deploy
form, tapped by a forward hook that exists only while the probe is traced: the module tree, its names and
what it computes stay the deploy form's (precision keeps resolve by the same names, and a backend's own
module form, e.g. XNNPACK's, swaps modules under the same names). Every tap leaves the graph as one more
output, flattened per image to (B, K) float32, after the model's own outputs.

Names: every point is reported by its deploy-form path (what ``--keep-fp32`` globs match) and by the
reference/checkpoint path (``reference_name``), e.g. ``stages.2.1.mlp`` = ``layers.2.blocks.1.mlp``.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

# A block's branches in data-flow order, as deploy-form names under ``stages.S.B``. The attention is
# tapped at its logits (softmax(q k^T + bias), the same layout in every block form); its output reaches
# ``spatial_interaction`` and ``proj``.
BRANCHES = ("proj_attn", "proj_cnn", "dwconv3x3", "channel_interaction", "attention.logits",
            "spatial_interaction", "projection", "proj", "mlp")

# deploy-form branch -> reference path under ``layers.S.blocks.B``
_BRANCH_REFERENCE = {"attention": "attn", "attention.logits": "attn",
                     "attention.qkv": "attn.qkv", "mlp": "mlp", "norm1": "norm1", "norm2": "norm2"}


def reference_name(name: str) -> str:
    """Deploy-form module path -> the reference's (official checkpoint) path."""
    parts = name.split(".")
    if parts[0] == "stages" and len(parts) >= 3:
        base, rest = f"layers.{parts[1]}.blocks.{parts[2]}", ".".join(parts[3:])
        if not rest:
            return base
        return f"{base}.{_BRANCH_REFERENCE.get(rest, 'attn.' + rest)}"
    if parts[0] == "merges" and len(parts) >= 2:
        return f"layers.{parts[1]}.downsample" + "".join("." + p for p in parts[2:])
    return name


def block_points(deploy: nn.Module) -> list[str]:
    """The stem, every block and every merge, in data-flow order."""
    points = ["patch_embed"]
    for s, stage in enumerate(deploy.stages):
        points += [f"stages.{s}.{b}" for b in range(len(stage))]
        if s < len(deploy.merges):
            points.append(f"merges.{s}")
    return points


def branch_points(deploy: nn.Module, block: str) -> list[str]:
    """The branches of one block (``stages.S.B``) that its form has, in data-flow order."""
    names = {n for n, _ in deploy.get_submodule(block).named_modules()}
    return [f"{block}.{b}" for b in BRANCHES if b in names]


def _keep(store: dict, name: str, module, inputs, output) -> None:
    store[name] = output


def _flat(value) -> torch.Tensor:
    """A tap's tensor -> float32, flattened; the caller views it as (B, K): every layout of the deploy
    form keeps the batch outermost."""
    if not isinstance(value, torch.Tensor):
        raise RuntimeError(f"a probe point returns {type(value).__name__}, not one tensor")
    return value.float().reshape(-1)


class _ProbeMixin:
    """The deploy form's outputs, then one (B, K) output per probe point."""

    probe_points: list[str]
    probe_sizes: list[int]        # K of each point: its values per image
    final_count: int

    def stage_tensors(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps: dict = {}
        handles = [self.get_submodule(n).register_forward_hook(functools.partial(_keep, taps, n))
                   for n in self.probe_points]
        try:
            outs = super().stage_tensors(x)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.probe_points if n not in taps]
        if missing:
            raise RuntimeError(f"probe points not reached by this form: {', '.join(missing)}")
        return outs + [_flat(taps[n]).reshape(-1, k) for n, k in zip(self.probe_points, self.probe_sizes)]

    def forward(self, x: torch.Tensor):
        return tuple(self.stage_tensors(x)[-len(self.output_names):])


@functools.lru_cache(maxsize=None)
def _probe_class(base: type) -> type:
    return type(f"Probe{base.__name__}", (_ProbeMixin, base), {})


def probe_output_name(i: int) -> str:
    return f"probe_{i}"


@torch.no_grad()
def make_probe(deploy: nn.Module, points: list[str]) -> nn.Module:
    """A copy of ``deploy`` whose outputs are its own, then ``probe_0``, ... (one per point)."""
    finals = list(getattr(deploy, "output_names", None) or ["logits"])
    probe = copy.deepcopy(deploy).eval()
    probe.__class__ = _probe_class(type(deploy))
    probe.probe_points, probe.final_count = list(points), len(finals)
    probe.probe_sizes = [1] * len(points)
    probe.output_names = finals + [probe_output_name(i) for i in range(len(points))]
    h, w = deploy.input_size
    taps = probe(torch.zeros(1, 3, h, w))[len(finals):]
    probe.probe_sizes = [int(t.numel()) for t in taps]
    return probe
