"""Declarative export profiles (TOML under export/): named defaults for `export`, overridden by options."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import InputFileError
from .shipped import PROFILE_DIR
KEYS = {"target", "precision", "batch", "img_size", "check", "keep_fp32", "default_keeps", "calibration",
        "calibration_size", "head", "out_indices", "out_norm"}


def load_profile(name_or_path: str) -> dict:
    """A profile by file path or by name (``onnx-fp32`` -> export/onnx-fp32.toml)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.toml")))
        raise InputFileError(f"export profile not found: {name_or_path} (known: {known})")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputFileError(f"{path.name}: not a valid TOML profile ({e})") from e
    from .targets import option_owners

    section = data.get("export", data)
    target_keys = set(option_owners())
    unknown = set(section) - KEYS - target_keys - {"description"}
    if unknown:
        known = ", ".join(sorted(KEYS | target_keys))
        raise InputFileError(f"{path.name}: unknown profile key(s) {', '.join(sorted(unknown))} (known: {known})")
    out = {k: v for k, v in section.items() if k in KEYS}
    out["target_options"] = {k: v for k, v in section.items() if k in target_keys}
    return out
