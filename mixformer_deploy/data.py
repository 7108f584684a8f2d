"""Inputs: bundled real photos, the digits dataset (the shipped weights' data), image folders, seeded
random batches, the one preprocessing every runner shares, and running any runner over them in batches
(parity, predict and the benchmarks feed artifacts the same way)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputFileError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field", "camera")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2
KEYWORD_INPUTS = ("photos", "random", "dataset")
RANDOM_COUNT = 4


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become the model's input; recorded in every artifact's manifest."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    layout: str = "NCHW"
    resize: str = "anti-aliased (skimage.transform.resize)"

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "layout": self.layout, "resize": self.resize,
                "scale": "pixels / 255 (RGB)"}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocessing":
        if not d:
            return cls()
        return cls(mean=tuple(d.get("mean", IMAGENET_MEAN)), std=tuple(d.get("std", IMAGENET_STD)))


def preprocess(image: np.ndarray, height: int, width: int, prep: Preprocessing = Preprocessing()) -> np.ndarray:
    """HxW, HxWx3 or HxWx4 pixels in [0, 255] (or [0, 1] floats) -> 3xHxW normalized float32."""
    from skimage.transform import resize

    img = np.asarray(image)
    if img.dtype == np.uint8 or img.max() > 1.0:
        img = img.astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3].astype(np.float32)
    img = resize(img, (height, width), anti_aliasing=True, preserve_range=True).astype(np.float32)
    img = (img - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def read_image(path: str | Path) -> np.ndarray:
    """Any image mode as RGB in [0, 255] (uint8) or [0, 1] (float, for 16-bit and float images): grey,
    grey + alpha, palette, CMYK and RGBA are converted by Pillow; 16-bit pixels are scaled by 65535, not 255."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I") or im.mode == "F":   # 16/32-bit integer or float grey
                grey = np.asarray(im, dtype=np.float64)
                if im.mode == "F":
                    top = max(1.0, float(grey.max()))
                else:   # "I;16*" always, "I" when its values need more than 8 bits
                    top = 65535.0 if im.mode.startswith("I;16") or grey.max() > 255 else 255.0
                img = np.stack([np.clip(grey / top, 0, 1).astype(np.float32)] * 3, axis=-1)
            else:
                img = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise InputFileError(f"{path.name}: not a readable image ({type(e).__name__})") from e
    if min(img.shape[:2]) < 1:
        raise InputFileError(f"{path.name}: not a 2-D image (shape {img.shape})")
    return img


def photos(height: int, width: int, prep: Preprocessing = Preprocessing(), names=PHOTOS) -> tuple[np.ndarray, list[str]]:
    """The bundled real photos (scikit-image's samples, shipped in its wheel; no download)."""
    from skimage import data as skdata

    batch = [preprocess(getattr(skdata, n)(), height, width, prep) for n in names]
    return np.stack(batch), list(names)


def image_folder(folder: str | Path, height: int, width: int, prep: Preprocessing = Preprocessing()):
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputFileError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return np.stack([preprocess(read_image(p), height, width, prep) for p in files]), [p.name for p in files]


