"""Writes models/examples/: a few held-out digits as 32x32 grey PNGs, resized from the 8x8 originals by the
same anti-aliased resize the model was trained on, so `predict` on them sees what training saw."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

INDICES = (0, 1, 2, 6, 7)   # held-out positions; one of each of five different digits


def main() -> None:
    from skimage.io import imsave
    from skimage.transform import resize

    from mixformer_deploy.data import digits_split

    _, _, images, labels = digits_split()
    out = HERE / "examples"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    for i in INDICES:
        grey = resize(images[i] / 16.0, (32, 32), anti_aliasing=True, preserve_range=True)
        pixels = np.clip(np.round(grey * 255), 0, 255).astype(np.uint8)
        imsave(out / f"heldout-{i:03d}-digit-{labels[i]}.png", pixels, check_contrast=False)
        print(out / f"heldout-{i:03d}-digit-{labels[i]}.png")


if __name__ == "__main__":
    main()
