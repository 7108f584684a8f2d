"""Reading MixFormer checkpoints safely from any common layout, in one place.

Checkpoints are untrusted: ``.pt``/``.pth`` go through ``torch.load(weights_only=True)``; Paddle's
``.pdparams`` (a pickle) goes through an unpickler that admits numpy arrays and nothing else;
``.safetensors`` holds no code at all. Every layout is reduced to one flat PyTorch-named state dict,
derived buffers are dropped (and recomputed by the model), and loading is strict.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifact import sha256_file
from .errors import CheckpointError
from .model import MixFormer, MixFormerConfig, name_of

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pdparams")
_DERIVED = ("relative_position_index", "num_batches_tracked")
_PADDLE_INTERNAL = "StructuredToParameterName@@"
_WRAPPERS = ("state_dict", "model_ema", "ema", "model", "module", "net", "network", "params")
_PREFIXES = ("module.", "model.", "_orig_mod.", "ema.", "backbone.")
_BACKBONE = "backbone."
_CLASSIFIER = ("norm.", "last_proj.", "head.")          # what a backbone-only checkpoint may lack
_OUT_NORM = re.compile(r"norm\d+\.(weight|bias)$")      # per-output LayerNorms of detection backbones
# torch.save(..., _use_new_zipfile_serialization=False) opens with this pickled magic number
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


# ---------------------------------------------------------------- reading raw files

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the three globals numpy arrays need (numpy 1.x and 2.x spellings) and refuses the rest."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return getattr(np, "ndarray") if name == "ndarray" else (
                np.dtype if name == "dtype" else _numpy_attr(module, name))
        raise CheckpointError(f"refusing to unpickle {module}.{name}: the file would run code, not just hold arrays")

    def persistent_load(self, pid):
        raise CheckpointError("refusing a pickle with persistent references: not a plain array dict")


def _numpy_attr(module: str, name: str):
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return getattr(multiarray, name)


def _read_pdparams(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _NumpyOnlyUnpickler(f).load()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: a Paddle checkpoint must hold a dict, found {type(obj).__name__}")
    obj.pop(_PADDLE_INTERNAL, None)
    return _paddle_to_torch_names(obj)


def _paddle_to_torch_names(sd: dict) -> dict:
    """Paddle BatchNorm statistics -> PyTorch names; Paddle Linear weights ([in, out]) -> [out, in]."""
    out = {}
    for k, v in sd.items():
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"Paddle checkpoint entry {k!r} is not an array")
        k = k.replace("._mean", ".running_mean").replace("._variance", ".running_var")
        out[k] = torch.from_numpy(np.ascontiguousarray(v))
    for k, v in list(out.items()):
        if k.endswith(".weight") and v.ndim == 2:  # only Linear weights are 2-D in MixFormer
            out[k] = v.t().contiguous()
    return out


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        why = (f"it would import {found.group(1)}; only tensors and plain containers are read "
               "(save model.state_dict(), not the model object)") if found else (
            " ".join(text.split())[:200] or "unsafe content")
        raise CheckpointError(f"{path.name}: refused to load: {why}") from e


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def read_raw(path: str | Path) -> tuple[dict, str]:
    """Read a checkpoint file into a flat dict of tensors; returns it and the detected format."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path.name}: file is empty")
    try:
        if path.suffix == ".pdparams" or (head[:1] == b"\x80" and not head.startswith(_TORCH_LEGACY_MAGIC)
                                          and not zipfile.is_zipfile(path)):
            fmt, raw = "paddle", _read_pdparams(path)
        elif path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
            fmt, raw = "safetensors", _read_safetensors(path)
        elif zipfile.is_zipfile(path) or head[:1] == b"\x80":
            fmt, raw = "torch", _read_torch(path)
        else:
            raise CheckpointError("not a checkpoint (neither a PyTorch zip or pickle, safetensors, nor Paddle file)")
    except CheckpointError as e:
        if str(e).startswith(f"{path.name}:"):
            raise
        raise CheckpointError(f"{path.name}: {e}") from e  # name the file (the unpickler cannot)
    except Exception as e:  # corrupt / truncated / not a checkpoint: one line, no traceback
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{path.name}: not a readable checkpoint ({type(e).__name__}: {msg})") from e
    return unwrap(raw, path.name), fmt


