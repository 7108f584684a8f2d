"""Core ML: predicts with the Core ML framework, which exists on macOS only.

On Linux coremltools converts and reads ML programs but cannot run them (its native prediction module,
``libcoremlpython``, ships only in macOS wheels), so ``load`` raises MissingBackendError("Core ML
prediction needs macOS") after checking the package itself (a missing weights file or a corrupt spec is
an ArtifactError on any OS). Nothing here ever fakes a prediction.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np

from ...optional import version_of
from ...errors import ArtifactError, MissingBackendError, UsageError, one_line
from .spec import INPUT, LOGITS, check_weights, coremltools, read_spec, spec_manifest
from ..runner import Runner, packed

FEATURES = "features_"   # a backbone's outputs: features_0 ... features_3

NEEDS_MACOS = "Core ML prediction needs macOS"
COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}


def can_predict() -> bool:
    return sys.platform == "darwin"


class CoreMlRunner(Runner):
    key = "coreml"
    devices = ("cpu", "coreml")   # coreml:<compute units>, as benchmarks label it
    dists = ("coremltools",)
    extra = "coreml"
    option_choices = {"compute_units": tuple(COMPUTE_UNITS)}
    option_help = {"compute_units": "all (default with --device auto), cpu_only (default with --device cpu), "
                                    "cpu_and_gpu or cpu_and_ne (CPU + Neural Engine)"}

    def __init__(self, path: Path, device: str, threads: int | None, compute_units: str):
        self.path, self.threads = Path(path), threads
        spec = read_spec(self.path)        # ArtifactError on any OS
        check_weights(self.path, spec)
        ct = coremltools()
        if not can_predict():
            raise MissingBackendError(NEEDS_MACOS)
        self.compute_units = compute_units
        self.device = f"coreml:{compute_units}"
        inputs = [d.name for d in spec.description.input]
        outputs = [d.name for d in spec.description.output]
        self.plain = inputs[:1] == [INPUT] and (outputs[:1] == [LOGITS] or outputs[0].startswith(FEATURES))
        self.input_name, self.output_name, self.output_names = inputs[0], outputs[0], outputs
        self.fixed_batch = None
        first = spec.description.input[0].type
        if first.WhichOneof("Type") == "multiArrayType" and not first.multiArrayType.HasField("shapeRange"):
            self.fixed_batch = int(first.multiArrayType.shape[0])
        try:
            self.precision = (spec_manifest(spec, self.path.name) or {}).get("precision", "fp32")
        except ArtifactError:
            self.precision = "fp32"
        try:
            self.model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit,
                                                                                  COMPUTE_UNITS[compute_units]))
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: Core ML cannot load it ({one_line(e, 200)})") from e

    @classmethod
    def load(cls, artifact, device="auto", threads=None, options=None) -> "CoreMlRunner":
        options = cls.check_options(options)
        device = device or "auto"
        if device.startswith("coreml:"):  # how benchmarks label a compute-unit choice: coreml:cpu_and_ne
            device, options = "auto", {"compute_units": device.split(":", 1)[1], **options}
        if device not in ("auto", "cpu"):
            raise UsageError(f"Core ML picks its own processors: use --device auto or cpu and "
                             f"--runtime-option compute_units=..., not --device {device}")
        units = options.get("compute_units") or ("cpu_only" if device == "cpu" else "all")
        if units not in COMPUTE_UNITS:
            raise UsageError(f"bad compute_units {units!r}: choose one of {', '.join(COMPUTE_UNITS)}")
        path = Path(artifact)
        if not path.exists():
            raise ArtifactError(f"artifact not found: {path}")
        return cls(path, device, threads, units)

    @classmethod
    def status(cls, probe: bool = False) -> dict:
        v = version_of("coremltools")
        if v is None:
            return {"installed": False, "package": "coremltools", "version": None, "can_run": False, "devices": [],
                    "note": 'not installed: pip install "mixformer-deploy[coreml]"'}
        if not can_predict():
            return {"installed": True, "package": "coremltools", "version": v, "can_run": False, "devices": [],
                    "note": f"conversion only on {platform.system()}: {NEEDS_MACOS}", "reason": NEEDS_MACOS}
        return {"installed": True, "package": "coremltools", "version": v, "can_run": True,
                "devices": [f"coreml:{u}" for u in COMPUTE_UNITS], "note": ""}

    def predict(self, features: dict) -> dict:
        """One Core ML prediction with the model's own feature names (images as PIL images)."""
        try:
            return self.model.predict(features)
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: Core ML prediction failed ({one_line(e, 200)})") from e

    def run(self, batch: np.ndarray) -> np.ndarray:
        if not self.plain:
            raise UsageError(f"{self.path.name} is an app-facing form (input {self.input_name!r}, output "
                             f"{self.output_name!r}): parity and benchmarks run on the plain form")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self.fixed_batch and x.shape[0] != self.fixed_batch:
            raise UsageError(f"{self.path.name} takes batches of {self.fixed_batch}, not {x.shape[0]}")
        result = self.predict({self.input_name: x})
        return packed(np.asarray(result[n], dtype=np.float32) for n in self.output_names)

    def describe(self) -> dict:
        return {**super().describe(), "compute_units": self.compute_units, "macos": platform.mac_ver()[0]}

    def close(self) -> None:
        self.model = None
