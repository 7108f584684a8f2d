"""ExecuTorch: the runtime's Python bindings (the same C++ runtime, portable kernels and XNNPACK delegate
that the Android and iOS builds link), on this machine's CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...optional import require
from ...errors import ArtifactError, UsageError, one_line
from .spec import load_program, program_manifest
from ..runner import Runner


class ExecuTorchRunner(Runner):
    key = "executorch"
    dists = ("executorch",)
    extra = "executorch"
    option_help = {}

    def __init__(self, path: Path, device: str, threads: int | None):
        self.torch = require("torch", self.extra)

        self.path, self.device, self.threads = Path(path), "cpu", threads
        if threads:
            # XNNPACK's work is split over ExecuTorch's one process-wide thread pool
            from executorch.extension.pybindings import portable_lib
            if portable_lib._threadpool_get_thread_count() != threads:
                portable_lib._unsafe_reset_threadpool(int(threads))
        self.program = load_program(self.path)
        try:
            self.method = self.program.load_method("forward")
        except Exception as e:
            raise ArtifactError(f"{self.path.name}: ExecuTorch cannot load its forward method ({one_line(e, 200)})") from e
        if self.method is None:
            raise ArtifactError(f"{self.path.name}: no forward method")
        meta = self.program.metadata("forward")
        self.input_shape = tuple(meta.input_tensor_meta(0).sizes())
        try:
            self.precision = (program_manifest(self.program, self.path.name) or {}).get("precision", "fp32")
        except ArtifactError:
            self.precision = "fp32"

    @classmethod
    def load(cls, artifact, device="cpu", threads=None, options=None) -> "ExecuTorchRunner":
        cls.check_options(options)
        return cls(Path(artifact), device, threads)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_fixed(batch, self.input_shape,
                              lambda part: [o.numpy() for o in self.method.execute([self.torch.from_numpy(part)])])

    def describe(self) -> dict:
        d = super().describe()
        try:
            from executorch.extension.pybindings import portable_lib
            d["threadpool"] = portable_lib._threadpool_get_thread_count()
        except Exception:
            pass
        return {**d, "delegate": "XnnpackBackend"}

    def close(self) -> None:
        self.method = self.program = None
