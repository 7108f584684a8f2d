"""TensorRT target: a TensorRT-ready ONNX (every precision decision made and verified here), then an engine
where TensorRT and a GPU exist.

Why two steps: TensorRT 11 has no weak typing (no FP16/INT8 builder flags, no calibrators); a network is
strongly typed, so fp16 must already be in the ONNX (mixed-precision casts) and int8 must be explicit
Q/DQ nodes. TensorRT 10 builds the same files with the STRONGLY_TYPED flag. The ONNX is therefore the
function TensorRT compiles, and it runs (and is parity- and accuracy-checked) on onnxruntime anywhere.

- fp32: the deploy form's ONNX (the ONNX exporter's ``export_onnx``), as is.
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
carries the ``trtexec`` command that builds the same engine; ``follow_up`` prints it and builds the
``.engine`` through ``build_engine`` when TensorRT and a CUDA GPU are here (else MissingBackendError).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ...deploy.precision import kept_by
from ...errors import ExportError, MissingBackendError, MixformerDeployError, UsageError, one_line
from ...optional import require, version_of
from ..exporter import ExportContext, Exporter, ExportOptions, FollowUp
from ..onnx.export import export_onnx, module_of, save_onnx
from ..onnx.spec import DEFAULT_OPSET, OnnxOptions
from .lint import lint
from .spec import ENGINE_SUFFIX, ONNX_SUFFIX, batch_profile

log = logging.getLogger(__name__)


class TensorRtExporter(Exporter):
    def export(self, deploy_model, ctx: ExportContext) -> dict:
        options = ctx.options
        # the fp32 deploy-form ONNX every precision starts from (the ONNX writer's own defaults)
        fp32 = dataclasses.replace(options, precision="fp32", target=OnnxOptions(opset=DEFAULT_OPSET, simplify=True))
        model = export_onnx(deploy_model, fp32, ctx.manifest)
        kept = kept_nodes(model, options.keeps) if options.precision != "fp32" else []
        facts: dict = {}
        if options.precision == "fp16":
            model, facts = _autocast(model, kept)
        elif options.precision == "int8":
            model, facts = _quantize(model, kept, options)
        trt_version = options.target.trt_version
        report = lint(model, trt_version)
        if not report.clean:
            raise ExportError(f"the TensorRT-ready ONNX fails trt-lint for TensorRT {trt_version}: "
                              f"{report.findings[0].line()} ({len(report.findings)} finding(s))")
        final = Path(ctx.final)
        command = trtexec_command(Path(final.name), options, trt_version)
        ctx.manifest.update({
            "format": "onnx", "tensorrt_ready": True, "trtexec": {"command": command, "cwd": "the artifact's folder",
                                                                  "trt_version": trt_version},
            "engine_name": engine_path_of(final).name, "trt_lint": report.summary(),
            "nodes": {**ctx.manifest.get("nodes", {}), "shipped": len(model.graph.node)}, **facts,
        })
        del model.metadata_props[:]
        save_onnx(model, ctx.tmp, ctx.manifest)
        return {"trtexec": ctx.manifest["trtexec"], "trt_lint": ctx.manifest["trt_lint"]}

    def follow_up(self, final: Path, options: ExportOptions) -> FollowUp:
        """Print the trtexec line; build the engine where TensorRT and a GPU are (else the error says what
        is missing, exit 3); with --onnx-only, stop after the ONNX."""
        final = Path(final)
        trt_version = installed_trt_major() or options.target.trt_version
        result = FollowUp(lines=[trtexec_command(final, options, trt_version)])
        if options.target.onnx_only:
            return result
        try:
            result.path = build_engine(final, options)
        except MixformerDeployError as e:
            result.error = e
        return result


def _autocast(model, kept: list[str]):
    onnx = require("onnx", "onnx")
    autocast = _modelopt("modelopt.onnx.autocast")
    with tempfile.TemporaryDirectory(prefix="mixformer-trt-") as tmp:
        src = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(src))
        try:
            converted = autocast.convert_to_mixed_precision(
                onnx_path=str(src), low_precision_type="fp16", keep_io_types=True,
                nodes_to_exclude=[f"^{re.escape(n)}$" for n in kept])
        except Exception as e:
            raise ExportError(f"ModelOpt AutoCast failed: {one_line(e)}") from e
    _canonical_casts(converted.graph)
    lowered = sum(1 for n in converted.graph.node if n.op_type == "Cast")
    return converted, {"precision_tool": {"tool": "nvidia-modelopt AutoCast (convert_to_mixed_precision)",
                                          "version": version_of("nvidia-modelopt"), "low_precision": "fp16",
                                          "keep_io_types": True, "kept_fp32_nodes": len(kept),
                                          "casts": lowered}}


def _canonical_casts(graph) -> None:
    """AutoCast inserts the Casts of a multi-output node (a Split) in set order, which follows Python's
    per-process string hashing: the same export gave other bytes in another process. Sort each run of
    adjacent Casts that read no output of one another by name; order value_info by name."""
    nodes, i = list(graph.node), 0
    while i < len(nodes):
        j = i
        while j < len(nodes) and nodes[j].op_type == "Cast":
            j += 1
        run = nodes[i:j]
        made = {o for n in run for o in n.output}
        if len(run) > 1 and not any(x in made for n in run for x in n.input):
            nodes[i:j] = sorted(run, key=lambda n: n.name)
        i = max(j, i + 1)
    del graph.node[:]
    graph.node.extend(nodes)
    infos = sorted(graph.value_info, key=lambda v: v.name)
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _quantize(model, kept: list[str], options: ExportOptions):
    """ModelOpt ONNX PTQ on the CPU provider; the calibration set in full batches of the graph's batch."""
    onnx = require("onnx", "onnx")
    quantization = _modelopt("modelopt.onnx.quantization")
    if options.calibration is None:
        raise UsageError("int8 needs calibration images")
    x = np.concatenate(options.calibration.batches(options.batch or 1))
    method = options.target.calibration_method
    with tempfile.TemporaryDirectory(prefix="mixformer-trt-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        try:
            with _onnxruntime_quantization_restored():
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
                                          "calibration_method": method, "calibration_provider": "onnxruntime CPU",
                                          "calibration_count": len(options.calibration.x),
                                          "high_precision": "fp32", "kept_fp32_nodes": len(kept),
                                          "quantize_linear": q, "dequantize_linear": dq,
                                          "normalization_inputs_kept_float": rewired}}


