"""The Target interface: turn the deploy form into an artifact file, and read back what it embeds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError


@dataclass(frozen=True)
class Tolerance:
    """Parity tolerances (DESIGN: max|a-r| <= atol + rtol*max|r| and cosine >= min_cosine)."""

    atol: float = 1e-4
    rtol: float = 1e-4
    min_cosine: float = 0.99999


@dataclass
class ExportOptions:
    height: int
    width: int
    batch: int | None = 1          # None = dynamic batch axis
    precision: str = "fp32"
    opset: int | None = None
    simplify: bool = True
    debug_outputs: bool = True     # record per-stage tensor names for parity localization


class Target(ABC):
    key: str = ""                  # module name, pip extra, CLI choice, pytest marker
    suffix: str = ""
    extra: str = ""
    runtime: str = ""              # the runtime key that runs this target's artifacts
    precisions: tuple[str, ...] = ("fp32",)
    tolerances: dict[str, Tolerance] = {}

    def check(self, precision: str, opset: int | None) -> None:
        """Reject options this target cannot honour, before any weights are read (UsageError)."""
        if precision not in self.precisions:
            raise UsageError(f"{self.key} exports {' or '.join(self.precisions)}, not {precision!r}")

    @abstractmethod
    def export(self, deploy_model: torch.nn.Module, options: ExportOptions, out: Path, manifest: dict) -> dict:
        """Write the artifact to ``out`` (a temporary path; the caller renames it) with ``manifest``
        embedded where the format allows. Returns facts to add to the manifest (node counts, ...)."""

    @abstractmethod
    def read_embedded(self, path: Path) -> dict | None:
        """The manifest embedded in an artifact, or None; raise ArtifactError if the file is corrupt."""

    def tolerance(self, precision: str) -> Tolerance:
        return self.tolerances.get(precision, Tolerance())
