"""TensorRT target: a TensorRT-ready ONNX (every precision decision made and verified here), then an engine
where TensorRT and a GPU exist.

Why two steps: TensorRT 11 has no weak typing (no FP16/INT8 builder flags, no calibrators); a network is
strongly typed, so fp16 must already be in the ONNX (mixed-precision casts) and int8 must be explicit
Q/DQ nodes. TensorRT 10 builds the same files with the STRONGLY_TYPED flag. The ONNX is therefore the
function TensorRT compiles, and it runs (and is parity- and accuracy-checked) on onnxruntime anywhere.

- fp32: the deploy form's ONNX (targets.onnx.export_onnx), as is.
- fp16: NVIDIA ModelOpt AutoCast (``convert_to_mixed_precision``, ``keep_io_types=True``) with the nodes
  of the precision keeps (LayerNorms, attention logits + softmax, pool, head) excluded: float32 input
  and output, float32 islands, everything else float16. AutoCast is what NVIDIA's TensorRT 10->11
  migration guide names for this step.
- int8: ModelOpt ONNX PTQ (``modelopt.onnx.quantization.quantize``, ``max`` calibration by default, on the CPU
  execution provider) inserts Q/DQ where TensorRT's fusion rules want them (Conv/Gemm inputs, residual
  adds), per-channel weights, per-tensor activations; the keeps are excluded, non-quantized ops stay
  float32. ModelOpt also quantizes a LayerNorm's input when the tensor is shared with a quantized
  consumer; the kept LayerNorms are rewired to read the float tensor (see ``_float_normalization_inputs``).

The artifact ``mixformer-...-{precision}.trt.onnx`` (manifest target ``tensorrt``, runtime onnxruntime)
carries the ``trtexec`` command that builds the same engine; ``after_publish`` prints it and builds the
``.engine`` through ``build_engine`` when TensorRT and a CUDA GPU are here (else MissingBackendError).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shlex
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from ..backends import require, version_of
from ..errors import ExportError, MissingBackendError, MixformerDeployError, UsageError, one_line
from ..formats.onnx import embedded_manifest, load_onnx
from ..manifest import EMBED_KEY
from .base import ExportOptions, Target, TargetOption, Tolerance
from .onnx import OnnxTarget, export_onnx, module_of

log = logging.getLogger(__name__)

ONNX_SUFFIX = ".trt.onnx"
ENGINE_SUFFIX = ".engine"
DEFAULT_TRT_VERSION = "11"
DEFAULT_PROFILE = (1, 8, 32)         # min/opt/max batch of a dynamic-batch engine when not given
CALIBRATION_METHODS = ("max", "entropy")   # ModelOpt int8 calibrators; max: see the option's help
HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.\d+\.partial(\.[^.]+)?$")


@dataclass
class AfterPublish:
    """What the export CLI does after the artifact is published: print ``lines`` (stdout), then the
    path of the last artifact (``path``, else the published one), then raise ``error`` if set."""

    lines: list[str] = field(default_factory=list)
    path: Path | None = None
    error: MixformerDeployError | None = None


class TensorRtTarget(Target):
    key = "tensorrt"
    suffix = ONNX_SUFFIX
    extra = "tensorrt"
    runtime = "onnxruntime"          # the .trt.onnx runs on onnxruntime; a .engine on the tensorrt runtime
    precisions = ("fp32", "fp16", "int8")
    calibrated = ("int8",)
    # fp32 is looser than the ONNX target's: on the GPU, TensorRT picks kernels whose accumulation order
    # differs from onnxruntime's CPU kernels (~1e-5 relative, more for long reductions); TF32 is off.
    tolerances = {"fp32": Tolerance(1e-3, 1e-3, 0.9999), "fp16": Tolerance(2e-2, 2e-2, 0.999),
                  "int8": Tolerance(0.5, 0.1, 0.99, gate_top1=False)}
    options = (
        TargetOption("onnx_only", "Stop after the TensorRT-ready ONNX (exit 0); no engine build.", bool, False),
        TargetOption("min_batch", "Smallest batch of the engine's optimization profile (dynamic batch; default 1).", int, None),
        TargetOption("opt_batch", "Batch TensorRT tunes kernels for (dynamic batch; default 8).", int, None),
        TargetOption("max_batch", "Largest batch of the engine's profile (dynamic batch; default 32).", int, None),
        TargetOption("workspace", "Builder workspace limit in MiB (default: TensorRT's, the GPU's memory).", int, None),
        TargetOption("builder_optimization_level", "TensorRT builder optimization level 0-5 (default 3).", int, 3,
                     (0, 1, 2, 3, 4, 5)),
        TargetOption("timing_cache", "Timing cache file, read and updated, reused across engine builds.", str, None),
        TargetOption("trt_version", "TensorRT major version the trtexec line and the lint follow when TensorRT "
                                    "is not installed here (10 or 11; default 11).", str, DEFAULT_TRT_VERSION,
                     ("10", "11")),
        TargetOption("hardware_compatibility", "Engine hardware compatibility: none, ampere_plus or "
                                               "same_compute_capability (default none).", str, "none", HARDWARE_COMPAT),
        TargetOption("calibration_method", "int8 calibration of ModelOpt PTQ: max (default; measured on the shipped "
                                           "weights: min per-input cosine 0.998 vs 0.965 with entropy, whose clipping "
                                           "hurts inputs unlike the calibration set) or entropy.", str, "max",
                     CALIBRATION_METHODS),
        TargetOption("version_compatible", "Build a version-compatible engine (runs on later TensorRT).", bool, False),
    )
    versions = ("onnx", "onnxruntime", "onnxslim", "nvidia-modelopt")
    description = "TensorRT (a strongly typed TensorRT-ready ONNX, then a .engine on an NVIDIA GPU)"

    # ------------------------------------------------------------------ checks

    def check(self, options: ExportOptions) -> None:
        super().check(options)
        profile = [options.opt(k) for k in ("min_batch", "opt_batch", "max_batch")]
        if options.batch is not None and any(v is not None for v in profile):
            raise UsageError("--min-batch/--opt-batch/--max-batch shape a dynamic batch: use --batch dynamic")
        lo, opt, hi = batch_profile(options)
        if not 1 <= lo <= opt <= hi:
            raise UsageError(f"the batch profile must satisfy 1 <= min <= opt <= max, not {lo}/{opt}/{hi}")
        ws = options.opt("workspace")
        if ws is not None and ws < 1:
            raise UsageError(f"bad --workspace {ws}: MiB, a positive integer")

    # ------------------------------------------------------------------ export

    def export(self, deploy_model, options: ExportOptions, out: Path, manifest: dict) -> dict:
        onnx = require("onnx", "onnx")
        self.check(options)
        out = Path(out)
        fp32_options = dataclasses.replace(options, precision="fp32")
        model = export_onnx(deploy_model, fp32_options, manifest)
        kept = kept_nodes(model, options.keeps) if options.precision != "fp32" else []
        facts: dict = {}
        if options.precision == "fp16":
            model, facts = self._autocast(model, kept)
        elif options.precision == "int8":
            model, facts = self._quantize(model, kept, options)
        from ..trt_lint import lint
        trt_version = options.opt("trt_version") or DEFAULT_TRT_VERSION
        report = lint(model, trt_version)
        if not report.clean:
            raise ExportError(f"the TensorRT-ready ONNX fails trt-lint for TensorRT {trt_version}: "
                              f"{report.findings[0].line()} ({len(report.findings)} finding(s))")
        final = final_path_of(out)
        command = trtexec_command(Path(final.name), options, trt_version)
        manifest.update({
            "format": "onnx", "tensorrt_ready": True, "trtexec": {"command": command, "cwd": "the artifact's folder",
                                                                  "trt_version": trt_version},
            "engine_name": engine_path_of(final).name, "trt_lint": report.summary(),
            "nodes": {**manifest.get("nodes", {}), "shipped": len(model.graph.node)}, **facts,
        })
        del model.metadata_props[:]
        embed = model.metadata_props.add()
        embed.key, embed.value = EMBED_KEY, json.dumps(manifest)
        model.producer_name = "mixformer-deploy"
        model.producer_version = manifest.get("versions", {}).get("mixformer-deploy", "")
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejected the TensorRT-ready ONNX: {one_line(e)}") from e
        onnx.save(model, str(out))
        return {"trtexec": manifest["trtexec"], "trt_lint": manifest["trt_lint"]}

    def _autocast(self, model, kept: list[str]):
        onnx = require("onnx", "onnx")
        autocast = _modelopt("modelopt.onnx.autocast")
        with tempfile.TemporaryDirectory(prefix="mixformer-trt-") as tmp:
            src = Path(tmp) / "fp32.onnx"
            onnx.save(model, str(src))
            try:
                with _quiet():
                    converted = autocast.convert_to_mixed_precision(
                        onnx_path=str(src), low_precision_type="fp16", keep_io_types=True,
                        nodes_to_exclude=[f"^{re.escape(n)}$" for n in kept])
            except Exception as e:
                raise ExportError(f"ModelOpt AutoCast failed: {one_line(e)}") from e
        lowered = sum(1 for n in converted.graph.node if n.op_type == "Cast")
        return converted, {"precision_tool": {"tool": "nvidia-modelopt AutoCast (convert_to_mixed_precision)",
                                              "version": version_of("nvidia-modelopt"), "low_precision": "fp16",
                                              "keep_io_types": True, "kept_fp32_nodes": len(kept),
                                              "casts": lowered}}

    def _quantize(self, model, kept: list[str], options: ExportOptions):
        onnx = require("onnx", "onnx")
        quantization = _modelopt("modelopt.onnx.quantization")
        if options.calibration is None:
            raise UsageError("int8 needs calibration images")
        x = options.calibration.x
        if options.batch and len(x) % options.batch:
            x = x[: len(x) - len(x) % options.batch]
        if not len(x):
            raise UsageError(f"int8 with --batch {options.batch} needs at least {options.batch} calibration images")
        method = options.opt("calibration_method") or CALIBRATION_METHODS[0]
        with tempfile.TemporaryDirectory(prefix="mixformer-trt-") as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, str(src))
            try:
                with _quiet(), _onnxruntime_quantization_restored():
                    quantization.quantize(
                        onnx_path=str(src), quantize_mode="int8", calibration_data={"input": x},
                        calibration_method=method, calibration_eps=["cpu"], output_path=str(dst),
                        nodes_to_exclude=[f"^{re.escape(n)}$" for n in kept], high_precision_dtype="fp32",
                        log_level="ERROR")
                quantized = onnx.load(str(dst))
            except MixformerDeployError:
                raise
            except Exception as e:
                raise ExportError(f"ModelOpt ONNX PTQ failed: {one_line(e)}") from e
        rewired = _float_normalization_inputs(quantized, set(kept))
        del quantized.metadata_props[:]
        q = sum(1 for n in quantized.graph.node if n.op_type == "QuantizeLinear")
        dq = sum(1 for n in quantized.graph.node if n.op_type == "DequantizeLinear")
        return quantized, {"precision_tool": {"tool": "nvidia-modelopt ONNX PTQ (modelopt.onnx.quantization)",
                                              "version": version_of("nvidia-modelopt"), "mode": "int8",
                                              "calibration_method": method,
                                              "calibration_provider": "onnxruntime CPU", "calibration_count": len(x),
                                              "high_precision": "fp32", "kept_fp32_nodes": len(kept),
                                              "quantize_linear": q, "dequantize_linear": dq,
                                              "normalization_inputs_kept_float": rewired}}

    # ------------------------------------------------------------------ after the artifact is published

    def after_publish(self, path: Path, options: ExportOptions) -> AfterPublish:
        """Print the trtexec line; build the engine where TensorRT and a GPU are (else the error says what
        is missing, exit 3); with --onnx-only, stop after the ONNX."""
        path = Path(path)
        trt_version = installed_trt_major() or options.opt("trt_version") or DEFAULT_TRT_VERSION
        command = trtexec_command(path, options, trt_version)
        result = AfterPublish(lines=[command])
        if options.opt("onnx_only"):
            return result
        try:
            result.path = build_engine(path, options)
        except MixformerDeployError as e:
            result.error = e
        return result

    # ------------------------------------------------------------------ reading artifacts

    def runtime_for(self, path: Path) -> str:
        """The runtime of one of this target's artifacts: a .engine runs on TensorRT, the ONNX on onnxruntime."""
        return "tensorrt" if str(path).lower().endswith(ENGINE_SUFFIX) else self.runtime

    def read_embedded(self, path: Path) -> dict | None:
        if str(path).lower().endswith(ENGINE_SUFFIX):
            return None  # an engine carries no metadata of ours: its sidecar is the manifest
        return embedded_manifest(path)

    def files(self, path: Path) -> list[Path]:
        path = Path(path)
        if str(path).lower().endswith(ENGINE_SUFFIX):
            return [path] if path.is_file() else []
        return OnnxTarget().files(path)

    def inspect(self, path: Path) -> dict:
        path = Path(path)
        if str(path).lower().endswith(ENGINE_SUFFIX):
            from ..artifact import read_sidecar
            side = read_sidecar(path) or {}
            return {**super().inspect(path), "format": "tensorrt engine", "tensorrt": side.get("tensorrt"),
                    "note": "a serialized TensorRT engine: its manifest is the sidecar"}
        from ..trt_lint import lint
        info = OnnxTarget().inspect(path)
        ops = info.get("ops") or {}
        manifest = embedded_manifest(path) or {}
        report = lint(load_onnx(path, load_weights=False), (manifest.get("trtexec") or {}).get("trt_version")
                      or DEFAULT_TRT_VERSION, path)
        return {**info, "format": "tensorrt-ready onnx", "qdq_pairs": ops.get("QuantizeLinear", 0),
                "casts": ops.get("Cast", 0), "trt_lint": report.summary(),
                "trtexec": (manifest.get("trtexec") or {}).get("command")}


