"""The Target interface: turn the deploy form into an artifact (a file or a directory), and read back what
it embeds.

A target declares everything that is its own: suffix, extra, the runtime that runs it, precisions,
tolerances, and its options (TargetOption). Generic code (export_api, the CLI) knows no target's words.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError


@dataclass(frozen=True)
class Tolerance:
    """Parity tolerances (DESIGN: per input, max|a-r| <= atol + rtol*max|r| and cosine >= min_cosine).
    ``gate_top1`` False for int8, whose top-1 is judged by the accuracy gate instead."""

    atol: float = 1e-4
    rtol: float = 1e-4
    min_cosine: float = 0.99999
    gate_top1: bool = True


# int8 through runtimes whose quantizers calibrate activations per tensor (onnxruntime QDQ, OpenVINO/NNCF,
# ExecuTorch and LiteRT PT2E): on the seeded random inputs, far outside the calibration images, their logits drift to a cosine near
# 0.5 while accuracy holds (the shipped weights lose at most 1 of 360 held-out digits). The accuracy gate judges
# these artifacts; this bound only catches a broken one (a wrong or garbled artifact sits near cosine 0).
INT8_PER_TENSOR = Tolerance(1.0, 0.75, 0.4, gate_top1=False)


@dataclass(frozen=True)
class TargetOption:
    """An export option that belongs to one or more targets; the CLI shows it as --name-with-dashes."""

    name: str                      # python identifier
    help: str
    type: type = str               # str, int, float or bool
    default: Any = None
    choices: tuple = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """A value from the CLI or a profile -> this option's type, checked against its choices."""
        if value is None:
            return self.default
        try:
            if self.type is bool and isinstance(value, str):
                v = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
            else:
                v = self.type(value)
        except (KeyError, ValueError, TypeError):
            raise UsageError(f"bad {self.flag} {value!r}: expected {self.type.__name__}") from None
        if self.choices and v not in self.choices:
            raise UsageError(f"bad {self.flag} {value!r}: choose one of {', '.join(map(str, self.choices))}")
        return v


@dataclass
class Calibration:
    """Images that calibrate an int8 export: normalized NCHW float32 and where they came from."""

    x: np.ndarray
    record: dict                   # source, count, sha256 of the file list (goes into the manifest)


@dataclass
class ExportOptions:
    height: int
    width: int
    batch: int | None = 1          # None = dynamic batch axis
    precision: str = "fp32"
    keeps: list[str] = field(default_factory=list)   # deploy-form module names kept in float32
    calibration: Calibration | None = None            # int8 only
    target_options: dict = field(default_factory=dict)  # this target's own options, parsed, defaults filled
    debug_outputs: bool = True     # record per-stage tensor names for parity localization

    def opt(self, name: str) -> Any:
        return self.target_options.get(name)


class Target(ABC):
    key: str = ""                  # module name, pip extra, CLI choice, pytest marker
    suffix: str = ""               # of the file, or of the directory when is_dir
    is_dir: bool = False           # the artifact is a directory (built beside, renamed whole)
    extra: str = ""
    runtime: str = ""              # the runtime key that runs this target's artifacts
    precisions: tuple[str, ...] = ("fp32",)
    calibrated: tuple[str, ...] = ()   # precisions that need calibration images (int8)
    tolerances: dict[str, Tolerance] = {}
    options: tuple[TargetOption, ...] = ()
    versions: tuple[str, ...] = ()     # distributions whose versions go into the manifest
    description: str = ""

    def check(self, options: ExportOptions) -> None:
        """Reject options this target cannot honour, before any weights are read (UsageError), or a
        backend that is missing (MissingBackendError)."""
        if options.precision not in self.precisions:
            raise UsageError(f"{self.key} exports {' or '.join(self.precisions)}, not {options.precision!r}")

    def unjudged_form(self, options: ExportOptions) -> str | None:
        """Why parity cannot judge the artifact these options make (an app-facing form whose inputs or
        outputs are not the contract's tensors), or None. Export then skips the gate and records why."""
        return None

    @abstractmethod
    def export(self, deploy_model: torch.nn.Module, options: ExportOptions, out: Path, manifest: dict) -> dict:
        """Write the artifact to ``out`` (a temporary path beside the final one; the caller renames it)
        with ``manifest`` embedded where the format allows. Returns facts to add to the manifest."""

    @abstractmethod
    def read_embedded(self, path: Path) -> dict | None:
        """The manifest embedded in an artifact, or None; raise ArtifactError if it is corrupt."""

    def inspect(self, path: Path) -> dict:
        """What is inside: inputs, outputs, op histogram, max rank, ops per precision, kept-fp32 ops.
        Targets override; the default says what every artifact has."""
        return {"inputs": None, "outputs": None, "ops": None, "max_rank": None, "precisions": None,
                "kept_fp32": None, "note": f"{self.key} artifacts have no inspect reader yet"}

    def files(self, path: Path) -> list[Path]:
        """Every file that belongs to the artifact (for sizes): a directory's whole tree by default."""
        path = Path(path)
        if path.is_dir():
            return sorted(f for f in path.rglob("*") if f.is_file())
        return [path] if path.is_file() else []

    def status(self) -> dict:
        """Can this target export here? By default: its first package (``versions[0]``) is installed.
        Targets with more needs (a compiler, a GPU for a second stage) override."""
        from ..backends import version_of

        dist = self.versions[0] if self.versions else self.key
        version = version_of(dist)
        note = "" if version else f'not installed: pip install "mixformer-deploy[{self.extra}]"'
        return {"installed": bool(version), "package": dist, "version": version, "can_export": bool(version),
                "note": note}

    def runtime_for(self, path: Path) -> str:
        """The runtime that runs one of this target's artifacts (a target with two artifact kinds overrides)."""
        return self.runtime

    def tolerance(self, precision: str) -> Tolerance:
        return self.tolerances.get(precision, Tolerance())
