"""The ncnn form of the deploy form: the same function, shaped for pnnx and ncnn (both 20261020).

- An ncnn Mat has at most four axes besides its batch axis, so pnnx cannot lower the deploy form's
  rank-5 window partition and reverse (``layer Tensor.reshape not exists or registered``). A window
  split fits in rank 4: view the tokens as (B*nH, ws, nW, ws*C), swap the two middle axes and read the
  windows off row-major; the reverse is the same swap on (B*nH, nW, ws, ws*C). No tensor has rank > 4.
- pnnx marks axis 0 of a Linear's input as ncnn's batch axis, and ncnn runs a layer once per batch
  item: on the deploy form's (B*H*W, C) token matrices that is one GEMV per token (B1 at 224: ~230 ms
  an image on one x86 core). Here tokens are (1, B*H*W, C), so the batch axis has size 1 and a Linear
  is one GEMM.
- A Linear whose input came out of a window partition gets no batch axis from pnnx, which then wraps
  it in a flatten and a reshape that reads its shape at run time (~3x slower overall). The qkv
  projection is per-token, so it runs before the partition here, and no Linear reads windows.

The batch stays folded into the token axis, so the torch module computes any batch; ncnn runs one image
at a time and the graph is converted at batch 1.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...deploy.layers import WindowAttention
from ...deploy.model import DeployBlock, DeployMerge, DeployMixFormer, DeployStem, adopt_block
from ...errors import RewriteError


def tokens(x: torch.Tensor) -> torch.Tensor:
    """Any (..., C) tensor -> (1, tokens, C): a unit batch axis for pnnx to mark as ncnn's batch."""
    return x.reshape(1, -1, x.shape[-1])


