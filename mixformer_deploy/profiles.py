"""Declarative export profiles (TOML under export/): named defaults for `export`, overridden by options."""

from __future__ import annotations

import tomllib
from pathlib import Path

import inspect

from .errors import InputFileError, UsageError
from .shipped import PROFILE_DIR

NOT_IN_PROFILES = {"weights", "output", "source", "target_options", "inputs", "accuracy_set"}


def generic_keys() -> set[str]:
    """What a profile may set besides a backend's options: export()'s own parameters (one list, there)."""
    from .export_api import export

    return set(inspect.signature(export).parameters) - NOT_IN_PROFILES


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
    from .backends import option_owners

    section = data.get("export", data)
    keys, target_keys = generic_keys(), set(option_owners())
    unknown = set(section) - keys - target_keys - {"description"}
    if unknown:
        known = ", ".join(sorted(keys | target_keys))
        raise UsageError(f"{path.name}: unknown profile key(s) {', '.join(sorted(unknown))} (known: {known})")
    out = {k: v for k, v in section.items() if k in keys}
    out["target_options"] = {k: v for k, v in section.items() if k in target_keys}
    return out
