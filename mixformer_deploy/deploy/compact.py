"""The compact block: the deploy form's block with fewer ops around its GEMMs (block form "compact").

Why, op by op (each change exact; ``to_compact`` gates nothing itself, the export's rewrite gate does):
- **window-ordered stages.** Every op of a block but the depth-wise conv is per token, so a stage whose
  windows tile its map keeps its tokens in window order from its first block to its last: one partition
  at the stage's start and one reverse at its end, instead of two partitions and a reverse per block.
  A stage whose map needs padding keeps the classic block (its padded tokens must be zero after norm1).
- **the conv branch goes window order -> NCHW -> window order** through rank-5 views, and projects to
  half width (a 1x1 conv) *before* going back, so the way back moves half the channels.
- **the channel gate** is applied on the attention output's (B, windows*N, C/2) view, reached straight
  from the heads' layout (one Reshape less).
- **the conv branch's BatchNorm shift** is folded into ``proj``'s bias (``proj`` is linear in its
  conv-half input), so no per-channel Add remains.

Module names and types stay the classic block's (norm1, proj_attn(+_norm), proj_cnn(+_norm), dwconv3x3,
channel_interaction, projection, attention.qkv / attention.logits, spatial_interaction, attn_norm, proj,
norm2, mlp), so precision keeps and ``--keep-fp32`` globs mean the same thing in both forms.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import RewriteError
from .layers import ChannelBias, partition, reverse
from .model import DeployBlock, DeployMixFormer, adopt_block

log = logging.getLogger(__name__)

BLOCK_FORMS = ("classic", "compact")


def windows_to_nchw(t: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Window-ordered tokens (B*h*w, C) -> an NCHW map (B, C, h, w): the window reverse (a swap of two
    middle axes, C stays innermost) and then one axis move, the two transposes runtimes do fastest."""
    c = t.shape[-1]
    if not (h == ws and w == ws):  # one window: window order is map order
        t = reverse(t, ws, h, w)
    return t.reshape(-1, h, w, c).permute(0, 3, 1, 2)


def nchw_to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """An NCHW map (B, C, h, w) -> window-ordered tokens (B*h*w, C)."""
    c, h, w = x.shape[1:]
    t = x.permute(0, 2, 3, 1)
    if h == ws and w == ws:
        return t.reshape(-1, c)
    return partition(t.reshape(-1, c), ws, h, w)


class WindowStage(nn.Sequential):
    """A stage of compact blocks: map-ordered tokens in and out, window order in between. A Sequential so
    that blocks keep their names (``stages.S.B``)."""

    def __init__(self, blocks, ws: int, h: int, w: int):
        super().__init__(*blocks)
        self.ws, self.h, self.w = ws, h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.h == self.ws and self.w == self.ws
        if not single:
            x = partition(x, self.ws, self.h, self.w)
        for block in self:
            x = block(x)
        return x if single else reverse(x, self.ws, self.h, self.w)


class CompactBlock(DeployBlock):
    """A classic block on window-ordered tokens (B*H*W, C) of an unpadded map (see the module docstring)."""

    def __init__(self, block: DeployBlock):
        nn.Module.__init__(self)
        if block.hp != block.h or block.wp != block.w:
            raise RewriteError("a compact block needs a map its windows tile (no padding)")
        adopt_block(self, block)
        self.projection = _pointwise_conv(block.projection.seq[0])
        _fold_channel_bias(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        ws, n = self.ws, self.ws * self.ws
        a = self.proj_attn_norm(self.proj_attn(y))
        c = self.dwconv3x3(windows_to_nchw(self.proj_cnn_norm(self.proj_cnn(y)), ws, self.h, self.w))
        gate = torch.sigmoid(self.channel_interaction(self._channel_mean(c)))     # (B, C/2)
        c = nchw_to_windows(self.projection(c), ws)                               # (B*N, C/2)
        o = self._gated_attention(a, n, gate)
        c = torch.sigmoid(self.spatial_interaction(o)) * c
        x = x + self.proj(torch.cat([self.attn_norm(o), c], dim=-1))
        return x + self.mlp(self.norm2(x))

    def _channel_mean(self, c: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C)."""
        return c.mean(dim=(2, 3))

    def _gated_attention(self, a: torch.Tensor, n: int, gate: torch.Tensor) -> torch.Tensor:
        """Window attention of window tokens a, its output gated per image and channel -> (B*N, C/2)."""
        att, half = self.attention, a.shape[-1]
        heads, d = att.heads, half // att.heads
        q, k, v = att.qkv(a).reshape(-1, n, 3 * heads, d).permute(0, 2, 1, 3).split(heads, dim=1)
        o = (att.logits(q, k) @ v).permute(0, 2, 1, 3).reshape(-1, self.n_windows * n, half)
        return (o * gate.unsqueeze(1)).reshape(-1, half)


def _pointwise_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The projection (a 1x1 conv the classic block runs as a GEMM on tokens) back as a conv on the map."""
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise RewriteError(f"to_compact: the projection is a {conv.kernel_size} conv, not a 1x1 one")
    return conv


@torch.no_grad()
def _fold_channel_bias(block: CompactBlock) -> None:
    """proj(cat(o, c + t)) == proj(cat(o, c)) + W[:, half:] @ t: the conv branch's BN shift into proj."""
    if not isinstance(block.conv_norm, ChannelBias):
        raise RewriteError("to_compact expects the classic block's folded conv-branch norm (run to_deploy first)")
    t = block.conv_norm.bias.double()
    w = block.proj.weight.double()
    block.proj.bias.copy_(block.proj.bias.double() + w[:, w.shape[1] - t.numel():] @ t)
    block.conv_norm = nn.Identity()


@torch.no_grad()
def to_compact(deploy: DeployMixFormer) -> DeployMixFormer:
    """A copy of the (folded) classic deploy form with compact blocks in every stage whose windows tile
    its map; the other stages keep classic blocks."""
    if not isinstance(deploy, DeployMixFormer):
        raise RewriteError(f"to_compact expects a DeployMixFormer, got {type(deploy).__name__}")
    model = copy.deepcopy(deploy).eval()
    compact = []
    for s, stage in enumerate(model.stages):
        blocks = list(stage)
        if blocks and all(b.hp == b.h and b.wp == b.w for b in blocks):
            b0 = blocks[0]
            model.stages[s] = WindowStage([CompactBlock(b) for b in blocks], b0.ws, b0.h, b0.w)
            compact.append(s)
    if not compact:
        log.warning("block compact: no stage's windows tile its map at %dx%d: every block stays classic",
                    *model.input_size)
        return model.eval()
    if len(compact) < len(model.stages):
        log.info("block compact: stages %s compact, the others padded (classic)", compact)
    model.block_form = "compact"
    return model.eval()
