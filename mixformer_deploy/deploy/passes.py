"""The deploy-form rewrite passes. Each is small, says why it exists, swaps modules by type, and raises
RewriteError when it finds nothing to rewrite (the model changed under it). Folds are computed in
float64 and stored in the parameters' dtype."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import RewriteError
from ..model.mixformer import MixFormer
from .layers import ChannelBias, ConstantBias, RelativeBiasLookup, TokenBatchNorm, WindowAttention
from .model import DeployBackbone, DeployBlock, DeployMerge, DeployMixFormer


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift (float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def _require(count: int, name: str) -> int:
    if count == 0:
        raise RewriteError(f"deploy rewrite '{name}' found nothing to rewrite: the model is not the expected MixFormer")
    return count


@torch.no_grad()
def restructure(model: MixFormer, height: int, width: int) -> DeployMixFormer:
    """Static NHWC graph with rank <= 5 window ops and static padding (a deep copy: the reference is
    untouched). Why: exporters otherwise emit shape arithmetic, rank-6 transposes and runtime padding."""
    from ..model.backbone import MixFormerBackbone

    if isinstance(model, MixFormerBackbone):
        return DeployBackbone(copy.deepcopy(model.model).eval(), height, width, model.out_indices,
                              copy.deepcopy(model.out_norms)).eval()
    if not isinstance(model, MixFormer):
        raise RewriteError(f"to_deploy expects a MixFormer, got {type(model).__name__}")
    return DeployMixFormer(copy.deepcopy(model).eval(), height, width).eval()


@torch.no_grad()
def fold_conv_batchnorm(model: nn.Module) -> int:
    """Conv followed by BatchNorm in a Sequential (stem, depth-wise branch, both interactions) -> one
    conv. Why: removes a per-element pass over the largest maps."""
    count = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                scale, shift = _bn_affine(bn)
                bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
                conv.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
                if conv.bias is None:
                    conv.bias = nn.Parameter(torch.zeros_like(conv.weight[:, 0, 0, 0]))
                conv.bias.copy_(bias * scale + shift)
                seq[i + 1] = nn.Identity()
                count += 1
    return _require(count, "fold_conv_batchnorm")


@torch.no_grad()
def fold_merge_batchnorm(model: nn.Module) -> int:
    """BatchNorm *before* the 2x2 stride-2 downsampling conv -> folded into that conv. Exact because the
    conv has no padding. Why: one fewer pass and one fewer layout-sensitive op per stage boundary."""
    count = 0
    for m in model.modules():
        if isinstance(m, DeployMerge) and isinstance(m.norm, nn.BatchNorm2d):
            scale, shift = _bn_affine(m.norm)
            w = m.reduction.weight.double()
            m.reduction.bias.copy_(m.reduction.bias.double() + (w * shift.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3)))
            m.reduction.weight.copy_(w * scale.reshape(1, -1, 1, 1))
            m.norm = nn.Identity()
            count += 1
    return count if not any(isinstance(m, DeployMerge) for m in model.modules()) else \
        _require(count, "fold_merge_batchnorm")  # a backbone of stage 0 alone has no merge


@torch.no_grad()
def fold_conv_branch_norm(model: nn.Module) -> int:
    """The conv branch's BatchNorm after the spatial gate: BN(g * P(x)) = g * (s * P(x)) + t, so s goes
    into the projection and only a per-channel bias remains."""
    count = 0
    for m in model.modules():
        if isinstance(m, DeployBlock) and isinstance(m.conv_norm, TokenBatchNorm):
            scale, shift = _bn_affine(m.conv_norm.bn)
            proj = m.projection.seq[0]
            proj.weight.copy_(proj.weight.double() * scale.reshape(-1, 1, 1, 1))
            proj.bias.copy_(proj.bias.double() * scale)
            m.conv_norm = ChannelBias(shift.to(proj.weight.dtype))
            count += 1
    return _require(count, "fold_conv_branch_norm")


@torch.no_grad()
def precompute_relative_bias(model: nn.Module) -> int:
    """Table gather -> a constant (heads, N, N) per block. Why: no Gather/index tensors in the graph."""
    count = 0
    for m in model.modules():
        if isinstance(m, WindowAttention) and isinstance(m.logits.rel_bias, RelativeBiasLookup):
            b = m.logits.rel_bias()
            # a fresh row-major copy: with one head the permuted table has strides torch still calls
            # contiguous, which runtimes that trust the strides (ExecuTorch) cannot reshape
            m.logits.rel_bias = ConstantBias(b.reshape(-1).clone().reshape(b.shape))
            count += 1
    return _require(count, "precompute_relative_bias")


@torch.no_grad()
def fold_attention_scale(model: nn.Module) -> int:
    """q * scale -> scale folded into the q rows of the qkv projection. Why: one Mul less per block."""
    count = 0
    for m in model.modules():
        if isinstance(m, WindowAttention) and m.scale != 1.0:
            q_rows = m.qkv.out_features // 3
            m.qkv.weight[:q_rows] = (m.qkv.weight[:q_rows].double() * m.scale).to(m.qkv.weight.dtype)
            if m.qkv.bias is not None:
                m.qkv.bias[:q_rows] = (m.qkv.bias[:q_rows].double() * m.scale).to(m.qkv.bias.dtype)
            m.scale = 1.0
            count += 1
    return _require(count, "fold_attention_scale")


# Applied in this order by to_deploy (after restructure).
PASSES = (fold_conv_batchnorm, fold_merge_batchnorm, fold_conv_branch_norm, precompute_relative_bias,
          fold_attention_scale)
