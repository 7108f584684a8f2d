"""AOTInductor's light facts, and reading .pt2 packages (zip archives) without loading them: members, the
compiled model's own metadata, and our manifest stored under extra/. torch is imported only by the
methods that ask it something (its CUDA, its C++ compiler), never at import."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ...errors import ArtifactError, MissingBackendError, UsageError
from ...manifest import parse_embedded
from ...optional import version_of
from ..spec import BF16, FP16, FP32, BackendSpec, Options, block_option, option

MANIFEST_FILE = "mixformer_deploy.manifest.json"   # under the archive's extra/ folder


def archive_members(path: Path) -> dict[str, str]:
    """Short name (the part after the archive root) -> member name, for a .pt2 zip."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path.name}: not a readable .pt2 package ({type(e).__name__})") from e
    return {n.split("/", 1)[1] if "/" in n else n: n for n in names}


def read_member(path: Path, short: str) -> bytes | None:
    members = archive_members(path)
    if short not in members:
        return None
    with zipfile.ZipFile(path) as z:
        return z.read(members[short])


def package_facts(path: Path) -> dict:
    """What the compiled model says about itself (no loading): device, platform, CPU ISA, GPU arch, and
    the metadata we asked the compiler to embed."""
    members = archive_members(path)
    meta = [s for s in members if s.startswith("data/aotinductor/") and s.endswith("wrapper_metadata.json")]
    if not meta:
        raise ArtifactError(f"{path.name}: not an AOTInductor package (no compiled model inside)")
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(members[meta[0]]))
    except (ValueError, zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{path.name}: unreadable AOTInductor metadata ({type(e).__name__})") from e


def embedded_manifest(path: Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    return parse_embedded(read_member(path, f"extra/{MANIFEST_FILE}"), path.name)


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (oneDNN's check: AVX512-BF16, AMX-BF16 or Arm BF16)."""
    import torch

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


def can_compile() -> str | None:
    """None when a CPU package can be compiled here, else the reason (for tests and ``info``)."""
    try:
        cxx_compiler()
    except MissingBackendError as e:
        return str(e)
    return None if shutil.which("ld") or os.name != "posix" else "no linker (ld) on PATH"


def _check_device(device: str, precision: str) -> None:
    """A CUDA package is compiled on its GPU with Triton; a CPU one computes fp32, or bf16 where native."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise MissingBackendError(f"--device cuda: a CUDA package is compiled on the GPU it targets, and "
                                      f"torch {torch.__version__} sees no CUDA GPU here")
        try:
            import triton  # noqa: F401 - AOTInductor's CUDA kernels are Triton kernels
        except ImportError:
            raise MissingBackendError("--device cuda needs triton (it ships with CUDA builds of torch)") from None
    elif precision == "fp16":
        raise MissingBackendError("aoti fp16 needs --device cuda (CPU half precision is not a deploy path; "
                                  "use bf16 on a CPU that has it)")
    elif precision == "bf16" and not cpu_has_bf16():
        raise MissingBackendError("aoti bf16 on the CPU needs native bf16 (AVX512-BF16 or AMX); this CPU has "
                                  "neither: export fp32")


def _calls_and_kernels(path: Path, members: dict[str, str]) -> tuple[dict[str, int], set[str], dict, int | None]:
    """The wrapper's library calls by op (matmuls, convolutions, ...), the fused kernels inductor generated,
    the members' sizes and the compiled library's size."""
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        wrapper = next((members[s] for s in members if s.endswith(".wrapper.cpp")), None)
        kernels = next((members[s] for s in members if s.endswith(".kernel.cpp")), None)
        so = next((members[s] for s in members if s.endswith(".so")), None)
        wrapper_src = z.read(wrapper).decode(errors="replace") if wrapper else ""
        kernel_src = z.read(kernels).decode(errors="replace") if kernels else ""
    calls: dict[str, int] = {}
    for name in re.findall(r"\baoti_torch_(?:cpu|cuda)_(\w+?)(?:_out)?\(", wrapper_src):
        calls[name] = calls.get(name, 0) + 1
    fused = set(re.findall(r"\b((?:cpp|triton)_\w*fused\w*)\b", kernel_src + wrapper_src))
    sizes = {s: infos[n].file_size for s, n in sorted(members.items())}
    return calls, fused, sizes, infos[so].file_size if so else None


def _io(manifest: dict) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs as the manifest records them (a package has no readable signature)."""
    h, w = manifest.get("input_size") or (None, None)
    batch = manifest.get("batch")
    n = batch if isinstance(batch, int) else "batch"
    inputs = [{"name": "input", "dtype": "fp32", "shape": [n, 3, h, w]}]
    if manifest.get("outputs"):
        return inputs, [{"name": o["name"], "dtype": "fp32", "shape": o["shape"]} for o in manifest["outputs"]]
    return inputs, [{"name": "logits", "dtype": "fp32", "shape": [n, manifest.get("num_classes")]}]


DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class AotiOptions(Options):
    device: str = option("cpu", "Device the package is compiled for: cpu or cuda (a CUDA package needs CUDA "
                         "at export time).", ("cpu", "cuda"))
    max_batch: int = option(DEFAULT_MAX_BATCH, "Largest batch of a --batch dynamic package (default 64).")
    block: str = block_option()


class AotiSpec(BackendSpec):
    key = "aoti"
    suffix = ".pt2"
    extra = "aoti"
    runtime = "aoti"
    runners = {"aoti": "AotiRunner"}
    exporter_name = "AotiExporter"
    precisions = ("fp32", "bf16", "fp16")
    tolerances = {"fp32": FP32, "bf16": BF16, "fp16": FP16}
    Options = AotiOptions
    versions = ("torch",)
    description = "AOTInductor .pt2 package (PyTorch ahead-of-time compiled; Python or C++ loader, CPU or CUDA)"
    title = "AOTInductor"
    runs_here = "aoti (CPU; CUDA packages need CUDA)"
    verified = "Linux x86 CPU"
    # no "fp16": a CPU package computes fp32 or bf16, fp16 needs --device cuda
    export_cost = "costly"
    capabilities = frozenset({"reproducible", "backbone", "inspect", "embedded_manifest"})

    def check(self, options) -> None:
        super().check(options)
        if options.target.max_batch < 2 and options.batch is None:
            raise UsageError(f"bad --max-batch {options.target.max_batch}: a dynamic batch needs --max-batch >= 2")
        _check_device(options.target.device, options.precision)
        cxx_compiler()

    def status(self) -> dict:
        """Export needs a C++ compiler and a linker (AOTInductor compiles C++ at export time)."""
        why = can_compile()
        return {"installed": True, "package": "torch", "version": version_of("torch"), "can_export": why is None,
                "note": "compiles here" if why is None else f"cannot compile here: {why}"}

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def inspect(self, path: Path) -> dict:
        path = Path(path)
        facts = package_facts(path)
        manifest = self.read_embedded(path) or {}
        calls, fused, sizes, library_bytes = _calls_and_kernels(path, archive_members(path))
        inputs, outputs = _io(manifest)
        device, machine = facts.get("AOTI_DEVICE_KEY"), facts.get("AOTI_MACHINE")
        where = (f", {facts.get('AOTI_CPU_ISA')}, -march=native: run it on this CPU family" if device == "cpu"
                 else f", compute capability {facts.get('AOTI_COMPUTE_CAPABILITY')}")
        return {
            "format": "aoti-pt2", "device": device, "platform": facts.get("AOTI_PLATFORM"),
            "machine": machine, "cpu_isa": facts.get("AOTI_CPU_ISA") or None,
            "compute_capability": facts.get("AOTI_COMPUTE_CAPABILITY") or None,
            "inputs": inputs, "outputs": outputs,
            # a histogram like other backends': library calls by op, plus the kernels inductor generated
            "ops": {**dict(sorted(calls.items())), "generated fused kernels": len(fused)},
            "max_rank": None,
            "precisions": {manifest.get("precision", "?"): sum(calls.values()) + len(fused)},
            "kept_fp32": (manifest.get("precision_keeps") or {}).get("modules", []),
            "compile": manifest.get("compile") or {}, "torch": (manifest.get("versions") or {}).get("torch"),
            "embedded_metadata": {k: v for k, v in facts.items() if k.startswith("mixformer_deploy.")},
            "members": sizes, "library_bytes": library_bytes,
            "note": f"compiled for {device} ({machine}{where})",
        }


SPEC = AotiSpec()
