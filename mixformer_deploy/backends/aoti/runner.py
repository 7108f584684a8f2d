"""AOTInductor: runs a ``.pt2`` package through ``torch._inductor.aoti_load_package`` (CPU, or CUDA where
the package was compiled for CUDA), with CUDA graphs and CUDA-event GPU time on CUDA.

Checks before loading, each a one-line error: the package's torch version must be this torch's (a package
is compiled against one libtorch; exit 4 naming both), and the device it was compiled for must be here
(CUDA for a CUDA package, the CPU instruction set of a CPU package; exit 3).
"""

from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from ...errors import ArtifactError, MissingBackendError, UsageError, one_line
from ..runner import Runner, packed
from ..cuda_graphs import CudaGraphed
from ..torch.runner import CudaEventTimes, CudaTimed

log = logging.getLogger(__name__)
TRUE, FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
# the vector ISA named in a CPU package's metadata -> /proc/cpuinfo flags it needs
ISA_FLAGS = {"AVX512": ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "AVX2": ("avx2", "fma")}


def release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': the build tag (+cpu, +cu128) does not change the compiled ABI."""
    return str(version).split("+", 1)[0]


def cpu_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def check_package_device(path: Path, facts: dict, device: str) -> str:
    """The device this package runs on here ('cpu' or 'cuda[:N]'), or MissingBackendError when the
    device it was compiled for is not here; UsageError when asked for another device than its own."""
    built = (facts.get("AOTI_DEVICE_KEY") or "cpu").lower()
    name = path.name
    if built == "cuda":
        if not torch.cuda.is_available():
            cc = facts.get("AOTI_COMPUTE_CAPABILITY")
            raise MissingBackendError(f"{name} was compiled for CUDA{f' (compute capability {cc})' if cc else ''} and "
                                      f"torch {torch.__version__} sees no CUDA GPU here")
        cc = facts.get("AOTI_COMPUTE_CAPABILITY")
        if cc:
            major, minor = torch.cuda.get_device_capability()
            if str(cc) != f"{major}{minor}":
                raise MissingBackendError(f"{name} was compiled for compute capability {cc}; this GPU is "
                                          f"{major}{minor} ({torch.cuda.get_device_name()}): export it on this GPU")
    elif built == "cpu":
        machine = facts.get("AOTI_MACHINE")
        if machine and machine.lower() != platform.machine().lower():
            raise MissingBackendError(f"{name} was compiled for {machine} CPUs; this machine is {platform.machine()}")
        plat = facts.get("AOTI_PLATFORM")
        if plat and not sys.platform.startswith(plat.lower()):
            raise MissingBackendError(f"{name} was compiled for {plat}; this is {sys.platform}")
        isa = (facts.get("AOTI_CPU_ISA") or "").split()
        flags = cpu_flags()
        if isa and flags is not None and isa[0] in ISA_FLAGS:
            missing = [f for f in ISA_FLAGS[isa[0]] if f not in flags]
            if missing:
                raise MissingBackendError(f"{name} was compiled for {isa[0]} CPUs; this CPU lacks "
                                          f"{', '.join(missing)}: export it on (or for) this machine")
    else:
        raise MissingBackendError(f"{name} was compiled for device {built!r}, which this runner does not drive")
    if device in ("auto", "cpu") and built == "cuda":
        if device == "cpu":  # the default of parity/bench/predict: a CUDA package can only run on CUDA
            log.warning("%s was compiled for CUDA: running it on cuda, not cpu", name)
        return "cuda"
    if device == "auto":
        return "cpu"
    if device.split(":")[0] != built:
        raise UsageError(f"{name} was compiled for {built}: run it with --device {built} (or auto), not {device}")
    return device


