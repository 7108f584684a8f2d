"""Classifying images with any artifact or weights file, preprocessed the way its manifest records."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import data
from .artifact import resolve_artifact
from .errors import UsageError
from .quiet import held_back

log = logging.getLogger(__name__)


def classify(source: Path, images: list[Path], runtime: str = "auto", device: str = "cpu", top: int = 5,
             options: dict | None = None, threads: int | None = None) -> list[dict]:
    """Top classes of each image through any runtime, preprocessed as the model's manifest says:
    [{"image", "top": [{"class", "label", "probability"}, ...]}, ...], best first."""
    from .backends import open_runner
    from .parity import artifact_manifest

    source = resolve_artifact(source)
    # the images, the runtime and its device first: a bad one is the only line, nothing printed before it
    raw = [data.read_image(p) for p in images]
    with held_back("mixformer_deploy.checkpoints"):  # reported once, by artifact_manifest below
        runner = open_runner(source, runtime, device, threads=threads, options=options)
    try:
        manifest = artifact_manifest(source)
        if manifest.get("head") == "none":
            raise UsageError(f"{source.name} is a backbone (feature maps, no logits): predict needs a classifier artifact")
        height, width = (int(v) for v in manifest["input_size"])
        prep = data.Preprocessing.from_dict(manifest.get("preprocessing"))
        if manifest.get("seed") is not None and not (manifest.get("weights") or {}).get("sha256"):
            log.warning("this artifact holds seeded random weights (seed %s): its predictions mean nothing",
                        manifest["seed"])
        _warn_resized(images, raw, height, width)
        x = np.stack([data.preprocess(img, height, width, prep) for img in raw])
        probs = _softmax(data.run_batched(runner, x, data.fixed_batch(manifest)))
    finally:
        runner.close()
    return [{"image": str(path), "top": _top_classes(p, top, manifest.get("labels"))} for path, p in zip(images, probs)]


def _warn_resized(images: list[Path], raw: list[np.ndarray], height: int, width: int) -> None:
    """One warning naming every image whose size is not the model's: a resized photo (or a 1x1 icon) still
    gets confident classes, which is worth knowing."""
    odd = [f"{Path(p).name} {img.shape[0]}x{img.shape[1]}" for p, img in zip(images, raw)
           if tuple(img.shape[:2]) != (height, width)]
    if odd:
        shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
        log.warning("resized to the model's %dx%d (height x width): %s", height, width, shown)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, in float64 and shifted by each row's maximum, so that large logits do not overflow."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _top_classes(probs: np.ndarray, top: int, labels: list[str] | None) -> list[dict]:
    """The ``top`` most probable classes (ties in class order), named by the model's labels where it has them."""
    order = np.argsort(-probs, kind="stable")[:top]
    return [{"class": int(c), "label": labels[c] if labels and c < len(labels) else str(c),
             "probability": float(probs[c])} for c in order]
