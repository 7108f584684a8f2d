"""export(): weights -> deploy form -> a target's artifact (+ manifest) -> parity check.

An artifact only ever appears under its final name complete and, unless the check is skipped, verified:
it is written under a temporary name, and renamed when done. One that fails parity is kept for
inspection as ``<final name>.failed`` (with its sidecar), and an earlier good artifact is left alone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import load_checkpoint
from .data import Preprocessing, parse_size, photos
from .errors import RewriteError, UsageError
from .manifest import SCHEMA, artifact_name, now_iso, sidecar_path, tool_versions, write_json_atomic
from .model import MixFormer, check_input_size, create_model
from .shipped import DEFAULT_SIZE, default_weights, is_shipped
from .targets import ExportOptions, get_target

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


def load_source(weights: str | Path | None = None, variant: str | None = None,
                num_classes: int | None = None) -> SourceModel:
    """--weights (default: the shipped weights) or, with --variant alone, seeded random weights."""
    if weights is None and variant and variant.lower() != "auto":
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
    return SourceModel(lc.model, info, size, labels, prep)


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


def rewrite_error(model: MixFormer, deploy: torch.nn.Module, h: int, w: int) -> float:
    """Relative L2 between the deploy form and the reference on real photos: the rewrite's own error,
    reported apart from the backend's."""
    x = torch.from_numpy(photos(h, w, names=("chelsea", "astronaut"))[0])
    with torch.no_grad():
        ref, dep = model(x), deploy(x)
    return float((dep - ref).norm() / ref.norm().clamp_min(1e-30))


def parse_batch(batch: str | int | None) -> int | None:
    if batch is None or str(batch).lower() in ("dynamic", "dyn"):
        return None
    try:
        n = int(batch)
    except ValueError:
        raise UsageError(f"bad --batch {batch!r}: a positive integer or 'dynamic'") from None
    if n < 1:
        raise UsageError(f"bad --batch {batch!r}: a positive integer or 'dynamic'")
    return n


def output_path(output: str | Path | None, name: str, suffix: str) -> Path:
    out = Path(output) if output else Path("artifacts")
    if out.suffix.lower() == suffix:
        return out
    if out.suffix and not out.is_dir():
        raise UsageError(f"--output {out} must be a directory or a file ending in {suffix}")
    return out / name


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    parity: object | None = None

    @property
    def passed(self) -> bool:
        return self.parity is None or bool(self.parity.passed)

    def to_dict(self) -> dict:
        return {"artifact": str(self.path), "passed": self.passed, "manifest": self.manifest}


def export(weights: str | Path | None = None, target: str = "onnx", variant: str | None = None,
           img_size: str | int | None = None, batch: str | int | None = 1, precision: str = "fp32",
           opset: int | None = None, simplify: bool = True, output: str | Path | None = None, check: bool = True,
           num_classes: int | None = None, inputs: tuple[str, ...] | None = None) -> ExportResult:
    """Export weights to a target's artifact and (unless check=False) gate it on parity."""
    tgt = get_target(target)
    n = parse_batch(batch)
    tgt.check(precision, opset)  # before any weights are read
    source = load_source(weights, variant, num_classes)
    h, w = resolve_size(source, img_size)
    deploy = _to_deploy(source.model, h, w)
    manifest = base_manifest(source, tgt.key, tgt.runtime, h, w, n, precision, (tgt.extra, tgt.runtime, "onnxslim"))
    manifest["rewrite_error_rel_l2"] = rewrite_error(source.model, deploy, h, w)
    final = output_path(output, artifact_name(source.model.cfg.name, h, w, n, precision, tgt.suffix), tgt.suffix)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.partial{tgt.suffix}")
    try:
        tgt.export(deploy, ExportOptions(h, w, n, precision, opset, simplify), tmp, manifest)
        manifest["size_bytes"] = tmp.stat().st_size
        result = ExportResult(final, manifest)
        if check:
            from .parity import check_parity
            result.parity = check_parity(tmp, weights_model=source, inputs=inputs)
            manifest["parity"] = result.parity.summary()
        if not result.passed:
            final = final.with_name(final.name + ".failed")
            result.path = final
        os.replace(tmp, final)
        if result.parity is not None:
            result.parity.artifact = str(final)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(sidecar_path(final), manifest)
    return result


def _to_deploy(model: MixFormer, h: int, w: int):
    from .deploy import to_deploy
    try:
        return to_deploy(model, (h, w))
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError(f"deploy rewrite failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
