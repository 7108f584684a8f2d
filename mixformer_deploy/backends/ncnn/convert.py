"""pnnx conversion of the ncnn form to ncnn's ``.param`` + ``.bin``, and running those with ncnn's Python
binding. Heavy: imports torch here and pnnx / ncnn on first use.

Why the pnnx executable is called directly and not ``pnnx.export``: the Python wrapper lets the tool's
log through to our stderr, ignores its exit status and then imports the generated Python model. pnnx
also exits 0 when it cannot lower an op (it logs ``ignore ...`` and writes the op under its torch name,
which ncnn refuses at load), so the result is checked for such layers.

Blob names: pnnx calls the input ``in0`` and the outputs ``out0``, ``out1``, ... in the order the module
returns them (logits alone, or a backbone's feature maps in ``out_indices`` order). The Mats ncnn returns
have no fixed batch axis (a (1, C, H, W) map may come back as (C, H, W) or as 4-D), so outputs are
reshaped to the shapes the module computed at batch 1, recorded at conversion. ncnn's Mat does have a
batch axis (``n``), but the ncnn form keeps it at size 1 (see graph.py): an image is one extractor run.

Precision: ``fp16=False`` converts float32 weights and runs with ncnn's fp16/bf16 options off, which
ncnn turns on by default. ``fp16=True`` stores the weights in half precision (half the .bin) and keeps
ncnn's defaults (fp16 storage, and fp16 arithmetic where the CPU has it: ARMv8.2, not x86).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ExportError
from ...optional import require
from .graph import traced_max_rank
from .runner import log_tail
from .spec import BIN, PARAM, output_blob

NCNN_MAX_RANK = 4


@dataclass(frozen=True)
class NcnnModel:
    """A converted net: its two files, the input shape (1, 3, H, W) and each output's shape at batch 1,
    in the module's output order (blob ``out{i}``)."""

    param: Path
    bin: Path
    input_shape: tuple[int, ...]
    output_shapes: tuple[tuple[int, ...], ...]

    @property
    def output_blobs(self) -> list[str]:
        return [output_blob(i) for i in range(len(self.output_shapes))]


def _trace(model: torch.nn.Module, example: torch.Tensor):
    """TorchScript trace (pnnx reads TorchScript) and the outputs at batch 1, quietly: the tracer warns
    about shapes read as constants, which is what a static graph wants."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
        outs = model(example)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    return traced, tuple(tuple(o.shape) for o in outs)


def _unlowered(param: Path) -> list[str]:
    """Layers pnnx left under a torch name (``Tensor.reshape``, ``torch.xxx``, ``aten::...``)."""
    kinds = {ln.split()[0] for ln in param.read_text().splitlines()[2:] if ln.strip()}
    return sorted(k for k in kinds if "." in k or "::" in k)


def _run_pnnx(pt: Path, shape: tuple[int, ...], out: Path, fp16: bool, timeout: float) -> str:
    """The pnnx executable on a TorchScript file; its log (returned) is captured, shown only on failure."""
    pnnx = require("pnnx", "ncnn")
    work = pt.parent
    cmd = [pnnx.EXEC_PATH, pt.name, f"inputshape=[{','.join(map(str, shape))}]f32", f"fp16={int(fp16)}",
           f"ncnnparam={out / PARAM}", f"ncnnbin={out / BIN}", f"ncnnpy={work / 'model_ncnn.py'}",
           f"pnnxparam={work / 'model.pnnx.param'}", f"pnnxbin={work / 'model.pnnx.bin'}",
           f"pnnxpy={work / 'model_pnnx.py'}", f"pnnxonnx={work / 'model.pnnx.onnx'}"]
    try:
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"pnnx did not finish in {timeout:.0f} s") from e
    log = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0 or not (out / PARAM).is_file() or not (out / BIN).is_file():
        raise ExportError(f"pnnx failed (exit {r.returncode}): {log_tail(log)}")
    return log


def convert(model: torch.nn.Module, input_size: tuple[int, int], out_dir: str | Path | None = None,
            fp16: bool = False, timeout: float = 900.0) -> NcnnModel:
    """The ncnn form (``graph.to_ncnn_form``) -> ``model.ncnn.param`` + ``model.ncnn.bin`` in ``out_dir``
    (a new temporary directory when None; the caller owns it). pnnx's intermediate files go to a scratch
    directory that is removed. ExportError when a tensor has rank > 4 or pnnx leaves an op unlowered;
    nothing is left behind then."""
    example = torch.zeros(1, 3, *input_size)
    traced, shapes = _trace(model, example)
    rank = traced_max_rank(traced)
    if rank > NCNN_MAX_RANK:
        raise ExportError(f"the graph has a rank-{rank} tensor; ncnn takes rank <= 4 (convert the ncnn form)")
    fresh = out_dir is None
    out = Path(tempfile.mkdtemp(prefix="ncnn-")) if fresh else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="pnnx-") as scratch:
            pt = Path(scratch) / "model.pt"
            traced.save(str(pt))
            log = _run_pnnx(pt, tuple(example.shape), out, fp16, timeout)
        bad = _unlowered(out / PARAM)
        if bad:
            ignored = "\n".join(ln for ln in log.splitlines() if ln.startswith("ignore "))
            raise ExportError(f"pnnx left {len(bad)} op kind(s) that ncnn cannot run: {', '.join(bad)}; "
                              f"{log_tail(ignored, 3)}")
    except BaseException:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for name in (PARAM, BIN):
                (out / name).unlink(missing_ok=True)
        raise
    return NcnnModel(out / PARAM, out / BIN, tuple(example.shape), shapes)
