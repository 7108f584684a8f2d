"""onnxruntime: the CPU execution provider, or CUDA's when installed and asked for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..backends import require
from ..errors import ArtifactError, MissingBackendError, UsageError
from .base import Runner


class OnnxRuntimeRunner(Runner):
    key = "onnxruntime"

    def __init__(self, path: Path, device: str, threads: int | None):
        self.ort = require("onnxruntime", "onnx")
        self.path, self.device, self.threads = Path(path), device, threads
        providers = self.ort.get_available_providers()
        if device == "auto":  # the CUDA execution provider when this onnxruntime has one
            device = self.device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in providers:
                raise MissingBackendError("onnxruntime has no CUDA execution provider here "
                                          "(install onnxruntime-gpu on a CUDA machine)")
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu":
            self.providers = ["CPUExecutionProvider"]
        else:
            raise UsageError(f"onnxruntime runs on auto, cpu or cuda, not {device!r}")
        self.session = self._session(str(self.path) if self.path.is_file() else None)
        self.input_name = self.session.get_inputs()[0].name
        self.precision = self._manifest().get("precision", "fp32")
        self._debug_session = None

    @classmethod
    def load(cls, artifact, device="cpu", threads=None) -> "OnnxRuntimeRunner":
        return cls(Path(artifact), device, threads)

    def _session(self, model: str | bytes | None):
        if model is None:
            raise ArtifactError(f"artifact not found: {self.path}")
        opts = self.ort.SessionOptions()
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            return self.ort.InferenceSession(model, sess_options=opts, providers=self.providers)
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: onnxruntime cannot load it "
                                f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e

    def _manifest(self) -> dict:
        meta = self.session.get_modelmeta().custom_metadata_map
        from ..manifest import EMBED_KEY
        try:
            return json.loads(meta.get(EMBED_KEY, "{}"))
        except ValueError:
            return {}

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            return self.session.run(None, {self.input_name: x})[0]
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: inference failed on input {x.shape} "
                                f"({' '.join(str(e).split())[:200]})") from e

    def run_stages(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Re-open the artifact with its recorded stage tensors exposed as extra outputs."""
        from ..deploy import to_reference_layout
        from ..targets.onnx import load_onnx

        stages = self._manifest().get("stage_outputs") or {}
        tensors = stages.get("tensors") or {}
        if not tensors:
            return super().run_stages(batch)
        if self._debug_session is None:
            onnx = require("onnx", "onnx")
            model = load_onnx(self.path)
            for name in tensors.values():
                model.graph.output.append(onnx.ValueInfoProto(name=name))
            self._debug_session = self._session(model.SerializeToString())
        names = ["logits", *tensors]
        outs = self._debug_session.run([self.session.get_outputs()[0].name, *tensors.values()],
                                       {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        result = {k: np.asarray(v, dtype=np.float32) for k, v in zip(names, outs)}
        return to_reference_layout(result, stages) if stages.get("layout") == "tokens" else result

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.session.get_providers()}

    def close(self) -> None:
        self.session = self._debug_session = None