# ---------------------------------------------------------------------- helpers (module level: tested)

def kept_nodes(model, keeps: list[str]) -> list[str]:
    """Names of the exported nodes that belong to a kept (float32) deploy-form module."""
    keeps = list(keeps)
    return [n.name for n in model.graph.node if n.name and any(
        module_of(n.name) == k or module_of(n.name).startswith(k + ".") for k in keeps)]


def _float_normalization_inputs(model, kept: set[str]) -> int:
    """Let kept normalizations read the float tensor instead of its Q/DQ copy.

    ModelOpt quantizes a tensor once for all its consumers; when a residual stream feeds both a
    quantized Add and a LayerNorm, the LayerNorm (a float32 keep) would read int8-rounded values. The
    Q/DQ pair stays for the other consumers; only the kept normalization's input edge changes. Returns
    how many inputs were rewired."""
    producer = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for n in model.graph.node:
        if n.name not in kept or n.op_type not in ("LayerNormalization", "GroupNormalization",
                                                    "InstanceNormalization") or not n.input:
            continue
        dq = producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        n.input[0] = q.input[0]
        count += 1
    if count:
        _drop_unused(model.graph)
    return count


def _drop_unused(graph) -> None:
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def batch_profile(options: ExportOptions) -> tuple[int, int, int]:
    """(min, opt, max) batch of the engine: the fixed batch thrice, or the dynamic profile."""
    if options.batch is not None:
        return options.batch, options.batch, options.batch
    lo = options.opt("min_batch") or DEFAULT_PROFILE[0]
    hi = options.opt("max_batch") or max(DEFAULT_PROFILE[2], lo)
    opt = options.opt("opt_batch") or min(max(DEFAULT_PROFILE[1], lo), hi)
    return lo, opt, hi


