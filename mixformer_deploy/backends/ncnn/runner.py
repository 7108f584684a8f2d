"""ncnn's Python binding runs an ``.ncnn/`` artifact on the CPU, one image per extractor run (the net is
converted at batch 1; see graph.py), with ncnn's fp16 options off for fp32 artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import ArtifactError
from ...optional import require
from ...quiet import captured
from ..runner import Runner
from .spec import INPUT_BLOB, artifact_files, check_weights, embedded_manifest, output_blob


def log_tail(log: str, lines: int = 8) -> str:
    """The last lines of a tool's log on one line, for an error message."""
    return " | ".join(ln.strip() for ln in log.strip().splitlines()[-lines:] if ln.strip())


class NcnnNet:
    """A converted net loaded once. It is converted at batch 1, so ``run`` loops over the images
    (``run_one`` fits ``Runner.run_fixed`` with the shape (1, 3, H, W))."""

    def __init__(self, param: str | Path, bin_: str | Path, output_shapes, threads: int = 1, fp16: bool = False):
        ncnn = require("ncnn", "ncnn")
        self._ncnn, self.output_shapes = ncnn, [tuple(s) for s in output_shapes]
        self.net = net = ncnn.Net()
        opt = net.opt
        opt.num_threads = int(threads)
        if not fp16:  # ncnn defaults to fp16 storage and arithmetic where the CPU has them
            opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = False
            opt.use_bf16_storage = opt.use_bf16_packed = False
        with captured("ncnn", fds=True) as log:
            rcs = (net.load_param(str(param)), net.load_model(str(bin_)))
        if any(rcs):
            raise ArtifactError(f"ncnn cannot load {Path(param).name} / {Path(bin_).name}: {log_tail(''.join(log), 3)}")
        missing = {output_blob(i) for i in range(len(self.output_shapes))} - set(net.output_names())
        if missing or INPUT_BLOB not in net.input_names():
            raise ArtifactError(f"{Path(param).name}: blobs {sorted(missing) or INPUT_BLOB} not found")

    def run_one(self, x: np.ndarray) -> list[np.ndarray]:
        """One image as a (1, 3, H, W) batch -> each output at batch 1, shaped as the module returns it."""
        ex = self.net.create_extractor()
        ex.input(INPUT_BLOB, self._ncnn.Mat(np.ascontiguousarray(x, np.float32), batch_index=0).clone())
        outs = []
        for i, shape in enumerate(self.output_shapes):
            rc, mat = ex.extract(output_blob(i))
            if rc != 0:
                raise ArtifactError(f"ncnn could not compute {output_blob(i)} (error {rc})")
            outs.append(np.array(mat.numpy(), dtype=np.float32, copy=True).reshape(shape))
        return outs

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """An NCHW float32 batch -> the outputs in order (logits, or a backbone's maps), batch first."""
        batch = np.asarray(batch, np.float32)
        per_image = [self.run_one(batch[i:i + 1]) for i in range(batch.shape[0])]
        return [np.concatenate(outs, axis=0) for outs in zip(*per_image)]


class NcnnRunner(Runner):
    key = "ncnn"
    dists = ("ncnn",)
    extra = "ncnn"

    def __init__(self, path: Path, threads: int | None):
        self.path, self.threads = Path(path), threads
        check_weights(self.path)
        param, weights = artifact_files(self.path)
        manifest = embedded_manifest(self.path) or {}
        shapes = (manifest.get("ncnn") or {}).get("output_shapes")
        if not shapes:
            raise ArtifactError(f"{self.path.name}: its manifest records no ncnn output shapes")
        self.precision = manifest.get("precision", "fp32")
        self.input_shape = tuple((manifest.get("ncnn") or {}).get("input_shape") or ())
        self.net = NcnnNet(param, weights, shapes, threads=threads or os.cpu_count() or 1,
                           fp16=self.precision == "fp16")

    @classmethod
    def load(cls, artifact, device="cpu", threads=None, options=None) -> "NcnnRunner":
        return cls(Path(artifact), threads)

    def run(self, batch: np.ndarray):
        return self.run_fixed(batch, self.input_shape, self.net.run_one)

    def close(self) -> None:
        self.net = None
