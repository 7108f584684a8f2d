"""The deploy-form MixFormer: the reference's function as a static graph at one input size.

Why it looks like this:
- the residual stream is a 2-D (B*H*W, C) token matrix, so every Linear is one plain GEMM with no
  reshapes around it and LayerNorm acts on the last axis; only the depth-wise conv and the
  downsampling need a channel-first map view;
- per-token ops (norm1, proj_attn, proj_cnn, the 1x1 projection) run before window partitioning, which
  they commute with, so only half-width tensors are partitioned;
- the channel interaction gates v per channel, so it is applied to the attention output instead
  (attn @ (v * g) == (attn @ v) * g), on a rank-3 view, not a rank-5 one;
- the spatial and channel interactions are pointwise, so they run on tokens as GEMMs;
- padding is decided here, from the static size, and is absent when not needed;
- every reshape keeps the batch as a free -1 axis and no tensor has rank above 5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.mixformer import MixFormer, MixingBlock
from .layers import (RelativeBiasLookup, TokenBatchNorm, TokenMean, TokenPointwise, WindowAttention, partition,
                     reverse)


class DeployStem(nn.Module):
    def __init__(self, ref, height: int, width: int):
        super().__init__()
        p = ref.patch_size
        self.pad = ((p - width % p) % p, (p - height % p) % p)
        self.stem, self.proj, self.norm = ref.stem, ref.proj, ref.norm

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, (0, self.pad[0], 0, self.pad[1]))
        x = self.proj(self.stem(x)).permute(0, 2, 3, 1)
        return self.norm(x.reshape(-1, x.shape[-1]))  # (B*H*W, C)


class DeployBlock(nn.Module):
    def __init__(self, ref: MixingBlock, height: int, width: int):
        super().__init__()
        a = ref.attn
        ws = self.ws = ref.window_size
        self.h, self.w = height, width
        self.hp, self.wp = -(-height // ws) * ws, -(-width // ws) * ws
        self.n_windows = (self.hp // ws) * (self.wp // ws)
        self.norm1, self.norm2, self.mlp = ref.norm1, ref.norm2, ref.mlp
        self.proj_attn, self.proj_attn_norm = a.proj_attn, a.proj_attn_norm
        self.proj_cnn, self.proj_cnn_norm = a.proj_cnn, a.proj_cnn_norm
        self.dwconv3x3 = a.dwconv3x3
        self.channel_interaction = TokenPointwise(a.channel_interaction)
        self.projection = TokenPointwise(nn.Sequential(a.projection))
        self.attention = WindowAttention(a.qkv, RelativeBiasLookup(a.relative_position_bias_table,
                                                                   a.relative_position_index, ws), a.num_heads, a.scale)
        self.spatial_interaction = TokenPointwise(a.spatial_interaction)
        self.conv_norm = TokenBatchNorm(a.conv_norm)
        self.attn_norm, self.proj = a.attn_norm, a.proj

    def mix(self, y: torch.Tensor) -> torch.Tensor:
        """MixingAttention on padded tokens y (B*Hp*Wp, C) -> window tokens (B*nW*N, C)."""
        ws, hp, wp = self.ws, self.hp, self.wp
        dim, n = y.shape[-1], ws * ws
        a = partition(self.proj_attn_norm(self.proj_attn(y)), ws, hp, wp)
        c = self.proj_cnn_norm(self.proj_cnn(y)).reshape(-1, hp, wp, dim).permute(0, 3, 1, 2)
        c = self.dwconv3x3(c).permute(0, 2, 3, 1)  # (B, Hp, Wp, C)
        gate = torch.sigmoid(self.channel_interaction(c.mean(dim=(1, 2))))  # (B, C/2)
        c = partition(self.projection(c.reshape(-1, dim)), ws, hp, wp)
        o = self.attention(a, n)
        half = o.shape[-1]
        o = (o.reshape(-1, self.n_windows * n, half) * gate.reshape(-1, 1, half)).reshape(-1, half)
        c = self.conv_norm(torch.sigmoid(self.spatial_interaction(o)) * c)
        return self.proj(torch.cat([self.attn_norm(o), c], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        dim = y.shape[-1]
        pad_h, pad_w = self.hp - self.h, self.wp - self.w
        if pad_h or pad_w:
            y = F.pad(y.reshape(-1, self.h, self.w, dim), (0, 0, 0, pad_w, 0, pad_h)).reshape(-1, dim)
        y = reverse(self.mix(y), self.ws, self.hp, self.wp)
        if pad_h or pad_w:
            y = y.reshape(-1, self.hp, self.wp, dim)[:, :self.h, :self.w, :].reshape(-1, dim)
        x = x + y
        return x + self.mlp(self.norm2(x))


def adopt_block(new: nn.Module, block: DeployBlock) -> None:
    """Give ``new`` (a DeployBlock subclass instance, nn.Module.__init__ done) ``block``'s static sizes and
    its modules, shared: how every derived block form (compact, XNNPACK, ncnn) starts."""
    for name in ("ws", "h", "w", "hp", "wp", "n_windows"):
        setattr(new, name, getattr(block, name))
    for name, child in block.named_children():
        setattr(new, name, child)


class DeployMerge(nn.Module):
    def __init__(self, ref, height: int, width: int):
        super().__init__()
        self.norm, self.reduction = ref.norm, ref.reduction
        self.h, self.w = height, width

    def forward(self, x):
        x = self.reduction(self.norm(x.reshape(-1, self.h, self.w, x.shape[-1]).permute(0, 3, 1, 2)))
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class DeployMixFormer(nn.Module):
    """Reference MixFormer -> static token-matrix graph. Shares (not copies) the reference's
    parameters; the caller deep-copies first."""

    def __init__(self, ref: MixFormer, height: int, width: int):
        super().__init__()
        self.cfg, self.input_size = ref.cfg, (height, width)
        self.patch_embed = DeployStem(ref.patch_embed, height, width)
        h, w = -(-height // ref.cfg.patch_size), -(-width // ref.cfg.patch_size)
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.stage_sizes = []
        for layer in ref.layers:
            self.stages.append(nn.Sequential(*(DeployBlock(b, h, w) for b in layer.blocks)))
            self.stage_sizes.append((h, w))
            if layer.downsample is not None:
                self.merges.append(DeployMerge(layer.downsample, h, w))
                h, w = (h + 1) // 2, (w + 1) // 2
        self.norm, self.last_proj, self.activate, self.head = ref.norm, ref.last_proj, ref.activate, ref.head
        self.pool = TokenMean(h * w)

    output_names = ["logits"]   # the artifact's outputs: the last len(output_names) of stage_tensors
    block_form = "classic"      # deploy/compact.py makes the "compact" form

    def stage_tensors(self, x: torch.Tensor) -> list[torch.Tensor]:
        """stem and each stage's output as (B*H*W, C) tokens, features, logits: raw, no debug-only ops."""
        x = self.patch_embed(x)
        outs = [x]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x)
            if i < len(self.merges):
                x = self.merges[i](x)
        feats = self.pool(self.activate(self.last_proj(self.norm(x))))
        return outs + [feats, self.head(feats)]

    def stage_names(self) -> list[str]:
        return ["stem", *(f"stage{i}" for i in range(len(self.stages))), "features", "logits"]

    def stage_layout(self) -> dict:
        """How stage tensors are laid out (recorded in manifests, read by to_reference_layout)."""
        sizes = {"stem": self.stage_sizes[0], **{f"stage{i}": s for i, s in enumerate(self.stage_sizes)}}
        return {"layout": "tokens", "sizes": {k: list(v) for k, v in sizes.items()}}

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same keys and layouts as MixFormer.forward_stages (for parity localization)."""
        out = dict(zip(self.stage_names(), self.stage_tensors(x)))
        return to_reference_layout(out, self.stage_layout())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_tensors(x)[-1]


class FeatureMap(nn.Module):
    """(B*H*W, C) tokens -> an NCHW feature map, after the output's LayerNorm if it has one. A module of its
    own so that targets can keep a backbone's outputs in float32 by name (``feature_maps``)."""

    def __init__(self, height: int, width: int, norm: nn.Module | None = None):
        super().__init__()
        self.h, self.w, self.norm = height, width, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return x.reshape(-1, self.h, self.w, x.shape[-1]).permute(0, 3, 1, 2)


