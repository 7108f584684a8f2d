"""AOTInductor exporter: ``torch.export`` of the deploy form compiled ahead of time into a ``.pt2`` package
(a zip holding the generated C++ wrapper and kernels, the compiled shared library with the weights
folded in, and our manifest), loadable from Python (``torch._inductor.aoti_load_package``) or C++
(``torch::inductor::AOTIModelPackageLoader``) with no Python model code.

Why these choices:
- ``freezing`` on: weights become constants the compiler can fold and pre-pack (mkldnn/oneDNN layouts);
  measured ~1.6x faster than eager on B1 at 224 on 2 CPU threads.
- ``cpp.dynamic_threads`` on: the kernels ask OpenMP for the thread count when they run, instead of baking
  in the build machine's core count (a package built on 16 cores would otherwise run 16 threads on 2).
- The package is written by ``torch.export.pt2_archive._package.package_pt2`` into a buffer, with our
  manifest as ``extra/mixformer_deploy.manifest.json``: the archive root inside the zip is then the fixed
  ``archive`` rather than the temporary file's name, so the same inputs give the same bytes. The C++
  loader sees a few facts too, through ``aot_inductor.metadata`` (``get_metadata()``).
- Reduced precision: the deploy form cast to bf16/fp16 with the shared precision keeps as float32 islands,
  float32 input and logits. bf16 on a CPU that has native bf16 (AVX512-BF16 or AMX), fp16 only on CUDA.
- A compile failure keeps the whole log beside the artifact (``<final name>.compile.log``) and reports the
  compiler's first error line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ...errors import ExportError, one_line
from ..exporter import ExportContext, Exporter, ExportOptions
from .spec import MANIFEST_FILE, cxx_compiler

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inductor_configs(device: str) -> dict:
    """The compile settings every package is built with (recorded in its manifest)."""
    cfg = {"freezing": True}
    if device == "cpu":
        cfg["cpp.dynamic_threads"] = True
    return cfg


def first_error_line(text: str) -> str:
    """The compiler's first error line from an inductor compile failure (else the first line)."""
    head, sep, output = text.partition("\nOutput:\n")    # inductor's CppCompileError: command, then output
    for part in ((output,) if sep else ()) + (text,):
        lines = [ln.strip() for ln in part.splitlines() if ln.strip()]
        for ln in lines:
            if re.search(r"\berror\b", ln, re.IGNORECASE) and "C++ compile error" not in ln:
                return ln[:300]
        if sep and part is output and lines:
            return lines[0][:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else "unknown error"


def log_path_for(final: Path) -> Path:
    """Where a failed compile's full log goes: beside the artifact, under its final name."""
    return final.with_name(final.name + ".compile.log")


def _without_build_paths(files: list, staging: Path) -> list:
    """The generated sources without the trailing '// Compile cmd' / '// Link cmd' comments that inductor
    appends when it builds afresh (they name the cache directory, and appear or not depending on the
    cache): comments only, so the package's bytes depend on the model, not on the cache's state."""
    out = []
    for f in files:
        if isinstance(f, str) and f.endswith(".cpp") and os.path.isfile(f):
            text = Path(f).read_text(errors="surrogateescape")
            cut = text.find("\n// Compile cmd\n")
            if cut >= 0:
                text = text[:cut].rstrip("\n") + "\n"
            dst = staging / os.path.basename(f)
            dst.write_text(text, errors="surrogateescape")
            out.append(str(dst))
        else:
            out.append(f)
    return out


class _Exportable(torch.nn.Module):
    """Float32 images in, float32 logits out; the deploy form in between in its compute dtype."""

    def __init__(self, deploy: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.deploy, self.dtype = deploy, dtype

    def forward(self, x):
        y = self.deploy(x.to(self.dtype))
        return tuple(t.float() for t in y) if isinstance(y, tuple) else y.float()


def _settings(options: ExportOptions, dtype: torch.dtype) -> dict:
    """How the package is compiled (the manifest's ``compile``)."""
    device, batch = options.target.device, options.batch
    return {"api": "torch._inductor.aot_compile + package_pt2", "inductor_configs": inductor_configs(device),
            "device": device, "dtype": str(dtype).replace("torch.", ""),
            "batch": batch if batch is not None else {"dynamic": True, "min": 1, "max": options.target.max_batch},
            "torch": torch.__version__, "cxx": cxx_compiler() if device == "cpu" else None,
            "cuda": torch.version.cuda if device == "cuda" else None}


def _package(files: list, manifest: dict) -> bytes:
    """The .pt2 bytes: the compiled files (without build paths) and the manifest under extra/."""
    embedded = json.dumps(manifest, sort_keys=True)
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="aoti-package-") as staging:
        staged = _without_build_paths(files, Path(staging))
        try:
            try:
                from torch.export.pt2_archive._package import package_pt2
            except ImportError:  # an older torch: no extra files in the archive, the sidecar only
                from torch._inductor.package import package_aoti
                package_aoti(buf, staged)
                manifest["package"]["manifest_member"] = None
            else:
                package_pt2(buf, aoti_files=staged, extra_files={MANIFEST_FILE: embedded})
        except Exception as e:
            raise ExportError(f"packaging the compiled model failed: {one_line(e)}") from e
    return buf.getvalue()


class AotiExporter(Exporter):
    def export(self, deploy_model, ctx: ExportContext) -> dict:
        from ...deploy.precision import with_keeps

        options, manifest = ctx.options, ctx.manifest
        device, batch = options.target.device, options.batch
        dtype = DTYPES[options.precision]
        inner = with_keeps(deploy_model, dtype, options.keeps) if dtype != torch.float32 else deploy_model
        module = _Exportable(inner, dtype).to(device).eval().requires_grad_(False)
        example = torch.zeros(batch or 2, 3, options.height, options.width, device=device)
        dynamic = ({0: torch.export.Dim("batch", min=1, max=options.target.max_batch)},) if batch is None else None
        settings = _settings(options, dtype)
        manifest["compile"] = settings
        manifest["package"] = {"manifest_member": f"extra/{MANIFEST_FILE}", "model_name": "model"}
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                ep = torch.export.export(module, (example,), dynamic_shapes=dynamic, strict=False)
        except Exception as e:
            raise ExportError(f"torch.export failed: {one_line(e)}") from e
        t_export = time.perf_counter() - t0
        metadata = {"mixformer_deploy.target": self.spec.key, "mixformer_deploy.precision": options.precision,
                    "mixformer_deploy.variant": str(manifest.get("variant")),
                    "mixformer_deploy.torch": torch.__version__,
                    "mixformer_deploy.input_size": "x".join(map(str, (options.height, options.width)))}
        try:
            files = torch._inductor.aot_compile(
                ep.module(), (example,),
                options={**settings["inductor_configs"], "aot_inductor.package": True,
                         "aot_inductor.metadata": metadata})
        except Exception as e:
            self._fail(Path(ctx.final), e)
        t_compile = time.perf_counter() - t0 - t_export
        Path(ctx.tmp).write_bytes(_package(files, manifest))
        log_path_for(Path(ctx.final)).unlink(missing_ok=True)   # an earlier failure's log is stale now
        facts = {"export_s": round(t_export, 2), "compile_s": round(t_compile, 2)}
        manifest["compile"] = {**settings, **facts}   # after embedding: times never change the bytes
        log.info("aoti: torch.export %.1f s, AOTInductor compile %.1f s", t_export, t_compile)
        return facts

    def _fail(self, final: Path, e: Exception):
        """Keep the full log beside the artifact; raise ExportError with the compiler's first error line."""
        text = f"{type(e).__name__}: {e}"
        path = log_path_for(final)
        try:
            path.write_text(f"AOTInductor compile failed (torch {torch.__version__})\n\n{text}\n\n"
                            + "".join(traceback.format_exception(e)))
            where = f" (full log: {path})"
        except OSError:
            where = ""
        raise ExportError(f"AOTInductor compile failed: {first_error_line(text)}{where}") from e
