"""AOTInductor target: ``torch.export`` of the deploy form compiled ahead of time into a ``.pt2`` package
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
import shutil
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import torch

from ..errors import ExportError, MissingBackendError, UsageError, one_line
from ..formats.pt2 import MANIFEST_FILE, archive_members, embedded_manifest, package_facts
from .base import ExportOptions, Target, TargetOption, Tolerance

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TMP_NAME = re.compile(r"^\.(?P<final>.+)\.\d+\.partial(?:\.[^.]+)?$")


def inductor_configs(device: str) -> dict:
    """The compile settings every package is built with (recorded in its manifest)."""
    cfg = {"freezing": True}
    if device == "cpu":
        cfg["cpp.dynamic_threads"] = True
    return cfg


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (oneDNN's check: AVX512-BF16, AMX-BF16 or Arm BF16)."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def cxx_compiler() -> str:
    """The C++ compiler AOTInductor will use ($CXX, else g++/clang++), or MissingBackendError naming it."""
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    cxx = inductor_config.cpp.cxx
    search = tuple(c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c)
    try:
        return cpp_compiler_search(search)
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler or anything the probe raises
        names = ", ".join(search) or "g++"
        raise MissingBackendError(f"AOTInductor needs a C++ compiler and none runs here (looked for {names}; "
                                  "install g++ or point $CXX at one)") from None


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


def log_path_for(out: Path) -> Path:
    """Where a failed compile's full log goes: beside the artifact, under its final name."""
    m = _TMP_NAME.match(out.name)
    return out.with_name((m.group("final") if m else out.name) + ".compile.log")


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