# ---------------------------------------------------------------------- helpers (module level: tested)

def kept_nodes(model, keeps: list[str]) -> list[str]:
    """Names of the exported nodes that belong to a kept (float32) deploy-form module."""
    return [n.name for n in model.graph.node if n.name and kept_by(module_of(n.name), keeps)]


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


def engine_path_of(onnx_path: Path) -> Path:
    name = onnx_path.name
    stem = name[: -len(ONNX_SUFFIX)] if name.lower().endswith(ONNX_SUFFIX) else Path(name).stem
    return onnx_path.with_name(stem + ENGINE_SUFFIX)


def trtexec_command(onnx_path: Path, options: ExportOptions, trt_version: str | None = None) -> str:
    """The trtexec line that builds the same engine as ``build_engine``."""
    t = options.target
    engine = engine_path_of(Path(onnx_path))
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}"]
    if str(trt_version or t.trt_version) == "10":
        args.append("--stronglyTyped")   # 11.x: always strongly typed (the flag is a no-op there)
    if options.batch is None:
        lo, opt, hi = batch_profile(options)
        shape = f"3x{options.height}x{options.width}"
        args += [f"--minShapes=input:{lo}x{shape}", f"--optShapes=input:{opt}x{shape}",
                 f"--maxShapes=input:{hi}x{shape}"]
    if options.precision == "fp32":
        args.append("--noTF32")          # fp32 means IEEE float32, as the parity tolerances assume
    if t.workspace:
        args.append(f"--memPoolSize=workspace:{t.workspace}M")
    args.append(f"--builderOptimizationLevel={t.builder_optimization_level}")
    if t.timing_cache:
        args.append(f"--timingCacheFile={t.timing_cache}")
    if t.hardware_compatibility != "none":
        level = "ampere+" if t.hardware_compatibility == "ampere_plus" else "sameComputeCapability"
        args.append(f"--hardwareCompatibilityLevel={level}")
    if t.version_compatible:
        args.append("--versionCompatible")
    return " ".join(shlex.quote(a) for a in args)


def installed_trt_major() -> str | None:
    v = version_of("tensorrt") or version_of("tensorrt-cu12") or version_of("tensorrt-cu13")
    return v.split(".")[0] if v else None


def _modelopt(module: str):
    """ModelOpt's ONNX tools (the ``tensorrt`` extra), imported with their import-time chatter muted."""
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
                               f"--onnx-only stops at the checked {onnx_path.name} (exit 0: CPU CI jobs), and "
                               "the trtexec line printed with its path builds the engine on a GPU machine")


