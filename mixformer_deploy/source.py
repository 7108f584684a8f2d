"""Where a reference model comes from (given weights, the shipped weights, or seeded random weights) and
the manifest fields every artifact and every check shares. Below export, parity and bench alike."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import load_checkpoint
from .data import Preprocessing, parse_size
from .manifest import SCHEMA, now_iso, tool_versions
from .model import MixFormer, check_input_size, create_model
from .shipped import DEFAULT_SIZE, default_weights, is_shipped

log = logging.getLogger(__name__)
RANDOM_SEED = 0


@dataclass
class SourceModel:
    """The reference model and everything known about where it came from."""

    model: MixFormer
    weights: dict
    input_size: tuple[int, int] | None = None
    labels: list[str] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    seed: int | None = None
    has_classifier: bool = True          # False: backbone-only weights (export with head none)
    out_norms: dict | None = None        # per-output LayerNorm tensors (norm{i}.*) of a detection backbone


def load_source(weights: str | Path | None = None, variant: str | None = None,
                num_classes: int | None = None) -> SourceModel:
    """--weights (default: the shipped weights) or, with --variant alone, seeded random weights."""
    if weights is None and variant and variant.lower() != "auto":
        from .model import variant_config
        variant_config(variant)  # an unknown variant is rejected before anything is said about it
        log.warning("no --weights: %s with seeded random weights (seed %d) - fine for latency and parity, "
                    "not for accuracy", variant.upper(), RANDOM_SEED)
        model = create_model(variant, num_classes=num_classes or 1000, seed=RANDOM_SEED)
        return SourceModel(model, {"name": None, "sha256": None, "format": "seeded-random", "shipped": False},
                           seed=RANDOM_SEED)
    path = Path(weights) if weights is not None else default_weights()
    lc = load_checkpoint(path, variant, num_classes)
    meta = lc.metadata
    size = parse_size(meta["input_size"]) if meta.get("input_size") else None
    labels = _meta_json(meta, "labels")
    prep = Preprocessing.from_dict(_meta_json(meta, "preprocessing"))
    info = {"name": path.name, "sha256": lc.sha256, "format": lc.format, "shipped": is_shipped(lc.sha256)}
    return SourceModel(lc.model, info, size, labels, prep, has_classifier=lc.has_classifier, out_norms=lc.out_norms)


def backbone_of(source: SourceModel, out_indices=None, out_norm: bool = False):
    """The reference backbone (features_0..3, NCHW) of a source model; ``out_norm`` takes the per-output
    LayerNorms from its checkpoint (CheckpointError naming the missing keys otherwise)."""
    from .model.backbone import backbone

    return backbone(source.model, out_indices, out_norm, source.out_norms, source.weights.get("name") or "the weights")


def _meta_json(meta: dict, key: str):
    """A JSON value of a checkpoint's metadata; unreadable values are ignored with a warning."""
    try:
        return json.loads(meta[key]) if meta.get(key) else None
    except ValueError:
        log.warning("ignoring unreadable %r in the checkpoint metadata", key)
        return None


def resolve_size(source: SourceModel, img_size: str | int | None) -> tuple[int, int]:
    h, w = parse_size(img_size) if img_size else (source.input_size or (DEFAULT_SIZE, DEFAULT_SIZE))
    check_input_size(source.model.cfg, h, w)
    return h, w


def base_manifest(source: SourceModel, target_key: str, runtime: str, h: int, w: int, batch: int | None,
                  precision: str, extra_versions: tuple[str, ...] = ()) -> dict:
    cfg = source.model.cfg
    return {
        "schema": SCHEMA, "target": target_key, "runtime": runtime, "variant": cfg.name, "config": cfg.to_dict(),
        "num_classes": cfg.num_classes, "labels": source.labels, "input_size": [h, w],
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "shape": [batch or "batch", 3, h, w]},
        "batch": batch if batch is not None else "dynamic", "precision": precision,
        "preprocessing": source.preprocessing.to_dict(), "weights": source.weights, "seed": source.seed,
        "versions": tool_versions(*extra_versions), "created": now_iso(),
    }