def final_path_of(out: Path) -> Path:
    """The final artifact path of a temporary export path ('.<name>.<pid>.partial<suffix>')."""
    m = _TMP_NAME.match(out.name)
    return out.with_name(m.group("name")) if m else out


def engine_path_of(onnx_path: Path) -> Path:
    name = onnx_path.name
    stem = name[: -len(ONNX_SUFFIX)] if name.lower().endswith(ONNX_SUFFIX) else Path(name).stem
    return onnx_path.with_name(stem + ENGINE_SUFFIX)


def trtexec_command(onnx_path: Path, options: ExportOptions, trt_version: str = DEFAULT_TRT_VERSION) -> str:
    """The trtexec line that builds the same engine as ``build_engine``."""
    engine = engine_path_of(Path(onnx_path))
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}"]
    if str(trt_version) == "10":
        args.append("--stronglyTyped")   # 11.x: always strongly typed (the flag is a no-op there)
    if options.batch is None:
        lo, opt, hi = batch_profile(options)
        shape = f"3x{options.height}x{options.width}"
        args += [f"--minShapes=input:{lo}x{shape}", f"--optShapes=input:{opt}x{shape}",
                 f"--maxShapes=input:{hi}x{shape}"]
    if options.precision == "fp32":
        args.append("--noTF32")          # fp32 means IEEE float32, as the parity tolerances assume
    if options.opt("workspace"):
        args.append(f"--memPoolSize=workspace:{options.opt('workspace')}M")
    level = options.opt("builder_optimization_level")
    if level is not None:
        args.append(f"--builderOptimizationLevel={level}")
    if options.opt("timing_cache"):
        args.append(f"--timingCacheFile={options.opt('timing_cache')}")
    hw = options.opt("hardware_compatibility")
    if hw and hw != "none":
        args.append(f"--hardwareCompatibilityLevel={'ampere+' if hw == 'ampere_plus' else 'sameComputeCapability'}")
    if options.opt("version_compatible"):
        args.append("--versionCompatible")
    return " ".join(shlex.quote(a) for a in args)


