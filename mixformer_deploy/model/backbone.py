"""MixFormer as a dense-task backbone: the classifier head dropped, each stage's output before its
downsampling returned as an NCHW feature map (strides 4, 8, 16, 32), as detection (Mask R-CNN) and
segmentation (UPerNet) heads take it. Optionally a LayerNorm per output (``norm{i}``), as detection
backbones add; its weights come from a checkpoint that has them (a detection training run)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, UsageError
from .mixformer import EPS, MixFormer


def stage_channels(model: MixFormer) -> list[int]:
    return [model.cfg.embed_dim * 2 ** i for i in range(len(model.cfg.depths))]


def parse_out_indices(value, stages: int = 4) -> tuple[int, ...]:
    """'0,1,2,3' (or a sequence) -> sorted unique stage indices, each in [0, stages)."""
    if value is None:
        return tuple(range(stages))
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        idx = sorted({int(str(i).strip()) for i in items if str(i).strip() != ""})
    except ValueError:
        raise UsageError(f"bad --out-indices {value!r}: comma-separated stage indices, e.g. 0,1,2,3") from None
    if not idx or idx[0] < 0 or idx[-1] >= stages:
        raise UsageError(f"bad --out-indices {value!r}: stage indices between 0 and {stages - 1}")
    return tuple(idx)


def out_norm_keys(index: int) -> tuple[str, str]:
    return f"norm{index}.weight", f"norm{index}.bias"


def build_out_norms(model: MixFormer, out_indices: tuple[int, ...], tensors: dict[str, torch.Tensor],
                    name: str = "checkpoint") -> nn.ModuleDict:
    """LayerNorms for the chosen outputs from a checkpoint's ``norm{i}.weight/bias``; missing keys are a
    CheckpointError naming them (the weights come from a detection or segmentation training run)."""
    dims = stage_channels(model)
    missing = [k for i in out_indices for k in out_norm_keys(i) if k not in tensors]
    if missing:
        raise CheckpointError(f"{name}: --out-norm needs the per-output LayerNorm weights of a detection/segmentation "
                              f"checkpoint; missing {len(missing)}: {', '.join(missing)}")
    norms = nn.ModuleDict()
    for i in out_indices:
        w, b = (tensors[k] for k in out_norm_keys(i))
        if tuple(w.shape) != (dims[i],) or tuple(b.shape) != (dims[i],):
            raise CheckpointError(f"{name}: norm{i} has shape {tuple(w.shape)}, stage {i} has {dims[i]} channels")
        ln = nn.LayerNorm(dims[i], eps=EPS)
        with torch.no_grad():
            ln.weight.copy_(w.float())
            ln.bias.copy_(b.float())
        norms[str(i)] = ln
    return norms.eval()


class MixFormerBackbone(nn.Module):
    """The reference function of a backbone artifact: ``forward`` returns the feature maps
    (``features_{i}``, (B, C_i, H/2^(i+2), W/2^(i+2))) in ``out_indices`` order."""

    def __init__(self, model: MixFormer, out_indices: tuple[int, ...] | None = None,
                 out_norms: nn.ModuleDict | None = None):
        super().__init__()
        self.model, self.cfg = model, model.cfg
        self.out_indices = parse_out_indices(out_indices, len(model.cfg.depths))
        self.out_norms = out_norms

    @property
    def output_names(self) -> list[str]:
        return [f"features_{i}" for i in self.out_indices]

    def outputs(self, height: int, width: int, batch: int | str | None = 1) -> list[dict]:
        """Name, channels, stride and shape of each output (recorded in manifests)."""
        p, dims = self.cfg.patch_size, stage_channels(self.model)
        h, w, out = -(-height // p), -(-width // p), []
        for i in range(max(self.out_indices) + 1):
            if i in self.out_indices:
                out.append({"name": f"features_{i}", "channels": dims[i], "stride": p * 2 ** i,
                            "shape": [batch or "batch", dims[i], h, w], "layout": "NCHW"})
            h, w = (h + 1) // 2, (w + 1) // 2
        return out

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """stem, stage0..K (the reference's layouts, for localization), then the feature maps."""
        st = self.model.forward_stages(x)
        last = max(self.out_indices)
        out = {"stem": st["stem"], **{f"stage{i}": st[f"stage{i}"] for i in range(last + 1)}}
        h, w = st["stem"].shape[-2:]
        for i in range(last + 1):
            if i in self.out_indices:
                t = st[f"stage{i}"]
                if self.out_norms is not None:
                    t = self.out_norms[str(i)](t)
                out[f"features_{i}"] = t.transpose(1, 2).reshape(t.shape[0], t.shape[-1], h, w)
            h, w = (h + 1) // 2, (w + 1) // 2
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        st = self.forward_stages(x)
        return tuple(st[n] for n in self.output_names)


def backbone(model: MixFormer, out_indices=None, out_norm: bool = False, tensors: dict | None = None,
             name: str = "the weights") -> MixFormerBackbone:
    """The reference backbone of ``model``: the chosen stages, with the per-output LayerNorms built from a
    checkpoint's ``norm{i}`` ``tensors`` when ``out_norm`` (CheckpointError naming the missing keys)."""
    idx = parse_out_indices(out_indices, len(model.cfg.depths))
    norms = build_out_norms(model, idx, tensors or {}, name) if out_norm else None
    return MixFormerBackbone(model, idx, norms).eval()
