"""OpenVINO exporter: the deploy form's ONNX read by OpenVINO's ONNX frontend, saved as an IR directory
(``model.xml`` + ``model.bin``) with the manifest in the IR's ``rt_info``.

Why through the deploy form's ONNX (``backends.onnx.export.export_onnx``) and ``Core.read_model`` rather
than ``openvino.convert_model`` of the deploy module: both give the same OpenVINO graph (same op histogram,
same speed, measured), but the ONNX route reuses the one exported graph every ONNX-based runtime
checks, keeps the per-stage tensor names (``debug_stage0``, ... - the runner exposes them for parity
localization), keeps node names scoped by deploy-form module (``/stages.0/stages.0.0/norm1/...``, what
precision keeps map onto), and never goes through ``ovc`` (no telemetry).

Precisions:
- fp32: ``save_model(compress_to_fp16=False)``. ``save_model`` compresses weights to fp16 by default
  (an "fp32" IR saved that way is ~7e-4 relative L2 off), so fp32 never takes the default.
- fp16: fp16-compressed weights (half the size); OpenVINO decompresses them and computes in the runner's
  execution precision (f32 by default), so the precision keeps - which guard fp16 *compute* - do not apply.
- int8: NNCF post-training quantization (FakeQuantize, int8 weights) of the fp32 IR, calibrated on
  ``options.calibration.batches(batch)``; the precision keeps become NNCF's ignored scope.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

from ...deploy.precision import kept_by
from ...errors import ExportError, UsageError, one_line
from ...optional import require
from ..exporter import ExportContext, Exporter, ExportOptions
from ..onnx.spec import OnnxOptions
from .spec import BIN, RT_SECTION, XML, module_of, openvino, sha256_file

log = logging.getLogger(__name__)


def nncf():
    """NNCF with its telemetry off (NNCF reads NNCF_CI once, at import)."""
    os.environ.setdefault("NNCF_CI", "1")
    return require("nncf", "openvino")


AUTO_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*_\d+$")


def stable_names(model) -> int:
    """Ops that OpenVINO or NNCF created get names from a process-wide counter ('Constant_4841'), so the
    same export in another process would write other bytes: rename them by their topological position.
    Returns the number of ops."""
    ops = model.get_ordered_ops()
    for i, op in enumerate(ops):
        if AUTO_NAME.match(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{i}")
    return len(ops)


def offline_transformations(model) -> bool:
    """What ``openvino.convert_model`` applies after its frontends (MOC: fold shape subgraphs, fuse Gelu
    and attention into ScaledDotProductAttention), so that the IR - and the graph NNCF quantizes - is the
    one the CPU plugin runs: 1266 -> 633 ops on the tiny model, same outputs, stage tensor names kept.
    Without it NNCF puts FakeQuantize between the attention MatMuls and the plugin cannot fuse them."""
    try:
        from openvino._offline_transformations import apply_fused_names_cleanup, apply_moc_transformations
    except ImportError:  # a future OpenVINO without the module: the raw frontend graph is still valid
        log.warning("openvino._offline_transformations is gone: saving the ONNX frontend's graph as is")
        return False
    try:
        apply_moc_transformations(model, cf=False, smart_reshape=True)
        apply_fused_names_cleanup(model)
    except Exception as e:
        raise ExportError(f"OpenVINO's offline transformations failed on the deploy form: {one_line(e)}") from e
    return True


def in_modules(op, modules) -> bool:
    """Whether an op belongs to one of the kept modules. A fused ScaledDotProductAttention belongs to
    its attention module as a whole, so it is kept when any module inside it is (e.g.
    'stages.0.0.attention.logits', the softmax(q @ k^T + bias) the precision keeps name)."""
    m = module_of(op.get_friendly_name())
    if not m:
        return False
    if kept_by(m, modules):
        return True
    return op.get_type_name() == "ScaledDotProductAttention" and any(k.startswith(m + ".") for k in modules)


class OpenVinoExporter(Exporter):
    def export(self, deploy_model, ctx: ExportContext) -> dict:
        options, out = ctx.options, Path(ctx.tmp)
        model = self._read_deploy_form(deploy_model, options, out, ctx.manifest)
        facts: dict = {"source": "deploy-form ONNX via Core.read_model",
                       "compress_to_fp16": options.precision == "fp16"}
        graph = options.target.nncf_graph
        if options.precision == "int8" and graph == "fused":
            facts["moc"] = offline_transformations(model)
        if options.precision == "int8":
            model, facts["nncf"] = self._quantize(model, options)
            facts["nncf"]["graph"] = graph
        if "moc" not in facts:
            facts["moc"] = offline_transformations(model)
        if options.precision == "fp16" and options.keeps:
            facts["precision_keeps"] = "not applied: fp16 is weight storage, decompressed to float32 before compute"
        facts["ops"] = stable_names(model)
        ctx.manifest["openvino"] = facts
        self._save(model, out, ctx.manifest, compress=options.precision == "fp16")
        return {"openvino": facts}

    def _read_deploy_form(self, deploy_model, options: ExportOptions, out: Path, manifest: dict):
        """The deploy form's float32 ONNX (fp16 is weight storage here, int8 comes from NNCF on the fp32
        graph) read by OpenVINO's ONNX frontend, its outputs named as the contract says."""
        from ..onnx.export import export_onnx, output_names

        ov = openvino()
        onnx = require("onnx", "onnx")
        proto = export_onnx(deploy_model, replace(options, precision="fp32", target=OnnxOptions()), manifest)
        out.mkdir(parents=True, exist_ok=False)
        src = out / ".deploy-form.onnx"
        try:
            onnx.save(proto, str(src))
            model = ov.Core().read_model(str(src))
        except Exception as e:
            raise ExportError(f"OpenVINO's ONNX frontend failed on the deploy form: {one_line(e)}") from e
        finally:
            src.unlink(missing_ok=True)
        for port, name in zip(model.outputs, output_names(deploy_model)):
            port.get_tensor().set_names({name})
        return model

    def _save(self, model, out: Path, manifest: dict, compress: bool) -> None:
        """Save twice: the .bin does not depend on rt_info, so the second save records the first's .bin
        size and sha256 in the .xml (what lets the runner refuse a swapped or truncated .bin)."""
        ov = openvino()
        xml = out / XML
        model.set_rt_info(json.dumps(manifest, sort_keys=True), [RT_SECTION, "manifest"])
        try:
            ov.save_model(model, str(xml), compress_to_fp16=compress)
            bin_ = out / BIN
            model.set_rt_info(str(bin_.stat().st_size), [RT_SECTION, "bin_size"])
            model.set_rt_info(sha256_file(bin_), [RT_SECTION, "bin_sha256"])
            first = bin_.read_bytes()
            ov.save_model(model, str(xml), compress_to_fp16=compress)
        except Exception as e:
            raise ExportError(f"openvino.save_model failed: {one_line(e)}") from e
        if bin_.read_bytes() != first:
            raise ExportError("openvino.save_model wrote different weights on a second save")

    def _quantize(self, model, options: ExportOptions):
        """NNCF PTQ on the fp32 IR: the calibration images in full batches, the keeps as ignored scope."""
        nn = nncf()
        if options.calibration is None or not len(options.calibration.x):
            raise UsageError("int8 needs calibration images (options.calibration)")
        b = options.batch or 1
        items = options.calibration.batches(b)
        ignored = sorted(op.get_friendly_name() for op in model.get_ordered_ops()
                         if op.get_type_name() not in ("Constant", "Parameter", "Result")
                         and in_modules(op, options.keeps))
        t = options.target
        presets = {"performance": nn.QuantizationPreset.PERFORMANCE, "mixed": nn.QuantizationPreset.MIXED}
        preset = presets[t.nncf_preset]
        model_type = nn.ModelType.TRANSFORMER if t.nncf_model_type == "transformer" else None
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        advanced = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=t.smooth_quant),
            disable_bias_correction=t.bias_correction == "none")
        record = {"preset": t.nncf_preset, "model_type": t.nncf_model_type, "smooth_quant": t.smooth_quant,
                  "bias_correction": t.bias_correction, "calibration_batches": len(items),
                  "ignored_ops": len(ignored), "ignored_modules": list(options.keeps)}
        try:
            quantized = nn.quantize(model, nn.Dataset(items), preset=preset, model_type=model_type,
                                    subset_size=len(items) * b, fast_bias_correction=t.bias_correction != "full",
                                    ignored_scope=nn.IgnoredScope(names=ignored, validate=False),
                                    advanced_parameters=advanced)
        except Exception as e:
            raise ExportError(f"NNCF quantization failed: {one_line(e)}") from e
        record["fake_quantize"] = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
        return quantized, record
