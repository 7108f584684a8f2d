"""PyTorch eager: the reference runtime. It runs weights files (the reference model or its deploy form)
and exports nothing; parity compares every artifact with it."""

from __future__ import annotations

from ..spec import BackendSpec


class TorchSpec(BackendSpec):
    key = "torch"
    extra = ""
    runtime = "torch"
    runners = {"torch": "TorchRunner"}
    versions = ("torch",)
    description = "PyTorch eager (the reference; runs weights files)"


SPEC = TorchSpec()
