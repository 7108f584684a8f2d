"""The exporter interface: turn the deploy form into an artifact (a file or a directory).

An exporter is imported only when exporting (converters are heavy). It receives an ExportContext: the
final name the artifact will have, the temporary path to write (the caller publishes it whole), the typed
options and the manifest to embed. Its light facts (suffix, precisions, tolerances, Options) are its
spec's (``backends/<key>/spec.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MixformerDeployError
from .spec import BackendSpec, Options


@dataclass
class Calibration:
    """Images that calibrate an int8 export: normalized NCHW float32 and where they came from."""

    x: np.ndarray
    record: dict                   # source, count, sha256 of the file list (goes into the manifest)

    def batches(self, batch: int) -> list[np.ndarray]:
        """The calibration set in batches of ``batch``, every batch full: a set shorter than a batch is
        repeated (cycled) up to one batch, and the last partial batch of a longer set is filled from the
        set's start. So every backend sees the whole set, in the shapes its static graph takes."""
        n = len(self.x)
        total = max(batch, -(-n // batch) * batch)
        idx = np.arange(total) % n
        return [self.x[idx[i:i + batch]] for i in range(0, total, batch)]


@dataclass
class ExportOptions:
    height: int
    width: int
    batch: int | None = 1          # None = dynamic batch axis
    precision: str = "fp32"
    keeps: list[str] = field(default_factory=list)   # deploy-form module names kept in float32
    calibration: Calibration | None = None            # int8 only
    target: Options = field(default_factory=Options)  # the backend's own options, typed, defaults filled
    debug_outputs: bool = True     # record per-stage tensor names for parity localization


@dataclass
class ExportContext:
    """Where and how to write one artifact."""

    final: Path                    # the name the artifact will have once published
    tmp: Path                      # where to write it now (beside ``final``; renamed whole when done)
    options: ExportOptions
    manifest: dict                 # embed it where the format allows; the exporter may add facts


@dataclass
class FollowUp:
    """A backend's step after the artifact is published (TensorRT: the engine built from the ONNX): print
    ``lines`` (stdout), then the path of the last artifact (``path``, else the published one), then raise
    ``error`` if set."""

    lines: list[str] = field(default_factory=list)
    path: Path | None = None
    error: MixformerDeployError | None = None


class Exporter(ABC):
    def __init__(self, spec: BackendSpec):
        self.spec = spec

    @abstractmethod
    def export(self, deploy_model: torch.nn.Module, ctx: ExportContext) -> dict:
        """Write the artifact to ``ctx.tmp`` with ``ctx.manifest`` embedded where the format allows.
        Returns facts about what was written; the caller adds those the manifest lacks to the sidecar."""

    def follow_up(self, final: Path, options: ExportOptions) -> FollowUp | None:
        """A second step once the artifact is published (None: there is none)."""
        return None