class AotiRunner(CudaTimed, Runner):
    key = "aoti"
    devices = ("cpu", "cuda")
    dists = ("torch",)
    extra = "aoti"
    option_help = {"cuda_graphs": "on|off: replay the package from captured CUDA graphs, one per input shape "
                                  "(CUDA only; default on for fixed-batch packages, off for dynamic ones)"}

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, options: dict | None = None):
        from .spec import embedded_manifest, package_facts

        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"artifact not found: {self.path}")
        facts = package_facts(self.path)
        self.manifest = embedded_manifest(self.path) or {}
        built_with = (self.manifest.get("versions") or {}).get("torch") or facts.get("mixformer_deploy.torch")
        if built_with and release(built_with) != release(torch.__version__):
            raise ArtifactError(f"{self.path.name} was compiled by torch {built_with}; this is torch "
                                f"{torch.__version__}: export it again with this torch")
        self.device = check_package_device(self.path, facts, device)
        self._dev = torch.device(self.device)
        self.precision = self.manifest.get("precision", "fp32")
        self.threads = threads or self._free_threads()
        torch.set_num_threads(self.threads)
        batch = self.manifest.get("batch")
        self.fixed_batch = batch if isinstance(batch, int) else None
        self.max_batch = ((self.manifest.get("compile") or {}).get("batch") or {}).get("max") \
            if self.fixed_batch is None and isinstance((self.manifest.get("compile") or {}).get("batch"), dict) else None
        self.input_size = tuple(self.manifest.get("input_size") or ()) or None
        opt = str((options or {}).get("cuda_graphs", "")).lower()
        if opt and opt not in TRUE + FALSE:
            raise UsageError(f"bad aoti runtime option cuda_graphs={opt!r}: on or off")
        if opt in TRUE and self._dev.type != "cuda":
            raise UsageError("cuda_graphs=on needs a CUDA package on --device cuda")
        self.cuda_graphs = self._dev.type == "cuda" and (opt in TRUE or (self.fixed_batch is not None and opt not in FALSE))
        self._graphed = None
        self._gpu = CudaEventTimes()
        self._graph_note = None
        index = self._dev.index if self._dev.type == "cuda" and self._dev.index is not None else -1
        try:
            self.model = torch._inductor.aoti_load_package(str(self.path), run_single_threaded=self.cuda_graphs,
                                                           device_index=index)
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: AOTInductor cannot load it ({one_line(e, 200)})") from e

    def _free_threads(self) -> int:
        """Without --threads, a CPU package runs on the CPUs other processes leave free: its OpenMP threads
        spin-wait, and one spinning on a core another process holds made B1 2.5x slower here (a passive
        wait instead cost 3.7x on a quiet machine; benchmarks/results/aoti-load-*.md)."""
        from ...environment import free_cpus_now

        if self._dev.type != "cpu":
            return torch.get_num_threads()
        free, usable = free_cpus_now(), torch.get_num_threads()
        if free < usable:
            log.info("aoti: %d of %d CPUs are busy: running on %d threads (--threads overrides)", usable - free,
                     usable, free)
        return min(free, usable)

    @classmethod
    def load(cls, artifact, device="cpu", threads=None, options=None) -> "AotiRunner":
        return cls(Path(artifact), device, threads, options)

    @classmethod
    def status(cls, probe: bool = False) -> dict:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        return {"installed": True, "package": "torch", "version": torch.__version__, "can_run": True,
                "devices": devices, "note": "runs .pt2 packages"}

    def _check(self, x: np.ndarray) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise UsageError(f"{self.path.name} takes NCHW images with 3 channels, not shape {x.shape}")
        if self.input_size and tuple(x.shape[2:]) != tuple(self.input_size):
            raise UsageError(f"{self.path.name} was compiled for {self.input_size[0]}x{self.input_size[1]} "
                             f"inputs, not {x.shape[2]}x{x.shape[3]}")
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            raise UsageError(f"{self.path.name} was compiled for batch {self.fixed_batch}, not {x.shape[0]}")
        if self.max_batch and x.shape[0] > self.max_batch:
            raise UsageError(f"{self.path.name} takes batches of 1 to {self.max_batch}, not {x.shape[0]} "
                             "(export with a larger --max-batch)")

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            if self._graphed is None:
                self._graphed = CudaGraphed(lambda t: self._first(self.model(t)), self._dev)
            try:
                return self._graphed(x)
            except Exception as e:  # noqa: BLE001 - fall back to plain launches, and say so
                self.cuda_graphs, self._graphed = False, None
                self._graph_note = f"CUDA graph capture failed, running without: {one_line(e, 200)}"
                log.warning("%s: %s", self.path.name, self._graph_note)
        return self._first(self.model(x))

    @torch.no_grad()
    def run_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 NCHW tensor already on the device -> logits on the device (no host copies; the GPU
        check times this). With CUDA graphs the result is the graph's static output: copy it to keep it."""
        return self._call(x)

    @staticmethod
    def _first(out):
        """The package's outputs: the logits, or a backbone's tuple of feature maps."""
        if isinstance(out, (list, tuple)):
            return packed(out)
        return out

    @torch.no_grad()
    def run(self, batch: np.ndarray) -> np.ndarray:
        self._check(batch)
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._dev)
        if self._dev.type == "cuda":
            with self._gpu.record():   # the package's work only, not the host copies
                y = self._call(x)
        else:
            y = self._call(x)
        try:
            return tuple(t.float().cpu().numpy() for t in y) if isinstance(y, tuple) else y.float().cpu().numpy()
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: inference failed on input {batch.shape} ({one_line(e, 200)})") from e

    def describe(self) -> dict:
        compile_settings = self.manifest.get("compile") or {}
        d = {**super().describe(), "form": "deploy", "package_torch": (self.manifest.get("versions") or {}).get("torch"),
             "batch": self.fixed_batch if self.fixed_batch is not None else f"dynamic (1-{self.max_batch})",
             "inductor_configs": compile_settings.get("inductor_configs")}
        if self._dev.type == "cuda":
            d.update(cuda_graphs=self.cuda_graphs, gpu=torch.cuda.get_device_name(self._dev),
                     gpu_time_ms_last=self._gpu.last())
            if self._graph_note:
                d["note"] = self._graph_note
        return d

    def close(self) -> None:
        self.model = self._graphed = None
        if self._dev.type == "cuda":
            torch.cuda.empty_cache()
