"""LiteRT: ai-edge-litert's interpreter (the TFLite runtime of Android and iOS) with its default XNNPACK
delegate, on this machine's CPU, with the thread count set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...optional import require
from ...errors import ArtifactError, UsageError, one_line
from .spec import embedded_manifest
from ..runner import Runner


class LiteRtRunner(Runner):
    key = "litert"
    dists = ("ai-edge-litert",)
    extra = "litert"
    option_help = {"xnnpack": "true (default): the XNNPACK delegate; false: LiteRT's builtin kernels only"}

    def __init__(self, path: Path, device: str, threads: int | None, xnnpack: bool):
        interp = require("ai_edge_litert.interpreter", self.extra)
        self.path, self.device, self.threads = Path(path), "cpu", threads
        manifest = embedded_manifest(self.path) or {}  # ArtifactError for a file that is not a .tflite
        self.precision = manifest.get("precision", "fp32")
        resolver = interp.OpResolverType.AUTO if xnnpack else interp.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.xnnpack = xnnpack
        try:
            self.interpreter = interp.Interpreter(model_path=str(self.path), num_threads=threads or None,
                                                  experimental_op_resolver_type=resolver)
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: LiteRT cannot load it ({one_line(e, 200)})") from e
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = _in_manifest_order(self.interpreter.get_output_details(), manifest)
        self.input_shape = tuple(int(d) for d in self.input["shape"])

    @classmethod
    def load(cls, artifact, device="cpu", threads=None, options=None) -> "LiteRtRunner":
        options = cls.check_options(options)
        flag = str(options.get("xnnpack", "true")).lower()
        if flag not in ("true", "false", "1", "0"):
            raise UsageError(f"bad --runtime-option xnnpack={flag}: true or false")
        return cls(Path(artifact), device, threads, flag in ("true", "1"))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_fixed(batch, self.input_shape, self._invoke)

    def _invoke(self, part: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], part)
        self.interpreter.invoke()
        return [_dequantized(self.interpreter.get_tensor(o["index"]), o) for o in self.outputs]

    def describe(self) -> dict:
        return {**super().describe(), "delegate": "XNNPACK" if self.xnnpack else None}

    def close(self) -> None:
        self.interpreter = None


def _in_manifest_order(details: list[dict], manifest: dict) -> list[dict]:
    """A .tflite's outputs in the manifest's order: LiteRT names them by signature position, not by
    the exporter's names, so a backbone's feature maps are matched by their (distinct) shapes."""
    wanted = [o.get("shape") for o in manifest.get("outputs") or []]
    if len(details) <= 1 or len(wanted) != len(details):
        return list(details)
    by_shape = {tuple(int(v) for v in d["shape"][1:]): d for d in details}
    picked = [by_shape.get(tuple(int(v) for v in shape[1:])) for shape in wanted]
    return picked if all(p is not None for p in picked) and len(by_shape) == len(details) else list(details)


def _dequantized(t: np.ndarray, detail: dict) -> np.ndarray:
    """An int8 output (the converter leaves a quantized backbone's inner feature maps int8: the form an int8
    detection head takes) -> float32 through its scale and zero point; float outputs unchanged."""
    scale, zero = detail.get("quantization") or (0.0, 0)
    if t.dtype.kind in "iu" and scale:
        return (t.astype(np.float32) - zero) * np.float32(scale)
    return t
