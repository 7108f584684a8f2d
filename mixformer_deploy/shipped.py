"""Where the shipped, trained reference weights live, and what they record."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = ROOT / "models" / "mixformer-b0-digits.safetensors"
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