def installed_trt_major() -> str | None:
    v = version_of("tensorrt") or version_of("tensorrt-cu12") or version_of("tensorrt-cu13")
    return v.split(".")[0] if v else None


def _modelopt(module: str):
    """ModelOpt's ONNX tools (the ``tensorrt`` extra), imported with their import-time chatter muted."""
    with _quiet():
        mod = require(module, "tensorrt")
    logging.getLogger("modelopt").setLevel(logging.ERROR)
    return mod


@contextmanager
def _onnxruntime_quantization_restored():
    """ModelOpt patches onnxruntime's quantization classes and operator registries in place, process-wide;
    left patched, a later ``--target onnx --precision int8`` in the same process (``--target all``, a library
    user) fails inside onnxruntime's quantizer. Put everything back once ModelOpt is done."""
    from onnxruntime.quantization import calibrate, registry
    from onnxruntime.quantization.base_quantizer import BaseQuantizer
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    classes = [BaseQuantizer, QDQQuantizer, calibrate.CalibraterBase, calibrate.MinMaxCalibrater,
               calibrate.HistogramCalibrater, calibrate.HistogramCollector]
    saved = [(c, dict(vars(c))) for c in classes]
    create_calibrator = calibrate.create_calibrator
    registries = [(r, dict(r)) for r in (registry.QDQRegistry, registry.QLinearOpsRegistry)]
    try:
        yield
    finally:
        for cls, attributes in saved:
            for name in set(vars(cls)) - set(attributes):
                delattr(cls, name)
            for name, value in attributes.items():
                if vars(cls).get(name) is not value and name not in ("__dict__", "__weakref__"):
                    setattr(cls, name, value)
        calibrate.create_calibrator = create_calibrator
        for table, entries in registries:
            table.clear()
            table.update(entries)


