"""Calibration images for int8 exports, shared by every target that quantizes.

Why these rules: calibration must never see the images that judge accuracy (the 360 held-out digits),
so with the shipped weights the default is the first N images of the digits *training* split; with any
other weights there is no data we could honestly pick, so a folder is required. A folder's images may
have any mode and size: they are converted to RGB and resized with the artifact's preprocessing.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from . import data
from .errors import InputFileError, UsageError
from .backends.exporter import Calibration

log = logging.getLogger(__name__)
DEFAULT_SIZE = 300


def image_files(folder: Path) -> list[Path]:
    """Images under ``folder`` (recursively), in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in data.IMAGE_SUFFIXES)


def load_calibration(folder: str | Path | None, size: int, height: int, width: int, prep: data.Preprocessing,
                     shipped: bool) -> Calibration:
    if size < 1:
        raise UsageError(f"bad --calibration-size {size}: at least 1")
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise InputFileError(f"calibration folder not found: {folder}")
        files = image_files(folder)[:size]
        if not files:
            raise InputFileError(f"{folder}: calibration folder holds no images ({', '.join(data.IMAGE_SUFFIXES)})")
        log.warning("calibration: %d image(s) from %s, converted to RGB and resized to %dx%d with the model's "
                    "preprocessing", len(files), folder, height, width)
        x = np.stack([data.preprocess(data.read_image(p), height, width, prep) for p in files])
        listing = "\n".join(str(p.relative_to(folder)) for p in files)
        record = {"source": str(folder), "count": len(files),
                  "sha256": hashlib.sha256(listing.encode()).hexdigest()}
        return Calibration(x, record)
    if not shipped:
        raise UsageError("int8 needs calibration images for these weights: pass --calibration DIR "
                         "(a folder of representative images)")
    xtr, _, _, _ = data.digits_split()
    images = xtr[:size]
    x = data.digits_to_inputs(images, height, width, prep)
    record = {"source": "digits-train (shipped weights' training split, never the held-out set)",
              "count": len(images), "sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()}
    return Calibration(x, record)