class AotiTarget(Target):
    key = "aoti"
    suffix = ".pt2"
    extra = "aoti"
    runtime = "aoti"
    precisions = ("fp32", "bf16", "fp16")
    tolerances = {"fp32": Tolerance(1e-4, 1e-4, 0.99999), "bf16": Tolerance(1e-1, 5e-2, 0.995),
                  "fp16": Tolerance(2e-2, 2e-2, 0.999)}
    options = (
        TargetOption("device", "Device the package is compiled for: cpu or cuda (a CUDA package needs CUDA "
                     "at export time).", str, "cpu", ("cpu", "cuda")),
        TargetOption("max_batch", "Largest batch of a --batch dynamic package (default 64).", int,
                     DEFAULT_MAX_BATCH),
    )
    versions = ("torch",)
    description = "AOTInductor .pt2 package (PyTorch ahead-of-time compiled; Python or C++ loader, CPU or CUDA)"

    def check(self, options: ExportOptions) -> None:
        super().check(options)
        device = options.opt("device") or "cpu"
        max_batch = options.opt("max_batch") or DEFAULT_MAX_BATCH
        if max_batch < 2 and options.batch is None:
            raise UsageError(f"bad --max-batch {max_batch}: a dynamic batch needs --max-batch >= 2")
        if device == "cuda":
            if not torch.cuda.is_available():
                raise MissingBackendError(f"--device cuda: a CUDA package is compiled on the GPU it targets, and "
                                          f"torch {torch.__version__} sees no CUDA GPU here")
            try:
                import triton  # noqa: F401 - AOTInductor's CUDA kernels are Triton kernels
            except ImportError:
                raise MissingBackendError("--device cuda needs triton (it ships with CUDA builds of torch)") from None
        elif options.precision == "fp16":
            raise MissingBackendError("aoti fp16 needs --device cuda (CPU half precision is not a deploy path; "
                                      "use bf16 on a CPU that has it)")
        elif options.precision == "bf16" and not cpu_has_bf16():
            raise MissingBackendError("aoti bf16 on the CPU needs native bf16 (AVX512-BF16 or AMX); this CPU has "
                                      "neither: export fp32")
        cxx_compiler()

    def export(self, deploy_model, options: ExportOptions, out: Path, manifest: dict) -> dict:
        from ..deploy.precision import with_keeps

        self.check(options)
        out = Path(out)
        device = options.opt("device") or "cpu"
        max_batch = options.opt("max_batch") or DEFAULT_MAX_BATCH
        dtype = DTYPES[options.precision]
        inner = with_keeps(deploy_model, dtype, options.keeps) if dtype != torch.float32 else deploy_model
        module = _Exportable(inner, dtype).to(device).eval().requires_grad_(False)
        batch = options.batch
        example = torch.zeros(batch or 2, 3, options.height, options.width, device=device)
        dynamic = ({0: torch.export.Dim("batch", min=1, max=max_batch)},) if batch is None else None
        configs = inductor_configs(device)
        settings = {"api": "torch._inductor.aot_compile + package_pt2", "inductor_configs": configs,
                    "device": device, "dtype": str(dtype).replace("torch.", ""),
                    "batch": batch if batch is not None else {"dynamic": True, "min": 1, "max": max_batch},
                    "torch": torch.__version__, "cxx": cxx_compiler() if device == "cpu" else None,
                    "cuda": torch.version.cuda if device == "cuda" else None}
        manifest["compile"] = settings
        manifest["package"] = {"manifest_member": f"extra/{MANIFEST_FILE}", "model_name": "model"}
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                ep = torch.export.export(module, (example,), dynamic_shapes=dynamic, strict=False)
        except Exception as e:
            raise ExportError(f"torch.export failed: {one_line(e)}") from e
        t_export = time.perf_counter() - t0
        metadata = {"mixformer_deploy.target": self.key, "mixformer_deploy.precision": options.precision,
                    "mixformer_deploy.variant": str(manifest.get("variant")),
                    "mixformer_deploy.torch": torch.__version__,
                    "mixformer_deploy.input_size": "x".join(map(str, (options.height, options.width)))}
        try:
            files = torch._inductor.aot_compile(
                ep.module(), (example,),
                options={**configs, "aot_inductor.package": True, "aot_inductor.metadata": metadata})
        except Exception as e:
            self._fail(out, e)
        t_compile = time.perf_counter() - t0 - t_export
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
        out.write_bytes(buf.getvalue())
        log_path_for(out).unlink(missing_ok=True)   # an earlier failure's log no longer describes this name
        facts = {"export_s": round(t_export, 2), "compile_s": round(t_compile, 2)}
        manifest["compile"] = {**settings, **facts}   # after embedding: times never change the bytes
        log.info("aoti: torch.export %.1f s, AOTInductor compile %.1f s", t_export, t_compile)
        return facts

    def _fail(self, out: Path, e: Exception):
        """Keep the full log beside the artifact; raise ExportError with the compiler's first error line."""
        text = f"{type(e).__name__}: {e}"
        path = log_path_for(out)
        try:
            path.write_text(f"AOTInductor compile failed (torch {torch.__version__})\n\n{text}\n\n"
                            + "".join(traceback.format_exception(e)))
            where = f" (full log: {path})"
        except OSError:
            where = ""
        raise ExportError(f"AOTInductor compile failed: {first_error_line(text)}{where}") from e

    def status(self) -> dict:
        """Export needs a C++ compiler and a linker (AOTInductor compiles C++ at export time)."""
        why = can_compile()
        return {"installed": True, "package": "torch", "version": torch.__version__, "can_export": why is None,
                "note": "compiles here" if why is None else f"cannot compile here: {why}"}

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def inspect(self, path: Path) -> dict:
        path = Path(path)
        facts = package_facts(path)
        manifest = self.read_embedded(path) or {}
        members = archive_members(path)
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            wrapper = next((members[s] for s in members if s.endswith(".wrapper.cpp")), None)
            kernels = next((members[s] for s in members if s.endswith(".kernel.cpp")), None)
            so = next((members[s] for s in members if s.endswith(".so")), None)
            wrapper_src = z.read(wrapper).decode(errors="replace") if wrapper else ""
            kernel_src = z.read(kernels).decode(errors="replace") if kernels else ""
        # library calls made by the wrapper (matmuls, convolutions, ...) and fused kernels generated
        calls: dict[str, int] = {}
        for name in re.findall(r"\baoti_torch_(?:cpu|cuda)_(\w+?)(?:_out)?\(", wrapper_src):
            calls[name] = calls.get(name, 0) + 1
        fused = set(re.findall(r"\b((?:cpp|triton)_\w*fused\w*)\b", kernel_src + wrapper_src))
        compile_settings = manifest.get("compile") or {}
        h, w = manifest.get("input_size") or (None, None)
        batch = manifest.get("batch")
        return {
            "format": "aoti-pt2", "device": facts.get("AOTI_DEVICE_KEY"), "platform": facts.get("AOTI_PLATFORM"),
            "machine": facts.get("AOTI_MACHINE"), "cpu_isa": facts.get("AOTI_CPU_ISA") or None,
            "compute_capability": facts.get("AOTI_COMPUTE_CAPABILITY") or None,
            "inputs": [{"name": "input", "dtype": "fp32", "shape": [batch if isinstance(batch, int) else "batch", 3, h, w]}],
            "outputs": [{"name": o["name"], "dtype": "fp32", "shape": o["shape"]} for o in manifest["outputs"]]
            if manifest.get("outputs") else [{"name": "logits", "dtype": "fp32",
                                               "shape": [batch if isinstance(batch, int) else "batch",
                                                         manifest.get("num_classes")]}],
            # a histogram like other targets': library calls by op, plus the kernels inductor generated
            "ops": {**dict(sorted(calls.items())), "generated fused kernels": len(fused)},
            "max_rank": None,
            "precisions": {manifest.get("precision", "?"): sum(calls.values()) + len(fused)},
            "kept_fp32": (manifest.get("precision_keeps") or {}).get("modules", []),
            "compile": compile_settings, "torch": (manifest.get("versions") or {}).get("torch"),
            "embedded_metadata": {k: v for k, v in facts.items() if k.startswith("mixformer_deploy.")},
            "members": {s: infos[n].file_size for s, n in sorted(members.items())},
            "library_bytes": infos[so].file_size if so else None,
            "note": f"compiled for {facts.get('AOTI_DEVICE_KEY')} ({facts.get('AOTI_MACHINE')}"
                    + (f", {facts.get('AOTI_CPU_ISA')}, -march=native: run it on this CPU family"
                       if facts.get("AOTI_DEVICE_KEY") == "cpu" else
                       f", compute capability {facts.get('AOTI_COMPUTE_CAPABILITY')}") + ")",
        }


def can_compile() -> str | None:
    """None when a CPU package can be compiled here, else the reason (for tests and ``info``)."""
    try:
        cxx_compiler()
    except MissingBackendError as e:
        return str(e)
    return None if shutil.which("ld") or os.name != "posix" else "no linker (ld) on PATH"