def partition4(x: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """``deploy.layers.partition`` through rank-4 views: (1, B*h*w, C) -> window tokens (1, B*nW*ws*ws, C),
    in the same window and token order."""
    c = x.shape[-1]
    return tokens(x.reshape(-1, ws, w // ws, ws * c).permute(0, 2, 1, 3).reshape(-1, c))


def reverse4(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """``deploy.layers.reverse`` through rank-4 views: the inverse of ``partition4``."""
    c = windows.shape[-1]
    return tokens(windows.reshape(-1, w // ws, ws, ws * c).permute(0, 2, 1, 3).reshape(-1, c))


class NcnnStem(DeployStem):
    """DeployStem returning (1, B*H*W, C) tokens."""

    def __init__(self, stem: DeployStem):
        nn.Module.__init__(self)
        self.pad, self.stem, self.proj, self.norm = stem.pad, stem.stem, stem.proj, stem.norm

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, (0, self.pad[0], 0, self.pad[1]))
        return self.norm(tokens(self.proj(self.stem(x)).permute(0, 2, 3, 1)))


class NcnnMerge(DeployMerge):
    """DeployMerge on (1, B*H*W, C) tokens."""

    def __init__(self, merge: DeployMerge):
        nn.Module.__init__(self)
        self.norm, self.reduction, self.h, self.w = merge.norm, merge.reduction, merge.h, merge.w

    def forward(self, x):
        x = self.reduction(self.norm(x.reshape(-1, self.h, self.w, x.shape[-1]).permute(0, 3, 1, 2)))
        return tokens(x.permute(0, 2, 3, 1))


def window_attention(att: WindowAttention, qkv: torch.Tensor, n: int) -> torch.Tensor:
    """``WindowAttention.forward`` after its qkv projection: window qkv tokens (1, B*nW*n, 3C) ->
    attention output (B*nW, n, C)."""
    c = qkv.shape[-1] // 3
    h, d = att.heads, c // att.heads
    q, k, v = qkv.reshape(-1, n, 3 * h, d).permute(0, 2, 1, 3).split(h, dim=1)
    if att.scale != 1.0:
        q = q * att.scale
    return (att.logits(q, k) @ v).permute(0, 2, 1, 3).reshape(-1, n, c)


class NcnnBlock(DeployBlock):
    """DeployBlock on (1, B*H*W, C) tokens, rank-4 window ops, qkv before the partition; the modules
    are shared."""

    def __init__(self, block: DeployBlock):
        nn.Module.__init__(self)
        adopt_block(self, block)

    def mix(self, y: torch.Tensor) -> torch.Tensor:
        """DeployBlock.mix: padded tokens (1, B*Hp*Wp, C) -> window tokens (1, B*nW*N, C)."""
        ws, hp, wp = self.ws, self.hp, self.wp
        dim, n = y.shape[-1], ws * ws
        a = partition4(self.attention.qkv(self.proj_attn_norm(self.proj_attn(y))), ws, hp, wp)
        c = self.proj_cnn_norm(self.proj_cnn(y)).reshape(-1, hp, wp, dim).permute(0, 3, 1, 2)
        c = self.dwconv3x3(c).permute(0, 2, 3, 1)  # (B, Hp, Wp, C)
        gate = torch.sigmoid(self.channel_interaction(c.mean(dim=(1, 2))))  # (B, C/2)
        c = partition4(self.projection(tokens(c)), ws, hp, wp)
        o = window_attention(self.attention, a, n)  # (B*nW, N, C/2)
        half = o.shape[-1]
        o = tokens(o.reshape(-1, self.n_windows * n, half) * gate.reshape(-1, 1, half))
        c = self.conv_norm(torch.sigmoid(self.spatial_interaction(o)) * c)
        return self.proj(torch.cat([self.attn_norm(o), c], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        dim = y.shape[-1]
        pad_h, pad_w = self.hp - self.h, self.wp - self.w
        if pad_h or pad_w:
            y = tokens(F.pad(y.reshape(-1, self.h, self.w, dim), (0, 0, 0, pad_w, 0, pad_h)))
        y = reverse4(self.mix(y), self.ws, self.hp, self.wp)
        if pad_h or pad_w:
            y = tokens(y.reshape(-1, self.hp, self.wp, dim)[:, :self.h, :self.w, :])
        x = x + y
        return x + self.mlp(self.norm2(x))


def _swap(model: DeployMixFormer) -> dict[str, int]:
    """Replace the stem, every block and every merge in place; the count of each kind swapped."""
    counts = {"stem": 0, "blocks": 0, "merges": 0}
    if type(model.patch_embed) is DeployStem:
        model.patch_embed = NcnnStem(model.patch_embed)
        counts["stem"] += 1
    for stage in model.stages:
        for i, block in enumerate(stage):
            if type(block) is DeployBlock and isinstance(block.attention, WindowAttention):
                stage[i] = NcnnBlock(block)
                counts["blocks"] += 1
    for i, merge in enumerate(model.merges):
        if type(merge) is DeployMerge:
            model.merges[i] = NcnnMerge(merge)
            counts["merges"] += 1
    if not model.merges:  # a backbone of stage 0 alone has no merge
        del counts["merges"]
    return counts


@torch.no_grad()
def to_ncnn_form(deploy: DeployMixFormer) -> DeployMixFormer:
    """A copy of the deploy form (classifier or backbone) in the ncnn form; the input is untouched.
    Module names stay those of the deploy form. Tokens come out as (1, B*H*W, C); logits and feature
    maps keep their shapes."""
    if not isinstance(deploy, DeployMixFormer):
        raise RewriteError(f"to_ncnn_form expects a DeployMixFormer, got {type(deploy).__name__}")
    model = copy.deepcopy(deploy).eval()
    missing = [k for k, v in _swap(model).items() if not v]
    if missing:
        raise RewriteError(f"to_ncnn_form found nothing to rewrite for {', '.join(missing)}: "
                           "the deploy form is not the expected one")
    return model


def traced_max_rank(traced: torch.jit.ScriptModule) -> int:
    """The highest rank of any tensor a traced module computes (traced graphs record static sizes): the
    check that the graph fits ncnn before pnnx is run, since pnnx only logs what it cannot lower."""
    ranks = [0]
    for node in traced.inlined_graph.nodes():
        for value in node.outputs():
            kind = value.type()
            if isinstance(kind, torch._C.TensorType) and kind.sizes() is not None:
                ranks.append(len(kind.sizes()))
    return max(ranks)
