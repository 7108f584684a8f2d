"""What the backends that run on XNNPACK share (ExecuTorch's XNNPACK delegate, LiteRT's XNNPACK delegate):
the XNNPACK form of the deploy form, the choice of graph form, and their one PT2E int8 quantization.

The deploy form is the right shape for ONNX-style graph runtimes, but ExecuTorch's XNNPACK partitioner
takes an op only in the forms XNNPACK has kernels for, and leaves everything else on the portable
(reference C++) kernels, one op at a time. Measured on B1 224: 75 addmm, 77 native_layer_norm, 60
expand_copy, 16 mean and 15 split stayed off XNNPACK. Each swap below removes one of those causes:

- ``TokenPointwise`` runs 1x1 convs as ``F.linear(x, conv.weight.flatten(1))``: a weight computed in the
  graph, not a constant, so XNNPACK's fully-connected kernel cannot pack it (-> addmm on portable). Here
  they are real ``nn.Linear`` modules with the reshaped weights.
- XNNPACK has no LayerNorm: ``XnnLayerNorm`` computes it from ops it has. The mean and the variance over
  channels are GEMVs with a constant 1/C column (fully connected, one output), then sub, mul, rsqrt,
  mul, add: two-pass, as precise as torch's kernel.
- ``mean`` is taken only as global average pooling (rank 4, dims (2, 3), keepdim): the conv branch's
  channel mean is taken on the NCHW map the depth-wise conv produces anyway, and the final token pool on a
  (B, C, N, 1) view.
- ``q @ k^T`` on rank-4 tensors becomes expand + bmm (the expand on portable), and the qkv split becomes
  split_with_sizes (portable): here q, k and v are three Linear modules and the products are rank-3
  ``bmm`` with heads folded into the batch.
- The relative-position bias is stored row-major: with one head, the deploy form's permuted constant has
  strides (1, N, 1), which torch calls contiguous but ExecuTorch 1.5.1 serializes into a tensor XNNPACK
  cannot reshape (the .pte fails at run time, error 0x1 or 0x10).

Module names stay those of the deploy form (``stages.0.0.norm1``, ``stages.0.0.attention.logits``,
``pool``, ``head``, and ``stages.0.0.attention.qkv`` now holding q, k, v), so precision keeps resolved
against the deploy form name the same parts here. ``to_xnnpack(deploy)`` returns a new module; the deploy
form is untouched. Equivalence with the deploy form is tested at 1e-6 (tests/test_executorch.py).

int8 (``pt2e_int8``): torch.export, then the backend's PT2E quantizer observes the calibration images and
the graph is converted. Each backend brings its quantizer (the scheme its converter lowers); the capture,
the calibration batches and the conversion are the same for both.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.precision import kept_by
from ..errors import ExportError, RewriteError, UsageError, one_line
from ..optional import require
from ..deploy.layers import AttentionLogits, TokenMean, TokenPointwise, WindowAttention, partition
from ..deploy.compact import CompactBlock
from ..deploy.model import DeployBlock, DeployMixFormer, adopt_block


class XnnLayerNorm(nn.Module):
    """LayerNorm over the last axis from ops XNNPACK runs: mean and variance as GEMVs with a constant
    1/C weight, then elementwise ops. ``weight``/``bias`` are the original parameters."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        if len(ln.normalized_shape) != 1:
            raise RewriteError(f"XnnLayerNorm normalizes the last axis only, not {tuple(ln.normalized_shape)}")
        c = ln.normalized_shape[0]
        self.eps = ln.eps
        self.register_buffer("average", torch.full((1, c), 1.0 / c, dtype=ln.weight.dtype))
        self.weight, self.bias = ln.weight, ln.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - F.linear(x, self.average)
        var = F.linear(d * d, self.average)
        y = d * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


