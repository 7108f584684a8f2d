"""Inputs: bundled real photos, the digits dataset (the shipped weights' data), image folders, seeded
random batches, and the one preprocessing every runner shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputFileError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field", "camera")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2


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