class DeployBackbone(DeployMixFormer):
    """The deploy form as a dense-task backbone: the same stages (and module names, which precision keeps
    and per-target scopes match), each chosen stage's tokens returned as an NCHW map (after its LayerNorm
    when the backbone has out norms); the classifier and the stages past the last output are dropped."""

    def __init__(self, ref: MixFormer, height: int, width: int, out_indices: tuple[int, ...],
                 out_norms: nn.ModuleDict | None = None):
        super().__init__(ref, height, width)
        last = max(out_indices)
        self.out_indices = tuple(out_indices)
        self.stages, self.merges = self.stages[:last + 1], self.merges[:last]
        self.stage_sizes = self.stage_sizes[:last + 1]
        self.norm = self.last_proj = self.activate = self.head = self.pool = None
        self.feature_maps = nn.ModuleDict({str(i): FeatureMap(*self.stage_sizes[i], None if out_norms is None
                                                              else out_norms[str(i)]) for i in self.out_indices})
        self.output_names = [f"features_{i}" for i in self.out_indices]

    def stage_tensors(self, x: torch.Tensor) -> list[torch.Tensor]:
        """stem and stage0..K tokens, then the feature maps (NCHW) in out_indices order."""
        x = self.patch_embed(x)
        outs, feats = [x], []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x)
            if i in self.out_indices:
                feats.append(self.feature_maps[str(i)](x))
            if i < len(self.merges):
                x = self.merges[i](x)
        return outs + feats

    def stage_names(self) -> list[str]:
        return ["stem", *(f"stage{i}" for i in range(len(self.stages))), *self.output_names]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.stage_tensors(x)[-len(self.output_names):])


def to_reference_layout(stages: dict, layout: dict) -> dict:
    """(B*H*W, C) token matrices -> the reference's layouts (stem (B, C, H, W), stages (B, H*W, C));
    works on torch tensors and numpy arrays alike."""
    out = dict(stages)
    for k, (h, w) in layout["sizes"].items():
        if k not in stages:
            continue
        v = stages[k].reshape(-1, h, w, stages[k].shape[-1])
        out[k] = (v.permute(0, 3, 1, 2) if torch.is_tensor(v) else v.transpose(0, 3, 1, 2)) if k == "stem" \
            else v.reshape(v.shape[0], h * w, v.shape[-1])
    return out