class XnnTokenMean(nn.Module):
    """Global average pooling of (B*N, C) tokens -> (B, C), taken as rank-4 mean over (2, 3), keepdim."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        x = x.reshape(-1, self.tokens, c).permute(0, 2, 1).reshape(-1, c, self.tokens, 1)
        return x.mean(dim=(2, 3), keepdim=True).reshape(-1, c)


class XnnQKV(nn.Module):
    """The qkv projection as three Linear modules (no split in the graph)."""

    def __init__(self, qkv: nn.Linear):
        super().__init__()
        c = qkv.out_features // 3
        self.q, self.k, self.v = (_linear(qkv.weight[i * c:(i + 1) * c],
                                          None if qkv.bias is None else qkv.bias[i * c:(i + 1) * c])
                                  for i in range(3))

    def forward(self, x: torch.Tensor):
        return self.q(x), self.k(x), self.v(x)


class XnnAttentionLogits(nn.Module):
    """softmax(q @ k^T + relative bias) on rank-3 (B*nW*heads, N, d) operands, as one bmm."""

    def __init__(self, logits: AttentionLogits, heads: int):
        super().__init__()
        self.heads = heads
        bias = logits.rel_bias().detach()  # (heads, N, N)
        # fresh row-major strides: with one head, the deploy form's permuted constant has strides (1, N, 1),
        # which torch calls contiguous but ExecuTorch serializes into a tensor XNNPACK cannot reshape
        self.register_buffer("bias", bias.reshape(-1).clone().reshape(bias.shape))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        n = q.shape[1]
        a = torch.bmm(q, k.transpose(1, 2))
        return torch.softmax(a.reshape(-1, self.heads, n, n) + self.bias, dim=-1).reshape(-1, n, n)


class XnnWindowAttention(nn.Module):
    def __init__(self, att: WindowAttention):
        super().__init__()
        self.heads, self.scale = att.heads, att.scale
        self.qkv = XnnQKV(att.qkv)
        self.logits = XnnAttentionLogits(att.logits, att.heads)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Window tokens (B*nW*n, C) -> attention output (B*nW, n, C)."""
        c = x.shape[-1]
        h, d = self.heads, c // self.heads
        if h == 1:  # no head axis to move
            q, k, v = (t.reshape(-1, n, d) for t in self.qkv(x))
        else:
            q, k, v = (t.reshape(-1, n, h, d).permute(0, 2, 1, 3).reshape(-1, n, d) for t in self.qkv(x))
        if self.scale != 1.0:
            q = q * self.scale
        o = torch.bmm(self.logits(q, k), v)
        return o.reshape(-1, n, c) if h == 1 else o.reshape(-1, h, n, d).permute(0, 2, 1, 3).reshape(-1, n, c)


class XnnBlock(DeployBlock):
    """A DeployBlock whose pointwise convs are Linear modules, whose attention is rank-3 bmm and whose
    channel mean is global average pooling on the conv's NCHW output."""

    def __init__(self, block: DeployBlock):
        nn.Module.__init__(self)
        adopt_block(self, block)
        for name in ("channel_interaction", "projection", "spatial_interaction"):
            setattr(self, name, _linear_seq(getattr(block, name)))
        self.attention = XnnWindowAttention(block.attention)

    def mix(self, y: torch.Tensor) -> torch.Tensor:
        ws, hp, wp = self.ws, self.hp, self.wp
        dim, n = y.shape[-1], ws * ws
        a = partition(self.proj_attn_norm(self.proj_attn(y)), ws, hp, wp)
        c = self.proj_cnn_norm(self.proj_cnn(y)).reshape(-1, hp, wp, dim).permute(0, 3, 1, 2)
        c = self.dwconv3x3(c)  # (B, C, Hp, Wp)
        gate = torch.sigmoid(self.channel_interaction(c.mean(dim=(2, 3), keepdim=True).reshape(-1, dim)))
        c = partition(self.projection(c.permute(0, 2, 3, 1).reshape(-1, dim)), ws, hp, wp)
        o = self.attention(a, n)
        half = o.shape[-1]
        o = (o.reshape(-1, self.n_windows * n, half) * gate.reshape(-1, 1, half)).reshape(-1, half)
        c = self.conv_norm(torch.sigmoid(self.spatial_interaction(o)) * c)
        return self.proj(torch.cat([self.attn_norm(o), c], dim=-1))


class XnnCompactBlock(CompactBlock):
    """A CompactBlock (deploy/compact.py) with XnnBlock's swaps: Linear interactions, rank-3 bmm attention,
    the channel mean as global average pooling."""

    def __init__(self, block: CompactBlock):
        nn.Module.__init__(self)
        adopt_block(self, block)
        for name in ("channel_interaction", "spatial_interaction"):
            setattr(self, name, _linear_seq(getattr(block, name)))
        self.attention = XnnWindowAttention(block.attention)

    def _channel_mean(self, c: torch.Tensor) -> torch.Tensor:
        return c.mean(dim=(2, 3), keepdim=True).reshape(-1, c.shape[1])

    def _gated_attention(self, a: torch.Tensor, n: int, gate: torch.Tensor) -> torch.Tensor:
        o = self.attention(a, n)
        half = o.shape[-1]
        return (o.reshape(-1, self.n_windows * n, half) * gate.reshape(-1, 1, half)).reshape(-1, half)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _linear_seq(tp: nn.Module) -> nn.Sequential:
    """TokenPointwise(Sequential of 1x1 convs / GELU / Identity) -> Sequential of Linear / GELU."""
    if not isinstance(tp, TokenPointwise):
        raise RewriteError(f"to_xnnpack expected a TokenPointwise, found {type(tp).__name__}")
    out = []
    for m in tp.seq:
        if isinstance(m, nn.Conv2d):
            if m.kernel_size != (1, 1) or m.groups != 1:
                raise RewriteError(f"to_xnnpack: a pointwise branch holds a {m.kernel_size} conv")
            out.append(_linear(m.weight.detach().flatten(1), None if m.bias is None else m.bias.detach()))
        elif isinstance(m, nn.BatchNorm2d):
            raise RewriteError("to_xnnpack expects the deploy form's folded BatchNorms (run to_deploy first)")
        elif not isinstance(m, nn.Identity):
            out.append(m)
    return nn.Sequential(*out)


