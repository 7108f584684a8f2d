"""PyTorch eager: the reference every artifact is compared with, and a runtime of its own (CPU or CUDA,
fp32 or fp16, reference model or deploy form). On CUDA it replays static shapes from CUDA graphs and
times each call with CUDA events beside the caller's wall time."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ...errors import MissingBackendError, UsageError
from ..runner import Runner


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MissingBackendError(f"device {device!r} requested but torch sees no CUDA GPU here")
        return torch.device(device)
    if device != "cpu":
        raise UsageError(f"the torch runtime runs on auto, cpu or cuda, not {device!r}")
    return torch.device("cpu")


class CudaEventTimes:
    """GPU compute time of each call from a pair of CUDA events around its launches (or graph replay).

    The pair is read at the next ``collect`` (the runner's sync, or the next call), not at once: reading
    it inside the call would make the call wait for the GPU. Shared by the torch, AOTInductor and TensorRT
    runners, whose ``take_gpu_times()`` bench reads into each row's ``gpu_ms``."""

    def __init__(self):
        self.ms: list[float] = []
        self._pending = None

    @contextmanager
    def record(self, stream=None):
        self.collect()   # a call made without a sync in between still counts
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._pending = (start, end)

    def collect(self) -> None:
        if self._pending is not None:
            start, end = self._pending
            self._pending = None
            end.synchronize()   # returns at once after the caller's sync
            self.ms.append(start.elapsed_time(end))

    def last(self) -> float | None:
        return self.ms[-1] if self.ms else None

    def take(self) -> list[float]:
        """Every GPU time (ms) since the last take, oldest first; empties the list."""
        out, self.ms = self.ms, []
        return out


class CudaTimed:
    """``sync``, ``gpu_time_ms`` and ``take_gpu_times`` of a runner on a torch device (``_dev``) that
    records its calls in a CudaEventTimes (``_gpu``): the torch and AOTInductor runners."""

    def sync(self) -> None:
        if self._dev.type == "cuda":
            torch.cuda.synchronize(self._dev)
            self._gpu.collect()

    def gpu_time_ms(self) -> float | None:
        """GPU time of the last run (CUDA events around the launch or graph replay), None on the CPU."""
        self.sync()
        return self._gpu.last()

    def take_gpu_times(self) -> list[float]:
        """Every GPU time (ms) measured since the last call, oldest first; empties the list (bench's gpu_ms)."""
        self.sync()
        return self._gpu.take()


class TorchRunner(CudaTimed, Runner):
    key = "torch"
    devices = ("cpu", "cuda")
    dists = ("torch",)
    option_help = {"precision": "fp32 or fp16 (fp16 needs CUDA)", "form": "reference or deploy",
                   "cuda_graphs": "on|off: replay from CUDA graphs, one per input shape (CUDA only; default on; "
                                  "off runs eager, the naive path)"}
    option_choices = {"precision": ("fp32", "fp16"), "form": ("reference", "deploy"), "cuda_graphs": ("on", "off")}

    def __init__(self, model: torch.nn.Module, device: str = "cpu", precision: str = "fp32",
                 deploy: bool = False, threads: int | None = None, cuda_graphs: bool = True):
        if precision not in ("fp32", "fp16"):
            raise UsageError(f"the torch runtime runs fp32 or fp16, not {precision!r}")
        if precision == "fp16" and resolve_device(device).type != "cuda":
            raise UsageError("fp16 in the torch runtime needs --device cuda (CPU half precision is not a deploy path)")
        self._dev = resolve_device(device)
        self.device, self.precision, self.deploy, self.threads = str(self._dev), precision, deploy, threads
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        if self._dev.type == "cuda" and precision == "fp32":
            # fp32 means IEEE float32: TF32 convolutions/matmuls (cuDNN's default) err by ~1e-4 relative
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.reference = model.eval()
        self._models: dict[tuple[int, int] | None, torch.nn.Module] = {}  # None: the size-agnostic reference
        self.cuda_graphs = cuda_graphs   # on CUDA: static shapes replayed from captured graphs (no launch overhead)
        self._gpu = CudaEventTimes()
        if threads:
            torch.set_num_threads(threads)

    @classmethod
    def status(cls, probe: bool = False) -> dict:
        devices, notes = ["cpu"], []
        try:
            if torch.cuda.is_available():
                devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            notes.append(f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build")
            if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                devices.append("mps")
        except Exception as e:  # a broken CUDA install must not break `info`
            notes.append(f"CUDA check failed: {type(e).__name__}")
        if devices == ["cpu"] and torch.version.cuda:
            notes.append("no CUDA GPU visible")
        return {**super().status(probe), "devices": devices, "note": "; ".join(notes)}

    @classmethod
    def load(cls, artifact, device="cpu", threads=None, options=None) -> "TorchRunner":
        from ...checkpoints import load_checkpoint
        options = options or {}
        form = options.get("form", "reference")
        if form not in ("reference", "deploy"):
            raise UsageError(f"bad torch runtime option form={form!r}: reference or deploy")
        return cls(load_checkpoint(Path(artifact)).model, device, options.get("precision", "fp32"),
                   form == "deploy", threads, options.get("cuda_graphs", "on") == "on")

    def _model_for(self, h: int, w: int) -> torch.nn.Module:
        """The module to run at this size: the reference itself on CPU fp32, else a converted copy (the
        caller's model is never moved or cast); the deploy form is built per static size."""
        key = (h, w) if self.deploy else None
        if key not in self._models:
            if self.deploy:
                from ...deploy import to_deploy
                model = to_deploy(self.reference, (h, w))
            elif self._dev.type != "cpu" or self._dtype != torch.float32:
                model = copy.deepcopy(self.reference)
            else:
                model = self.reference
            self._models[key] = model.to(self._dev, self._dtype).eval()
        return self._models[key]

    @torch.no_grad()
    def run_tensor(self, x: torch.Tensor):
        """An NCHW tensor already on the device -> float32 outputs on the device, no host copies (what the
        GPU check times). From CUDA graphs the result is the graph's static output: copy it to keep it."""
        model = self._model_for(*x.shape[-2:])
        x = x.to(self._dtype)
        if self._dev.type == "cuda" and self.cuda_graphs:
            key = ("graph", *x.shape[-2:])
            if key not in self._models:
                from ..cuda_graphs import CudaGraphed
                self._models[key] = CudaGraphed(lambda t, m=model: _float(m(t)), self._dev)
            return self._models[key](x)
        return _float(model(x))

    @torch.no_grad()
    def run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._dev, self._dtype)
        if self._dev.type != "cuda":
            return _numpy(self.run_tensor(x))
        with self._gpu.record():   # the model's work only: the host copies are wall time, not GPU compute
            y = self.run_tensor(x)
        return _numpy(y)

    @torch.no_grad()
    def run_stages(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        model = self._model_for(*batch.shape[-2:])
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self._dev, self._dtype)
        return {k: v.float().cpu().numpy() for k, v in model.forward_stages(x).items()}

    def describe(self) -> dict:
        d = {**super().describe(), "form": "deploy" if self.deploy else "reference",
             "cuda_graphs": self._dev.type == "cuda" and self.cuda_graphs}
        if self._dev.type == "cuda":
            d["gpu_time_ms_last"] = self._gpu.last()
        return d

    def close(self) -> None:
        """Drop the converted copies and captured graphs (the caller's model is kept): GPU memory back."""
        self._models.clear()
        if self._dev.type == "cuda":
            torch.cuda.empty_cache()


def _float(out):
    """A module's output (logits, or a backbone's tuple of feature maps) in float32."""
    return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


def _numpy(out):
    return tuple(o.cpu().numpy() for o in out) if isinstance(out, (tuple, list)) else out.cpu().numpy()
