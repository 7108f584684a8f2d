"""Where the shipped, trained reference weights live, and what they record."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_shipped"   # in a wheel (copied in by setup.py)
_CLONE = Path(__file__).resolve().parent.parent             # in a clone / editable install
ROOT = _PACKAGED if (_PACKAGED / "models").is_dir() else _CLONE
DEFAULT_WEIGHTS = ROOT / "models" / "mixformer-b0-digits.safetensors"
PROFILE_DIR = ROOT / "export"
EXAMPLES_DIR = ROOT / "models" / "examples"
DEFAULT_SIZE = 224


def default_weights() -> Path:
    return DEFAULT_WEIGHTS


def is_shipped(sha256: str | None) -> bool:
    """True when a checkpoint's hash is the shipped weights' (so the held-out digits apply)."""
    if not sha256 or not DEFAULT_WEIGHTS.is_file():
        return False
    st = DEFAULT_WEIGHTS.stat()
    return sha256 == _shipped_sha256(st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=1)
def _shipped_sha256(size: int, mtime_ns: int) -> str:
    """Hashed once per process (export, parity and bench all ask), again only if the file changes."""
    from .checkpoints import sha256_file
    return sha256_file(DEFAULT_WEIGHTS)
