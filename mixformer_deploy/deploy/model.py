"""The deploy-form MixFormer: the reference's function on channel-last maps at one static input size.

Why it looks like this:
- the residual stream stays NHWC, so LayerNorm and Linear act on the last axis and only the depth-wise
  conv and the downsampling need a channel-first view;
- per-token ops (norm1, proj_attn, proj_cnn) run on the map before window partitioning, which they
  commute with, so only the attention half is partitioned;
- the channel interaction gates v per channel, so it is applied to the attention output instead
  (attn @ (v * g) == (attn @ v) * g), on a rank-3 view, not a rank-5 one;
- the spatial interaction is pointwise, so it runs on window tokens directly;
- padding is decided here, from the static size, and is absent when not needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.mixformer import MixFormer, MixingBlock
from .layers import RelativeBiasLookup, TokenBatchNorm, TokenPointwise, WindowAttention, partition, reverse


class DeployStem(nn.Module):
    def __init__(self, ref, height: int, width: int):
        super().__init__()
        p = ref.patch_size
        self.pad = ((p - width % p) % p, (p - height % p) % p)
        self.stem, self.proj, self.norm = ref.stem, ref.proj, ref.norm

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, (0, self.pad[0], 0, self.pad[1]))
        return self.norm(self.proj(self.stem(x)).permute(0, 2, 3, 1))  # NHWC


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
        self.dwconv3x3, self.channel_interaction, self.projection = a.dwconv3x3, a.channel_interaction, a.projection
        self.attention = WindowAttention(a.qkv, RelativeBiasLookup(a.relative_position_bias_table,
                                                                   a.relative_position_index, ws), a.num_heads, a.scale)
        self.spatial_interaction = TokenPointwise(a.spatial_interaction)
        self.conv_norm = TokenBatchNorm(a.conv_norm)
        self.attn_norm, self.proj = a.attn_norm, a.proj

    def mix(self, y: torch.Tensor) -> torch.Tensor:
        """MixingAttention on a padded NHWC map y -> (B*nW, N, C) windows."""
        ws, hp, wp = self.ws, self.hp, self.wp
        a = partition(self.proj_attn_norm(self.proj_attn(y)), ws, hp, wp)
        c = self.dwconv3x3(self.proj_cnn_norm(self.proj_cnn(y)).permute(0, 3, 1, 2))
        gate = torch.sigmoid(self.channel_interaction(c.mean(dim=(2, 3), keepdim=True)))  # (B, C/2, 1, 1)
        c = partition(self.projection(c).permute(0, 2, 3, 1), ws, hp, wp)
        o = self.attention(a)
        n, half = o.shape[1], o.shape[2]
        o = (o.reshape(-1, self.n_windows * n, half) * gate.reshape(-1, 1, half)).reshape(-1, n, half)
        c = self.conv_norm(torch.sigmoid(self.spatial_interaction(o)) * c)
        return self.proj(torch.cat([self.attn_norm(o), c], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        pad_h, pad_w = self.hp - self.h, self.wp - self.w
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        y = reverse(self.mix(y), self.ws, self.hp, self.wp)
        if pad_h or pad_w:
            y = y[:, :self.h, :self.w, :]
        x = x + y
        return x + self.mlp(self.norm2(x))


class DeployMerge(nn.Module):
    def __init__(self, ref):
        super().__init__()
        self.norm, self.reduction = ref.norm, ref.reduction

    def forward(self, x):
        return self.reduction(self.norm(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class DeployMixFormer(nn.Module):
    """Reference MixFormer -> static NHWC graph. Shares (not copies) the reference's parameters; the
    caller deep-copies first."""

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
                self.merges.append(DeployMerge(layer.downsample))
                h, w = (h + 1) // 2, (w + 1) // 2
        self.norm, self.last_proj, self.activate, self.head = ref.norm, ref.last_proj, ref.activate, ref.head

    def stage_tensors(self, x: torch.Tensor) -> list[torch.Tensor]:
        """stem (NHWC), each stage's output (NHWC), features, logits: raw, with no debug-only ops."""
        x = self.patch_embed(x)
        outs = [x]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x)
            if i < len(self.merges):
                x = self.merges[i](x)
        feats = self.activate(self.last_proj(self.norm(x))).mean(dim=(1, 2))
        return outs + [feats, self.head(feats)]

    def stage_names(self) -> list[str]:
        return ["stem", *(f"stage{i}" for i in range(len(self.stages))), "features", "logits"]

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same keys and layouts as MixFormer.forward_stages (for parity localization)."""
        out = dict(zip(self.stage_names(), self.stage_tensors(x)))
        return to_reference_layout(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_tensors(x)[-1]


def to_reference_layout(stages: dict) -> dict:
    """NHWC stem/stage maps -> the reference's layouts (stem NCHW, stages (B, H*W, C)); works on torch
    tensors and numpy arrays alike."""
    out = {}
    for k, v in stages.items():
        if k == "stem":
            v = v.transpose(0, 3, 1, 2) if hasattr(v, "dtype") and not torch.is_tensor(v) else v.permute(0, 3, 1, 2)
        elif k.startswith("stage"):
            v = v.reshape(v.shape[0], v.shape[1] * v.shape[2], v.shape[3])
        out[k] = v
    return out