@contextmanager
def _quiet():
    """ModelOpt and onnxruntime's calibrator print progress to stdout and draw progress bars on stderr; the
    CLI's stdout ends with the artifact's path and its stderr is for the one error line. Both go to the
    debug log instead (exceptions still propagate)."""
    import io
    buf = io.StringIO()
    level = logging.getLogger("modelopt").level
    logging.getLogger("modelopt").setLevel(logging.ERROR)
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            yield
    finally:
        logging.getLogger("modelopt").setLevel(level or logging.ERROR)
        if buf.getvalue().strip():
            log.debug("modelopt: %s", buf.getvalue()[-2000:])


# ---------------------------------------------------------------------- the engine (TensorRT 10 and 11)

def _missing_engine_backend(onnx_path: Path) -> MissingBackendError | None:
    missing = []
    try:
        require("tensorrt", "tensorrt-runtime")
    except MissingBackendError:
        missing.append('TensorRT (pip install "mixformer-deploy[tensorrt-runtime]" on an NVIDIA GPU machine)')
    import torch
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if not missing:
        return None
    return MissingBackendError(f"cannot build the engine here: {' and '.join(missing)} not available; "
                               f"build it from {onnx_path.name} with the trtexec line printed above")


def build_engine(onnx_path: Path, options: ExportOptions, engine_path: Path | None = None) -> Path:
    """Parse the TensorRT-ready ONNX into a strongly typed network and build a serialized engine.

    Follows TensorRT 10.x and 11.x's documented Python API: ``create_network`` with the STRONGLY_TYPED
    flag (required on 10.x, accepted and ignored on 11.x, where strong typing is always on); no precision
    builder flags (removed in 11.x); ``set_memory_pool_limit(WORKSPACE)``; ``builder_optimization_level``;
    an optimization profile for a dynamic batch; a timing cache loaded from and saved to a file;
    hardware / version compatibility where the installed TensorRT has them. The engine's sidecar manifest
    records the TensorRT version, the GPU, its compute capability and the builder settings."""
    from ..artifact import publish, read_manifest, sidecar_path, temp_path, write_json_atomic
    onnx_path = Path(onnx_path)
    error = _missing_engine_backend(onnx_path)
    if error is not None:
        raise error
    import torch
    trt = require("tensorrt", "tensorrt-runtime")
    manifest = read_manifest(onnx_path)
    engine_path = Path(engine_path) if engine_path else engine_path_of(onnx_path)
    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    elif major < 11:
        raise MissingBackendError(f"TensorRT {trt.__version__} has no strongly typed networks (needs 10.x or later)")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    settings: dict = {"strongly_typed": True}
    if options.opt("workspace"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.opt("workspace")) << 20)
        settings["workspace_mib"] = int(options.opt("workspace"))
    level = options.opt("builder_optimization_level")
    if level is not None:
        config.builder_optimization_level = int(level)
        settings["builder_optimization_level"] = int(level)
    if options.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
        settings["tf32"] = False
    lo, opt, hi = batch_profile(options)
    if options.batch is None:
        profile = builder.create_optimization_profile()
        name = network.get_input(0).name
        chw = (3, options.height, options.width)
        profile.set_shape(name, (lo, *chw), (opt, *chw), (hi, *chw))
        config.add_optimization_profile(profile)
    settings["batch_profile"] = [lo, opt, hi]
    hw = options.opt("hardware_compatibility") or "none"
    if hw != "none":
        levels = getattr(trt, "HardwareCompatibilityLevel", None)
        member = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}[hw]
        if levels is None or not hasattr(levels, member):
            raise MissingBackendError(f"TensorRT {trt.__version__} has no hardware compatibility level {hw}")
        config.hardware_compatibility_level = getattr(levels, member)
    settings["hardware_compatibility"] = hw
    if options.opt("version_compatible"):
        if not hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE"):
            raise MissingBackendError(f"TensorRT {trt.__version__} cannot build version-compatible engines")
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    settings["version_compatible"] = bool(options.opt("version_compatible"))
    cache_file = Path(options.opt("timing_cache")) if options.opt("timing_cache") else None
    if cache_file is not None:
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        settings["timing_cache"] = str(cache_file)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    if cache_file is not None:
        cache_file.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    data = bytes(memoryview(serialized))
    tmp = temp_path(engine_path)
    tmp.write_bytes(data)
    publish(tmp, engine_path)
    props = torch.cuda.get_device_properties(0)
    engine_manifest = {**manifest, "runtime": "tensorrt", "format": "engine", "size_bytes": len(data),
                       "tensorrt": {"version": trt.__version__, "gpu": props.name,
                                    "compute_capability": f"{props.major}.{props.minor}",
                                    "onnx": onnx_path.name,
                                    "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
                                    "builder": settings}}
    engine_manifest.pop("parity", None)   # the ONNX's parity is not the engine's: run parity on the engine
    write_json_atomic(sidecar_path(engine_path), engine_manifest)
    return engine_path
