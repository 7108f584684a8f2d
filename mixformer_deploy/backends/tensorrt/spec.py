"""TensorRT's light facts: two artifact kinds, the TensorRT-ready ``.trt.onnx`` (ONNX: read with the ONNX
readers, run on onnxruntime) and the ``.engine`` built from it (no metadata of ours: its sidecar is the
manifest; run on TensorRT). The batch profile lives here because both the option check and the exporter
need it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import ArtifactError, UsageError
from ..onnx.spec import SPEC as ONNX_SPEC
from ..onnx.spec import embedded_manifest, external_files, load_onnx
from ..spec import FP16, BackendSpec, Options, Tolerance, block_option, option
from .lint import DEFAULT_VERSION as DEFAULT_TRT_VERSION
from .lint import VERSIONS as TRT_VERSIONS
from .lint import lint

ONNX_SUFFIX = ".trt.onnx"
ENGINE_SUFFIX = ".engine"
CALIBRATION_METHODS = ("max", "entropy")   # ModelOpt int8 calibrators; max: see the option's help
HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")

# Looser than FP32: on the GPU, TensorRT picks kernels by timing whose accumulation order differs from
# onnxruntime's CPU kernels (~1e-6 to 1e-5 relative, more for long reductions); TF32 is off.
TRT_FP32 = Tolerance(1e-3, 1e-3, 0.9999)
# TensorRT fuses Q/DQ into int8 kernels (int32 accumulation) and may requantize at fusion boundaries; the
# held-out accuracy gate judges top-1. Tighter than INT8_PER_TENSOR: ModelOpt's placement (per-channel
# weights, non-quantized ops in float32) keeps the logits close, so a looser bound would hide a broken one.
TRT_INT8 = Tolerance(0.5, 0.1, 0.99, gate_top1=False)


def is_engine(path: Path) -> bool:
    return str(path).lower().endswith(ENGINE_SUFFIX)


@dataclass(frozen=True)
class TensorRtOptions(Options):
    onnx_only: bool = option(False, "Stop after the TensorRT-ready ONNX (exit 0); no engine build.")
    block: str = block_option()
    min_batch: int = option(1, "Smallest batch of the engine's optimization profile (dynamic batch; default 1).")
    opt_batch: int = option(8, "Batch TensorRT tunes kernels for (dynamic batch; default 8, at least --min-batch).")
    max_batch: int = option(32, "Largest batch of the engine's profile (dynamic batch; default 32, at least "
                                "--min-batch).")
    workspace: int | None = option(None, "Builder workspace limit in MiB (default: TensorRT's, the GPU's memory).")
    builder_optimization_level: int = option(3, "TensorRT builder optimization level 0-5 (default 3).",
                                             (0, 1, 2, 3, 4, 5))
    timing_cache: str | None = option(None, "Timing cache file, read and updated, reused across engine builds.")
    trt_version: str = option(DEFAULT_TRT_VERSION, "TensorRT major version the trtexec line and the lint follow "
                                                   "when TensorRT is not installed here (10 or 11; default 11).",
                              TRT_VERSIONS)
    hardware_compatibility: str = option("none", "Engine hardware compatibility: none, ampere_plus or "
                                                 "same_compute_capability (default none).", HARDWARE_COMPAT)
    calibration_method: str = option("max", "int8 calibration of ModelOpt PTQ: max (default; measured on the "
                                            "shipped weights: min per-input cosine 0.998 vs 0.965 with entropy, "
                                            "whose clipping hurts inputs unlike the calibration set) or entropy.",
                                     CALIBRATION_METHODS)
    version_compatible: bool = option(False, "Build a version-compatible engine (runs on later TensorRT).")


def batch_profile(options) -> tuple[int, int, int]:
    """(min, opt, max) batch of the engine: the fixed batch thrice, or the dynamic profile. A default opt or
    max grows to fit a larger given min (--min-batch 64 alone means 64/64/64, not an error)."""
    if options.batch is not None:
        return options.batch, options.batch, options.batch
    t = options.target
    lo = t.min_batch
    hi = max(t.max_batch, lo) if t.max_batch == TensorRtOptions.max_batch else t.max_batch
    opt = min(max(t.opt_batch, lo), hi) if t.opt_batch == TensorRtOptions.opt_batch else t.opt_batch
    return lo, opt, hi


class TensorRtSpec(BackendSpec):
    key = "tensorrt"
    suffix = ONNX_SUFFIX
    extra = "tensorrt"
    runtime = "onnxruntime"          # the .trt.onnx runs on onnxruntime; a .engine on the tensorrt runtime
    runners = {"tensorrt": "TensorRtRunner"}
    exporter_name = "TensorRtExporter"
    precisions = ("fp32", "fp16", "int8")
    calibrated = ("int8",)
    tolerances = {"fp32": TRT_FP32, "fp16": FP16, "int8": TRT_INT8}
    Options = TensorRtOptions
    versions = ("onnx", "onnxruntime", "onnxslim", "nvidia-modelopt")
    description = "TensorRT (a strongly typed TensorRT-ready ONNX, then a .engine on an NVIDIA GPU)"
    cli_module = "cli"                  # trt-lint
    title = "TensorRT"
    runs_here = "the `.trt.onnx` on onnxruntime; the `.engine` needs TensorRT and an NVIDIA GPU"
    verified = "the `.trt.onnx` on Linux x86 CPU; engine build not yet run"
    int8_float_norms = True             # trt-lint's qdq-normalization-input: a LayerNorm never reads int8
    capabilities = frozenset({"int8", "reproducible", "backbone", "inspect", "embedded_manifest", "fp16"})

    def check(self, options) -> None:
        super().check(options)
        t = options.target
        profile = (t.min_batch, t.opt_batch, t.max_batch)
        defaults = (TensorRtOptions.min_batch, TensorRtOptions.opt_batch, TensorRtOptions.max_batch)
        if options.batch is not None and profile != defaults:
            raise UsageError("--min-batch/--opt-batch/--max-batch shape a dynamic batch: use --batch dynamic")
        lo, opt, hi = batch_profile(options)
        if not 1 <= lo <= opt <= hi:
            raise UsageError(f"the batch profile must satisfy 1 <= min <= opt <= max, not {lo}/{opt}/{hi}")
        if t.workspace is not None and t.workspace < 1:
            raise UsageError(f"bad --workspace {t.workspace}: MiB, a positive integer")

    def runtime_for(self, path: Path) -> str:
        """A .engine runs on TensorRT, the ONNX on onnxruntime."""
        return "tensorrt" if is_engine(path) else self.runtime

    def read_embedded(self, path: Path) -> dict | None:
        if is_engine(path):
            return None  # an engine carries no metadata of ours: its sidecar is the manifest
        return embedded_manifest(path)

    def verify(self, path: Path) -> None:
        """An engine cannot be read without TensorRT, but its sidecar records its size and SHA-256: a
        truncated or changed engine is a bad artifact (exit 4) here too, not a missing runtime (exit 3)."""
        if not is_engine(path):
            return super().verify(path)
        from ...artifact import read_sidecar, sha256_file
        path = Path(path)
        recorded = read_sidecar(path) or {}
        size, want = path.stat().st_size, recorded.get("size_bytes")
        if size == 0 or (want is not None and size != want):
            raise ArtifactError(f"{path.name}: {size} bytes where its manifest records {want}: truncated or replaced")
        digest = (recorded.get("tensorrt") or {}).get("engine_sha256")
        if digest and sha256_file(path) != digest:
            raise ArtifactError(f"{path.name}: its bytes differ from the engine its manifest describes (SHA-256)")

    def files(self, path: Path) -> list[Path]:
        path = Path(path)
        if is_engine(path) or not path.is_file():
            return [path] if path.is_file() else []
        return [path, *external_files(load_onnx(path, load_weights=False), path.parent)]

    def inspect(self, path: Path) -> dict:
        path = Path(path)
        if is_engine(path):
            from ...artifact import read_sidecar
            side = read_sidecar(path) or {}
            return {**super().inspect(path), "format": "tensorrt engine", "tensorrt": side.get("tensorrt"),
                    "note": "a serialized TensorRT engine: its manifest is the sidecar"}
        info = ONNX_SPEC.inspect(path)
        ops = info.get("ops") or {}
        trtexec = (embedded_manifest(path) or {}).get("trtexec") or {}
        report = lint(load_onnx(path, load_weights=False), trtexec.get("trt_version") or DEFAULT_TRT_VERSION, path)
        return {**info, "format": "tensorrt-ready onnx", "qdq_pairs": ops.get("QuantizeLinear", 0),
                "casts": ops.get("Cast", 0), "trt_lint": report.summary(), "trtexec": trtexec.get("command")}


SPEC = TensorRtSpec()
