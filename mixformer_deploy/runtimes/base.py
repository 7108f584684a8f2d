"""The Runner interface: load an artifact, run numpy batches, say where and in what precision it runs.

Parity and benchmarks are written once against this; each runtime is one module in this package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class Runner(ABC):
    key: str = ""          # the runtime's key: its module name and CLI choice
    device: str = "cpu"    # where it runs, e.g. "cpu", "cuda:0"
    precision: str = "fp32"
    threads: int | None = None

    @classmethod
    @abstractmethod
    def load(cls, artifact: str | Path, device: str = "cpu", threads: int | None = None) -> "Runner":
        """Open an artifact for inference (raise ArtifactError for a bad file, MissingBackendError when
        the runtime or device is not available)."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 normalized images -> logits, as numpy float32."""

    def run_stages(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Per-stage debug outputs (stem, stage0..N, features, logits) in the reference layout, for
        localizing a parity failure. Runners that cannot expose them return only the logits."""
        return {"logits": self.run(batch)}

    def sync(self) -> None:
        """Wait for queued device work (GPU runners override); timing calls it after each run."""

    def describe(self) -> dict:
        return {"runtime": self.key, "device": self.device, "precision": self.precision, "threads": self.threads}

    def close(self) -> None:
        """Release sessions and device memory."""