def random_inputs(n: int, height: int, width: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Seeded standard-normal batches: the distribution of normalized pixels, reproducible everywhere."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, height, width), dtype=np.float32), [f"random-{seed}-{i}" for i in range(n)]


def digits_split(seed: int = DIGITS_SEED, test_fraction: float = DIGITS_TEST_FRACTION):
    """scikit-learn's digits (1,797 8x8 images, shipped in the package) with the fixed, stratified 80/20
    split the shipped weights were trained on. Returns (x_train, y_train, x_test, y_test) as raw
    8x8 images in [0, 16] and integer labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.images, d.target, test_size=test_fraction, random_state=seed,
                                          stratify=d.target)
    return xtr, ytr, xte, yte


def digits_to_inputs(images: np.ndarray, height: int, width: int, prep: Preprocessing = Preprocessing()) -> np.ndarray:
    """8x8 digit images in [0, 16] -> normalized NCHW batches (grey replicated to RGB, resized)."""
    return np.stack([preprocess(im / 16.0, height, width, prep) for im in images]).astype(np.float32)


def heldout_digits(height: int, width: int, prep: Preprocessing = Preprocessing()):
    """The held-out 20% of digits, preprocessed: the default accuracy set with the shipped weights."""
    _, _, xte, yte = digits_split()
    return digits_to_inputs(xte, height, width, prep), [f"digit-{i}" for i in range(len(yte))], yte


def parse_size(text: str | int) -> tuple[int, int]:
    """'224' -> (224, 224); '256x192' -> height 256, width 192."""
    s = str(text).lower().strip()
    try:
        parts = [int(p) for p in s.split("x")] if "x" in s else [int(s)] * 2
    except ValueError:
        raise UsageError(f"bad image size {text!r}: use N or HxW, e.g. 224 or 256x192") from None
    if len(parts) != 2:
        raise UsageError(f"bad image size {text!r}: use N or HxW, e.g. 224 or 256x192")
    return parts[0], parts[1]


def labelled_folder(folder: str | Path, labels: list[str] | None, num_classes: int, height: int, width: int,
                    prep: Preprocessing = Preprocessing()):
    """An accuracy set: one sub-folder per class, named by the model's label (or class index when the
    model records no labels). An unknown folder name is a bad input, not a silently ignored class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"accuracy set not found: {folder}")
    names = [str(x) for x in labels] if labels else [str(i) for i in range(num_classes)]
    index = {n: i for i, n in enumerate(names)}
    xs, ids, ys = [], [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in index:
            raise InputFileError(f"{folder}: class folder {sub.name!r} is not one of the model's labels "
                                 f"({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
        for p in sorted(f for f in sub.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            xs.append(preprocess(read_image(p), height, width, prep))
            ids.append(f"{sub.name}/{p.name}")
            ys.append(index[sub.name])
    if not xs:
        raise InputFileError(f"{folder}: no images in class sub-folders")
    return np.stack(xs), ids, np.asarray(ys)


# ---------------------------------------------------------------- named input sets

@dataclass
class InputSet:
    name: str
    x: np.ndarray
    ids: list[str]
    labels: np.ndarray | None = None


def load_inputs(specs: Sequence[str], height: int, width: int, prep: Preprocessing,
                random_count: int = RANDOM_COUNT) -> list[InputSet]:
    """photos, seeded random, the held-out digits, or a folder of images, in the order given."""
    sets = []
    for spec in dict.fromkeys(specs):  # repeated specs count once
        if spec == "photos":
            sets.append(InputSet(spec, *photos(height, width, prep)))
        elif spec == "random":
            sets.append(InputSet(spec, *random_inputs(random_count, height, width, seed=0)))
        elif spec == "dataset":
            sets.append(InputSet(spec, *heldout_digits(height, width, prep)))
        elif Path(spec).is_dir():
            sets.append(InputSet(str(spec), *image_folder(spec, height, width, prep)))
        else:
            raise InputFileError(f"inputs {spec!r}: neither {', '.join(KEYWORD_INPUTS)} nor an image folder")
    if not sets:
        raise UsageError("no inputs to compare on")
    return sets


# ---------------------------------------------------------------- running a runner over inputs

def fixed_batch(manifest: dict) -> int | None:
    b = manifest.get("batch")
    return int(b) if isinstance(b, int) or (isinstance(b, str) and b.isdigit()) else None


def _chunks(x: np.ndarray, size: int, fixed: bool):
    """Slices of ``size``; a fixed-batch artifact takes exactly ``size``, so the last is padded by
    repeating its final input, and the caller keeps only the first ``n`` outputs."""
    for i in range(0, len(x), size):
        part = x[i:i + size]
        n = len(part)
        if fixed and n < size:
            part = np.concatenate([part, np.repeat(part[-1:], size - n, axis=0)])
        yield np.ascontiguousarray(part), n


def run_batched(runner, x: np.ndarray, batch: int | None, batch_size: int = 16) -> np.ndarray:
    """The first (a classifier's only) output over all of ``x``."""
    return run_outputs(runner, x, batch, batch_size)[0]


def run_outputs(runner, x: np.ndarray, batch: int | None, batch_size: int = 16) -> list[np.ndarray]:
    """Every output of the artifact (logits, or a backbone's feature maps) over all of ``x``."""
    from .backends.runner import as_outputs

    parts = [[o[:n] for o in as_outputs(runner.run(part))]
             for part, n in _chunks(x, batch or batch_size, batch is not None)]
    return [np.concatenate(p) for p in zip(*parts)]


def run_stages_batched(runner, x: np.ndarray, batch: int | None) -> dict[str, np.ndarray]:
    part, n = next(_chunks(x, batch or len(x), batch is not None))
    return {k: np.asarray(v, dtype=np.float32)[:n] for k, v in runner.run_stages(part).items()}