def build_engine(onnx_path: Path, options: ExportOptions, engine_path: Path | None = None) -> Path:
    """Parse the TensorRT-ready ONNX into a strongly typed network and build a serialized engine.

    Follows TensorRT 10.x and 11.x's documented Python API: ``create_network`` with the STRONGLY_TYPED
    flag (required on 10.x, accepted and ignored on 11.x, where strong typing is always on); no precision
    builder flags (removed in 11.x); ``set_memory_pool_limit(WORKSPACE)``; ``builder_optimization_level``;
    an optimization profile for a dynamic batch; a timing cache loaded from and saved to a file;
    hardware / version compatibility where the installed TensorRT has them. The engine's sidecar manifest
    records the TensorRT version, the GPU, its compute capability and the builder settings."""
    from ...artifact import read_manifest
    onnx_path = Path(onnx_path)
    error = _missing_engine_backend(onnx_path)
    if error is not None:
        raise error
    trt = require("tensorrt", "tensorrt-runtime")
    manifest = read_manifest(onnx_path)
    engine_path = Path(engine_path) if engine_path else engine_path_of(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser = _strongly_typed_network(trt, builder, logger, onnx_path)
    config, settings = _builder_config(trt, builder, network, options)
    cache_file = Path(options.target.timing_cache) if options.target.timing_cache else None
    if cache_file is not None:
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        settings["timing_cache"] = str(cache_file)
    serialized = builder.build_serialized_network(network, config)
    del parser   # it owns the parsed weights: alive until the engine is built
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    if cache_file is not None:
        cache_file.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    _write_engine(trt, bytes(memoryview(serialized)), engine_path, onnx_path, manifest, settings)
    return engine_path


def _strongly_typed_network(trt, builder, logger, onnx_path: Path):
    """The ONNX parsed into a strongly typed network; (network, parser): the parser owns the weights."""
    major = int(trt.__version__.split(".")[0])
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
    return network, parser


def _builder_config(trt, builder, network, options: ExportOptions):
    """The builder config from the options, and the settings it records in the engine's manifest."""
    t = options.target
    config = builder.create_builder_config()
    settings: dict = {"strongly_typed": True}
    if t.workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(t.workspace) << 20)
        settings["workspace_mib"] = int(t.workspace)
    config.builder_optimization_level = int(t.builder_optimization_level)
    settings["builder_optimization_level"] = int(t.builder_optimization_level)
    if options.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
        settings["tf32"] = False
    lo, opt, hi = batch_profile(options)
    if options.batch is None:
        profile = builder.create_optimization_profile()
        chw = (3, options.height, options.width)
        profile.set_shape(network.get_input(0).name, (lo, *chw), (opt, *chw), (hi, *chw))
        config.add_optimization_profile(profile)
    settings["batch_profile"] = [lo, opt, hi]
    _compatibility(trt, config, t, settings)
    return config, settings


def _compatibility(trt, config, t, settings: dict) -> None:
    """Hardware and version compatibility, refused where the installed TensorRT lacks them."""
    hw = t.hardware_compatibility
    if hw != "none":
        levels = getattr(trt, "HardwareCompatibilityLevel", None)
        member = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}[hw]
        if levels is None or not hasattr(levels, member):
            raise MissingBackendError(f"TensorRT {trt.__version__} has no hardware compatibility level {hw}")
        config.hardware_compatibility_level = getattr(levels, member)
    settings["hardware_compatibility"] = hw
    if t.version_compatible:
        if not hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE"):
            raise MissingBackendError(f"TensorRT {trt.__version__} cannot build version-compatible engines")
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    settings["version_compatible"] = bool(t.version_compatible)


def _write_engine(trt, data: bytes, engine_path: Path, onnx_path: Path, manifest: dict, settings: dict) -> None:
    """Publish the engine and its sidecar manifest: the ONNX's, with the TensorRT and GPU it was built for."""
    import hashlib

    import torch

    from ...artifact import atomic_file, sidecar_path, uninterrupted, write_json_atomic
    props = torch.cuda.get_device_properties(0)
    engine_manifest = {**manifest, "runtime": "tensorrt", "format": "engine", "size_bytes": len(data),
                       "tensorrt": {"version": trt.__version__, "gpu": props.name,
                                    "compute_capability": f"{props.major}.{props.minor}",
                                    "onnx": onnx_path.name,
                                    "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
                                    "engine_sha256": hashlib.sha256(data).hexdigest(),
                                    "builder": settings}}
    engine_manifest.pop("parity", None)   # the ONNX's parity is not the engine's: run parity on the engine
    with uninterrupted(), atomic_file(engine_path) as tmp:   # the engine and its sidecar together
        tmp.write_bytes(data)
        write_json_atomic(sidecar_path(engine_path), engine_manifest)
