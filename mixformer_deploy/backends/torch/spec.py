"""PyTorch eager: the reference runtime. It runs weights files (the reference model or its deploy form)
and exports nothing; parity compares every artifact with it."""

from __future__ import annotations

from ..spec import FP16, FP32, BackendSpec


class TorchSpec(BackendSpec):
    key = "torch"
    extra = ""
    runtime = "torch"
    runners = {"torch": "TorchRunner"}
    precisions = ("fp32", "fp16")      # fp16 on CUDA only
    tolerances = {"fp32": FP32, "fp16": FP16}
    versions = ("torch",)
    description = "PyTorch eager (the reference; runs weights files)"
    title = "PyTorch"
    runs_here = "torch"
    verified = "Linux x86 CPU; NVIDIA H100 (fp32, fp16)"


SPEC = TorchSpec()
