"""onnxruntime: the CPU execution provider, or CUDA's when installed and asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...optional import require
from ...errors import ArtifactError, MissingBackendError, UsageError, one_line
from .spec import embedded_manifest, load_onnx
from ..runner import Runner, packed


class OnnxRuntimeRunner(Runner):
    key = "onnxruntime"
    devices = ("cpu", "cuda")
    dists = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")
    extra = "onnx"

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
            # fp32 means IEEE float32: the CUDA provider's TF32 matmuls would err by ~1e-4 relative
            self.providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
        elif device == "cpu":
            self.providers = ["CPUExecutionProvider"]
        else:
            raise UsageError(f"onnxruntime runs on auto, cpu or cuda, not {device!r}")
        if not self.path.is_file():
            raise ArtifactError(f"artifact not found: {self.path}")
        load_onnx(self.path, load_weights=False)  # one-line errors; refuses external data outside its folder
        self.session = self._session(str(self.path))
        self.input_name = self.session.get_inputs()[0].name
        self.precision = self._manifest().get("precision", "fp32")
        self._debug_session = None

    @classmethod
    def status(cls, probe: bool = False) -> dict:
        import sys

        base = super().status(probe)
        ort = sys.modules.get("onnxruntime")
        if base["installed"] and ort is None and probe:
            try:
                import onnxruntime as ort
            except Exception as e:
                return {**base, "can_run": False, "note": f"import failed: {type(e).__name__}"}
        if ort is None:
            return {**base, "devices": ["CPUExecutionProvider"] if base["installed"] else [],
                    "note": base["note"] or "providers not probed"}
        return {**base, "devices": list(ort.get_available_providers())}

    @classmethod
    def load(cls, artifact, device="cpu", threads=None, options=None) -> "OnnxRuntimeRunner":
        return cls(Path(artifact), device, threads)

    def _session(self, model: str | bytes):
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
            raise ArtifactError(f"{self.path.name}: onnxruntime cannot load it ({one_line(e, 200)})") from e

    def _manifest(self) -> dict:
        try:
            return embedded_manifest(self.path) or {}
        except ArtifactError:
            return {}

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            return packed(self.session.run(None, {self.input_name: x}))
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: inference failed on input {x.shape} ({one_line(e, 200)})") from e

    def run_stages(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Re-open the artifact with its recorded stage tensors exposed as extra outputs."""
        from ...deploy import to_reference_layout

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
        outputs = [o.name for o in self.session.get_outputs()]
        names = [*outputs, *tensors]
        outs = self._debug_session.run([*outputs, *tensors.values()],
                                       {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        result = {k: np.asarray(v, dtype=np.float32) for k, v in zip(names, outs)}
        return to_reference_layout(result, stages) if stages.get("layout") == "tokens" else result

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.session.get_providers()}

    def close(self) -> None:
        self.session = self._debug_session = None
