"""MixFormer in PyTorch, faithful to the official PaddleClas implementation (commit 7b6c148).

Module and parameter names mirror the official state dict, so checkpoints convert by renaming
BatchNorm statistics and transposing Linear weights only. This is the *reference* model: it keeps the
official computation order (token layout, runtime padding, window partitions) so that it matches the
official outputs; the export-friendly rewrite lives in ``mixformer_deploy.deploy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .variants import MixFormerConfig

EPS = 1e-5


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B*nW, ws, ws, C); windows image-major, then row-major."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B*nW, ws, ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.reshape(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def window_partition_nchw(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*nW, ws*ws, C)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // ws, ws, W // ws, ws)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, C)


def window_reverse_nchw(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B*nW, ws*ws, C) -> (B, C, H, W)."""
    C = windows.shape[-1]
    x = windows.reshape(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, C, H, W)


def relative_position_index(ws: int) -> torch.Tensor:
    """Swin's (ws*ws, ws*ws) index into the (2ws-1)^2 relative-position table (a derived buffer)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MixingAttention(nn.Module):
    """Window attention on half the channels in parallel with a depth-wise conv on the map, with the
    channel interaction (conv -> attention values) and spatial interaction (attention -> conv)."""

    def __init__(self, dim: int, window_size: int, dwconv_kernel_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        attn_dim = dim // 2
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (attn_dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=True)
        self.proj_attn = nn.Linear(dim, attn_dim)
        self.proj_attn_norm = nn.LayerNorm(attn_dim, eps=EPS)
        self.proj_cnn = nn.Linear(dim, dim)
        self.proj_cnn_norm = nn.LayerNorm(dim, eps=EPS)
        k = dwconv_kernel_size
        self.dwconv3x3 = nn.Sequential(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim), nn.BatchNorm2d(dim, eps=EPS), nn.GELU())
        self.channel_interaction = nn.Sequential(
            nn.Conv2d(dim, dim // 8, 1), nn.BatchNorm2d(dim // 8, eps=EPS), nn.GELU(), nn.Conv2d(dim // 8, attn_dim, 1))
        self.projection = nn.Conv2d(dim, attn_dim, 1)
        self.conv_norm = nn.BatchNorm2d(attn_dim, eps=EPS)
        self.qkv = nn.Linear(attn_dim, attn_dim * 3, bias=qkv_bias)
        self.spatial_interaction = nn.Sequential(
            nn.Conv2d(attn_dim, dim // 16, 1), nn.BatchNorm2d(dim // 16, eps=EPS), nn.GELU(), nn.Conv2d(dim // 16, 1, 1))
        self.attn_norm = nn.LayerNorm(attn_dim, eps=EPS)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, -1).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        ws = self.window_size
        x_atten = self.proj_attn_norm(self.proj_attn(x))
        x_cnn = self.proj_cnn_norm(self.proj_cnn(x))
        x_cnn = window_reverse_nchw(x_cnn, ws, H, W)
        x_cnn = self.dwconv3x3(x_cnn)
        channel_interaction = self.channel_interaction(F.adaptive_avg_pool2d(x_cnn, 1))
        x_cnn = self.projection(x_cnn)

        B_, N, C = x_atten.shape
        h, d = self.num_heads, C // self.num_heads
        qkv = self.qkv(x_atten).reshape(B_, N, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        gate = torch.sigmoid(channel_interaction).reshape(-1, 1, h, 1, d)
        v = (v.reshape(gate.shape[0], -1, h, N, d) * gate).reshape(-1, h, N, d)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.relative_position_bias().unsqueeze(0)
        attn = attn.softmax(dim=-1)
        x_atten = (attn @ v).transpose(1, 2).reshape(B_, N, C)

        spatial = self.spatial_interaction(window_reverse_nchw(x_atten, ws, H, W))
        x_cnn = self.conv_norm(torch.sigmoid(spatial) * x_cnn)
        x_cnn = window_partition_nchw(x_cnn, ws)
        x = torch.cat([self.attn_norm(x_atten), x_cnn], dim=-1)
        return self.proj(x)


class MixingBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, dwconv_kernel_size: int, mlp_ratio: float,
                 qkv_bias: bool):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = MixingAttention(dim, window_size, dwconv_kernel_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        ws = self.window_size
        shortcut = x
        x = self.norm1(x).reshape(B, H, W, C)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        if pad_r or pad_b:  # zeros at right/bottom; the padded tokens are not masked anywhere
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        windows = window_partition(x, ws).reshape(-1, ws * ws, C)
        windows = self.attn(windows, Hp, Wp).reshape(-1, ws, ws, C)
        x = window_reverse(windows, ws, Hp, Wp)[:, :H, :W, :].reshape(B, H * W, C)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ConvMerging(nn.Module):
    """BatchNorm, then a 2x2 stride-2 conv to the next stage's width."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 2, stride=2)
        self.norm = nn.BatchNorm2d(dim, eps=EPS)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, L, C = x.shape
        x = self.norm(x.reshape(B, H, W, C).permute(0, 3, 1, 2))
        return self.reduction(x).flatten(2).transpose(1, 2)


class BasicLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int | None, depth: int, num_heads: int, cfg: MixFormerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            MixingBlock(dim, num_heads, cfg.window_size, cfg.dwconv_kernel_size, cfg.mlp_ratio, cfg.qkv_bias)
            for _ in range(depth))
        self.downsample = ConvMerging(dim, out_dim) if out_dim is not None else None


class ConvEmbed(nn.Module):
    """Stem: three 3x3 conv+BN+GELU (first stride 2) at embed_dim/2, a 2x2 stride-2 conv, LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        half = embed_dim // 2
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(in_chans if i == 0 else half, half, 3, stride=patch_size // 2 if i == 0 else 1,
                                 padding=1), nn.BatchNorm2d(half, eps=EPS), nn.GELU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(half, embed_dim, patch_size // 2, stride=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(self.stem(x))
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MixFormer(nn.Module):
    def __init__(self, cfg: MixFormerConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.depths)
        dims = [cfg.embed_dim * 2 ** i for i in range(n)]
        self.patch_embed = ConvEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.layers = nn.ModuleList(
            BasicLayer(dims[i], dims[i + 1] if i < n - 1 else None, cfg.depths[i], cfg.num_heads[i], cfg)
            for i in range(n))
        self.norm = nn.LayerNorm(dims[-1], eps=EPS)
        self.last_proj = nn.Linear(dims[-1], cfg.head_dim)
        self.activate = nn.GELU()
        self.head = nn.Linear(cfg.head_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every named intermediate the parity localizer compares: stem, stage0..N, features, logits.

        stem is (B, C, H/4, W/4); stage i is the output of its last block, tokens (B, H*W, C), before
        that stage's downsampling (the layout of the official fixture).
        """
        out: dict[str, torch.Tensor] = {}
        x = self.patch_embed(x)
        out["stem"] = x
        H, W = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        for i, layer in enumerate(self.layers):
            for blk in layer.blocks:
                x = blk(x, H, W)
            out[f"stage{i}"] = x
            if layer.downsample is not None:
                x = layer.downsample(x, H, W)
                H, W = (H + 1) // 2, (W + 1) // 2
        x = self.activate(self.last_proj(self.norm(x))).mean(dim=1)
        out["features"] = x
        out["logits"] = self.head(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)["features"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)["logits"]
