"""TensorRT: run a serialized ``.engine`` on an NVIDIA GPU (the ``.trt.onnx`` runs on onnxruntime).

Device buffers are torch CUDA tensors (no pycuda/cuda-python dependency); inference is
``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on a torch CUDA stream, the API
TensorRT 10.x and 11.x document (the binding-index APIs were removed in 10.0). GPU compute time is
measured with CUDA events around ``execute_async_v3`` and reported beside wall time, as trtexec does
(``take_gpu_times()``, which bench reads into each row's ``gpu_ms``).

An engine is tied to a GPU and a TensorRT version: built for another compute capability (and not
hardware-compatible) -> MissingBackendError (exit 3: the hardware it needs is not here); built by
another TensorRT (and not version-compatible) -> ArtifactError (exit 4: the file does not fit), each
naming both sides.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ...optional import require, version_of
from ...errors import ArtifactError, MissingBackendError, UsageError
from ..runner import Runner, as_outputs, packed

DISTS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12")


class TensorRtRunner(Runner):
    key = "tensorrt"
    devices = ("cuda",)
    dists = DISTS
    extra = "tensorrt-runtime"
    option_help = {"device": "CUDA device index (default 0)"}

    def __init__(self, path: Path, device: str, options: dict[str, str]):
        from ...artifact import read_sidecar

        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"artifact not found: {self.path}")
        trt = require("tensorrt", self.extra)
        import torch
        if not torch.cuda.is_available():
            raise MissingBackendError("the tensorrt runtime needs a CUDA GPU; none is available here")
        if device not in ("auto", "cuda") and not device.startswith("cuda"):
            raise UsageError(f"tensorrt runs on cuda (or auto), not {device!r}")
        index = int(options.get("device") or (device.split(":")[1] if ":" in device else 0))
        self.device = f"cuda:{index}"
        manifest = read_sidecar(self.path) or {}
        self.precision = manifest.get("precision", "fp32")
        info = manifest.get("tensorrt") or {}
        check_engine_fits(info, trt.__version__, torch.cuda.get_device_properties(index))
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if (info.get("builder") or {}).get("version_compatible") and hasattr(self.runtime, "engine_host_code_allowed"):
            self.runtime.engine_host_code_allowed = True
        with torch.cuda.device(index):
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise ArtifactError(f"{self.path.name}: TensorRT {trt.__version__} cannot deserialize it "
                                    "(corrupt, or built for another TensorRT or GPU)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=index)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        from ..torch.runner import CudaEventTimes
        self._gpu = CudaEventTimes()
        # the largest batch the engine takes: its profile's max (dynamic) or its fixed batch dimension
        first = self.inputs[0]
        fixed = self.engine.get_tensor_shape(first)[0]
        self.max_batch = int(self.engine.get_tensor_profile_shape(first, 0)[2][0]) if fixed == -1 else int(fixed)

    @classmethod
    def load(cls, artifact, device="cpu", threads=None, options=None) -> "TensorRtRunner":
        if device == "cpu":
            device = "auto"  # an engine has no CPU path: the GPU is the only device it runs on
        return cls(Path(artifact), device, dict(options or {}))

    @classmethod
    def status(cls, probe: bool = False) -> dict:
        base = super().status(probe)
        if not base["installed"]:
            base["note"] = ('TensorRT is not installed: pip install "mixformer-deploy[tensorrt-runtime]" on an '
                            "NVIDIA GPU machine (libraries from NVIDIA's index where PyPI has none)")
            return base
        try:
            import torch
            gpu = torch.cuda.is_available()
        except Exception:
            gpu = False
        base.update(can_run=gpu, devices=["cuda"] if gpu else [],
                    note="" if gpu else "installed, but no CUDA GPU here")
        return base

    def _dtype(self, name: str):
        mapping = {self.trt.DataType.FLOAT: self.torch.float32, self.trt.DataType.HALF: self.torch.float16,
                   self.trt.DataType.INT32: self.torch.int32, self.trt.DataType.INT8: self.torch.int8,
                   self.trt.DataType.BOOL: self.torch.bool}
        if hasattr(self.trt.DataType, "BF16"):
            mapping[self.trt.DataType.BF16] = self.torch.bfloat16
        if hasattr(self.trt.DataType, "INT64"):
            mapping[self.trt.DataType.INT64] = self.torch.int64
        return mapping[self.engine.get_tensor_dtype(name)]

    def run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) > self.max_batch > 0:   # parity and predict feed up to 16: split at the profile's max
            parts = [as_outputs(self.run(batch[i:i + self.max_batch])) for i in range(0, len(batch), self.max_batch)]
            return packed(np.concatenate(p) for p in zip(*parts))
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        name = self.inputs[0]
        if not self.context.set_input_shape(name, tuple(x.shape)):
            raise ArtifactError(f"{self.path.name}: input shape {tuple(x.shape)} is outside the engine's profile")
        x = x.to(self._dtype(name))
        self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            outs[out] = torch.empty(shape, dtype=self._dtype(out), device=self.device)
            self.context.set_tensor_address(out, outs[out].data_ptr())
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # x's copy is done
            with self._gpu.record(self.stream):
                ok = self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        self._gpu.collect()
        if not ok:
            raise ArtifactError(f"{self.path.name}: TensorRT inference failed on input {tuple(x.shape)}")
        return packed(outs[o].float().cpu().numpy() for o in self.outputs)

    def sync(self) -> None:
        self.stream.synchronize()

    def take_gpu_times(self) -> list[float]:
        """Every GPU compute time (ms) since the last call, oldest first; empties the list. Without it
        bench saw no TensorRT GPU time: describe() is read once, at load, before any run."""
        return self._gpu.take()

    def describe(self) -> dict:
        props = self.torch.cuda.get_device_properties(int(self.device.split(":")[1]))
        ms = self._gpu.ms
        gpu = {"gpu_compute_ms_median": round(statistics.median(ms), 4) if ms else None,
               "gpu_compute_ms_mean": round(statistics.fmean(ms), 4) if ms else None,
               "gpu_compute_runs": len(ms)}
        return {**super().describe(), "tensorrt": self.trt.__version__, "gpu": props.name,
                "compute_capability": f"{props.major}.{props.minor}", **gpu}

    def close(self) -> None:
        self.context = self.engine = None


def check_engine_fits(info: dict, trt_version: str, props) -> None:
    """Refuse an engine built for another GPU (exit 3) or by another TensorRT (exit 4), saying which.

    ``info`` is the engine manifest's ``tensorrt`` record; ``props`` has ``name``, ``major``, ``minor``
    (torch.cuda.get_device_properties). An engine without the record is tried as is."""
    if not info:
        return
    builder = info.get("builder") or {}
    built = str(info.get("version") or "")
    if built and built != trt_version and not builder.get("version_compatible"):
        raise ArtifactError(f"engine built by TensorRT {built}; this is TensorRT {trt_version}: rebuild it "
                            "here (or build it with --version-compatible)")
    cc = str(info.get("compute_capability") or "")
    here = f"{props.major}.{props.minor}"
    hw = builder.get("hardware_compatibility") or "none"
    if cc and cc != here:
        fits = (hw == "ampere_plus" and props.major >= 8) or \
               (hw == "same_compute_capability" and cc == here)
        if not fits:
            raise MissingBackendError(f"engine built for {info.get('gpu') or 'another GPU'} (compute capability "
                                      f"{cc}); this GPU is {props.name} ({here}): the GPU it needs is not here")


def installed_version() -> str | None:
    for dist in DISTS:
        v = version_of(dist)
        if v:
            return v
    return None