def unwrap(obj: object, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside the usual containers and strip wrapper prefixes (DDP, Lightning, EMA)."""
    for _ in range(4):
        if isinstance(obj, dict) and not _looks_like_state_dict(obj):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict) and obj[k]), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _looks_like_state_dict(obj):
        raise CheckpointError(f"{name}: no MixFormer state dict found (top-level keys: "
                              f"{_preview(obj.keys()) if isinstance(obj, dict) else type(obj).__name__})")
    sd = _strip_prefixes({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    backbone = [k for k in sd if k.startswith(_BACKBONE)]
    if backbone and len(backbone) < len(sd):  # a detection/segmentation model: its backbone's tensors
        others = sorted({k.split(".")[0] for k in sd if not k.startswith(_BACKBONE)})
        log.info("%s: took the %d backbone.* tensors, ignored %d others (%s)", name, len(backbone),
                 len(sd) - len(backbone), ", ".join(others[:6]))
        sd = _strip_prefixes({k: sd[k] for k in backbone})
    return sd


def _strip_prefixes(sd: dict) -> dict:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _looks_like_state_dict(d: dict) -> bool:
    tensors = [v for v in d.values() if isinstance(v, torch.Tensor)]
    return bool(tensors) and len(tensors) >= len(d) // 2


def _preview(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more


# ---------------------------------------------------------------- variant inference

def infer_config(sd: dict[str, torch.Tensor]) -> MixFormerConfig:
    """Reconstruct the architecture from tensor shapes alone (variant name when it is a known one)."""
    try:
        embed_dim = sd["patch_embed.proj.weight"].shape[0]
        in_chans = sd["patch_embed.stem.0.weight"].shape[1]
        patch = 2 * sd["patch_embed.proj.weight"].shape[-1]
        stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
        depths, heads = [], []
        for s in stages:
            blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{s}\.blocks\.(\d+)\.", k))}
            depths.append(len(blocks))
            table = sd[f"layers.{s}.blocks.0.attn.relative_position_bias_table"]
            heads.append(table.shape[1])
        window = (math.isqrt(table.shape[0]) + 1) // 2
        hidden = sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
        kernel = sd["layers.0.blocks.0.attn.dwconv3x3.0.weight"].shape[-1]
        head_w = sd.get("head.weight")
        num_classes = head_w.shape[0] if head_w is not None else 0
        cfg = MixFormerConfig(
            embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), num_classes=num_classes,
            window_size=window, dwconv_kernel_size=kernel, mlp_ratio=hidden / embed_dim,
            qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd, patch_size=patch, in_chans=in_chans,
            head_dim=sd["last_proj.weight"].shape[0] if "last_proj.weight" in sd else MixFormerConfig.head_dim)
    except (KeyError, IndexError, UnboundLocalError) as e:
        raise CheckpointError(f"cannot infer a MixFormer architecture from the checkpoint (missing {e})") from e
    return MixFormerConfig(**{**cfg.to_dict(), "depths": tuple(depths), "num_heads": tuple(heads),
                              "name": name_of(cfg)})


# ---------------------------------------------------------------- loading

@dataclass
class LoadedCheckpoint:
    model: MixFormer
    config: MixFormerConfig
    format: str
    sha256: str
    path: Path
    metadata: dict
    has_classifier: bool = True      # False: a backbone-only checkpoint (no head / last_proj / final norm)
    out_norms: dict | None = None    # norm{i}.weight/bias of a detection backbone, for --out-norm


def check_finite(sd: dict[str, torch.Tensor], name: str) -> None:
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{name}: {len(bad)} tensor(s) hold NaN or Inf, e.g. {_preview(bad, 3)}")


def load_state_dict_strict(model: MixFormer, sd: dict[str, torch.Tensor], name: str = "checkpoint",
                           backbone_only: bool = False) -> None:
    """Strict load that names what does not fit: missing, unexpected and mis-shaped keys.
    ``backbone_only``: the classifier's tensors may be absent (they keep their initial values)."""
    sd = {k: v for k, v in sd.items() if not k.endswith(_DERIVED)}
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(_DERIVED)}
    if backbone_only:
        own = {k: v for k, v in own.items() if k in sd or not k.startswith(_CLASSIFIER)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or misshaped:
        parts = [f"{label} {len(keys)}: {_preview(keys, 3)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise CheckpointError(f"{name}: state dict does not fit the model; " + "; ".join(parts))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k].to(v.dtype))


def _safetensors_metadata(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return {}
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def load_checkpoint(path: str | Path, variant: str | None = None, num_classes: int | None = None) -> LoadedCheckpoint:
    """Read, unwrap, convert, infer (or check) the architecture, and load strictly."""
    path = Path(path)
    sd, fmt = read_raw(path)
    check_finite(sd, path.name)
    out_norms = {k: sd.pop(k) for k in list(sd) if _OUT_NORM.match(k)} or None
    backbone_only = not all(any(k.startswith(p) for k in sd) for p in _CLASSIFIER)
    if backbone_only:
        log.info("%s: a backbone-only checkpoint (no classifier head): it exports with --head none", path.name)
    inferred = infer_config(sd)
    meta = _safetensors_metadata(path)
    if variant and variant.lower() != "auto":
        from .model import variant_config
        cfg = variant_config(variant, num_classes=num_classes or inferred.num_classes)
    else:
        if num_classes is not None and num_classes != inferred.num_classes:
            raise CheckpointError(f"{path.name}: checkpoint has {inferred.num_classes} classes, not {num_classes}")
        cfg = inferred
        log.info("inferred %s (embed_dim %d, depths %s, heads %s, %d classes) from %s", cfg.name, cfg.embed_dim,
                 list(cfg.depths), list(cfg.num_heads), cfg.num_classes, path.name)
    model = MixFormer(cfg)
    load_state_dict_strict(model, sd, path.name, backbone_only)
    return LoadedCheckpoint(model.eval(), cfg, fmt, sha256_file(path), path, meta, not backbone_only, out_norms)


def load_model(path: str | Path, variant: str | None = None, num_classes: int | None = None) -> MixFormer:
    """Load a trained MixFormer from .pt/.pth/.safetensors/.pdparams, in eval mode."""
    return load_checkpoint(path, variant, num_classes).model


def describe_config(cfg: MixFormerConfig) -> str:
    """custom (embed_dim 16, depths [1,1,2,1], heads [1,2,4,8], 10 classes)"""
    lst = lambda xs: "[" + ",".join(str(x) for x in xs) + "]"  # noqa: E731
    return (f"{cfg.name} (embed_dim {cfg.embed_dim}, depths {lst(cfg.depths)}, heads {lst(cfg.num_heads)}, "
            f"{cfg.num_classes} classes)")


def save_safetensors(model: MixFormer, out: str | Path, extra: dict | None = None) -> Path:
    """Write a clean PyTorch state dict (derived buffers dropped) with a JSON manifest in its metadata,
    atomically (temporary name, then rename)."""
    from safetensors.torch import save_file
    out = Path(out)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith(_DERIVED)}
    meta = {"format": "mixformer-deploy", "variant": model.cfg.name, "config": json.dumps(model.cfg.to_dict()),
            "num_classes": str(model.cfg.num_classes)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    from .artifact import atomic_file

    with atomic_file(out) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return out


# ---------------------------------------------------------------- converting

_RESERVED = ("format", "variant", "config", "num_classes")   # written afresh by save_safetensors


def convert_weights_file(src: str | Path, out: str | Path, variant: str | None = None,
                         num_classes: int | None = None, input_size: tuple[int, int] | None = None) -> dict:
    """Load ``src`` safely, write a clean safetensors ``out``; returns the summary (also in its metadata).

    ``variant``: B0..B6 the weights must fit (None or "auto": inferred from them); ``input_size``: (height,
    width) to record. The source's own metadata is kept, and its name, sha256 and format are added, so
    that the clean file still says where it came from."""
    from . import __version__
    from .errors import UsageError
    from .model import check_input_size, count_params

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"output {out.name!r} must end in .safetensors")
    name = None if variant is None or variant.lower() == "auto" else variant
    ck = load_checkpoint(src, name, num_classes)
    if input_size is not None:
        check_input_size(ck.config, *input_size)
    extra = {k: v for k, v in ck.metadata.items() if k not in _RESERVED}
    extra.update({"source": ck.path.name, "source_sha256": ck.sha256, "source_format": ck.format,
                  "converted_by": f"mixformer-deploy {__version__}"})
    if input_size is not None:
        extra["input_size"] = f"{input_size[0]}x{input_size[1]}"
    path = save_safetensors(ck.model, out, extra=extra)
    return {
        "output": str(path), "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
        "variant": ck.config.name, "inferred": name is None, "description": describe_config(ck.config),
        "config": ck.config.to_dict(), "num_classes": ck.config.num_classes, "parameters": count_params(ck.model),
        "input_size": extra.get("input_size"), "source": str(ck.path), "source_sha256": ck.sha256,
        "source_format": ck.format,
    }