@torch.no_grad()
def to_xnnpack(deploy: DeployMixFormer) -> DeployMixFormer:
    """A copy of the deploy form in XNNPACK's shapes (same function, same module names)."""
    if not isinstance(deploy, DeployMixFormer):
        raise RewriteError(f"to_xnnpack expects a DeployMixFormer, got {type(deploy).__name__}")
    model = copy.deepcopy(deploy).eval()
    counts = {"blocks": 0, "layer_norms": 0, "pool": 0}
    for stage in model.stages:
        for i, block in enumerate(stage):
            if isinstance(block, (XnnBlock, XnnCompactBlock)):
                continue
            if isinstance(block, CompactBlock):
                stage[i] = XnnCompactBlock(block)
            elif isinstance(block, DeployBlock):
                stage[i] = XnnBlock(block)
            counts["blocks"] += 1
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.LayerNorm):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, XnnLayerNorm(m))
            counts["layer_norms"] += 1
    if isinstance(model.pool, TokenMean):
        model.pool = XnnTokenMean(model.pool.tokens)
        counts["pool"] += 1
    elif model.pool is None:  # a backbone: no pooling
        del counts["pool"]
    missing = [k for k, v in counts.items() if not v]
    if missing:
        raise RewriteError(f"to_xnnpack found nothing to rewrite for {', '.join(missing)}: "
                           "the deploy form is not the expected one")
    return model.eval()


def graph_form(deploy: DeployMixFormer, form: str) -> nn.Module:
    """The graph a backend lowers: ``"xnnpack"`` (the XNNPACK form) or ``"deploy"`` (the deploy form as is,
    to measure what the XNNPACK form buys)."""
    if form == "deploy":
        return deploy.eval()
    if form != "xnnpack":
        raise UsageError(f"bad graph form {form!r}: xnnpack or deploy")
    return to_xnnpack(deploy)


def kept_filter(keeps: list[str]):
    """A node filter for a PT2E quantizer: False for nodes inside a kept module (or an XnnLayerNorm:
    quantizing a normalization's mean and variance GEMVs is never wanted)."""
    keeps = list(keeps)

    def quantize(node) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        for path, kind in stack.values():
            if kept_by(_clean_path(path), keeps) or "XnnLayerNorm" in str(kind):
                return False
        return True
    return quantize


def _clean_path(path: str) -> str:
    """nn_module_stack paths: 'stages.0.0.norm1' (non-strict) or "L['self'].stages[0]..." (strict)."""
    p = path.replace("L['self'].", "").replace("L__self__.", "")
    return p.replace("[", ".").replace("]", "").replace("'", "")


def pt2e_int8(module: nn.Module, example: tuple, quantizer, calibration, batch: int, extra: str,
              fold_quantize: bool = True) -> torch.fx.GraphModule:
    """PT2E static int8: capture ``module``, let ``quantizer`` observe every calibration batch (full
    batches in the static shape the graph was captured with), convert. ``fold_quantize=False`` leaves the
    weights' quantize ops in the graph for a converter that folds them itself (litert-torch). ``extra``: the
    backend's extra, named when torchao is missing and in errors."""
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", extra)
    if calibration is None:
        raise UsageError(f"{extra} int8 needs calibration images")
    try:
        captured = torch.export.export(module, example, strict=False).module()
        prepared = pt2e.prepare_pt2e(captured, quantizer)
        for x in calibration.batches(batch):
            prepared(torch.from_numpy(x).float())
        return pt2e.convert_pt2e(prepared, fold_quantize=fold_quantize)
    except Exception as e:
        raise ExportError(f"{extra}: PT2E int8 quantization failed: {one_line(e)}") from e
