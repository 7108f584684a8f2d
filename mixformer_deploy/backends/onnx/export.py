"""ONNX target: TorchScript-based export of the deploy form, onnxslim simplification, embedded manifest.

Why the TorchScript exporter: on the deploy form (static shapes, rank <= 5) it yields a clean graph at
any opset >= 17 in seconds; the dynamo exporter starts at opset 18 and its down-conversion to 17 fails.
Why onnxslim: pure Python on top of onnx (no compiled wheel to miss on a new Python), and it folds the
constants the deploy form leaves (reshape targets, the precomputed relative bias) in one pass.
fp16: the deploy form in half precision with the precision keeps as float32 islands (Cast at their
edges), float32 input and output. int8: onnxruntime's static QDQ quantization of the fp32 graph
(per-channel weights), the kept modules' nodes excluded.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import torch

from ...deploy.precision import kept_by
from ...errors import ExportError, one_line
from ...manifest import EMBED_KEY
from ...optional import require
from ..exporter import ExportContext, Exporter, ExportOptions
from .spec import DEFAULT_OPSET, module_of  # noqa: F401 (DEFAULT_OPSET: TensorRT's ONNX)

log = logging.getLogger(__name__)
DEBUG_PREFIX = "debug_"


class _Exportable(torch.nn.Module):
    """The outputs (logits, or a backbone's feature maps) first, then (for the localizer) the raw
    per-stage tensors; reduced precision inside and float32 at the edges."""

    def __init__(self, deploy: torch.nn.Module, dtype: torch.dtype, debug: bool):
        super().__init__()
        self.deploy, self.dtype, self.debug = deploy, dtype, debug

    def forward(self, x):
        outs = self.deploy.stage_tensors(x.to(self.dtype))
        n = len(output_names(self.deploy))
        main = tuple(o.float() for o in outs[-n:])
        # debug tensors stay as computed (a Cast to float32 for them would be dropped with the debug outputs)
        if self.debug:
            return (*main, *outs[:-n])
        return main if n > 1 else main[0]


def output_names(deploy: torch.nn.Module) -> list[str]:
    """The artifact's outputs: ["logits"], or a backbone's ["features_0", ...] (the deploy form says)."""
    return list(getattr(deploy, "output_names", None) or ["logits"])


def _drop_dead_nodes(graph) -> None:
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))


class OnnxExporter(Exporter):
    def export(self, deploy_model, ctx: ExportContext) -> dict:
        model = export_onnx(deploy_model, ctx.options, ctx.manifest)
        if ctx.options.precision == "int8":
            log.warning("onnx int8 is smaller than fp32 but no faster on onnxruntime's CPU provider (B1 224: "
                        "about 1.0x, docs/backends/onnx.md); for CPU speed export --target openvino --precision int8")
            model = self._quantize(model, ctx.options, ctx.tmp)
        save_onnx(model, ctx.tmp, ctx.manifest)
        return {"opset": ctx.options.target.opset, "nodes": ctx.manifest["nodes"]}

    def _quantize(self, model, options: ExportOptions, out: Path):
        """Static QDQ int8 (onnxruntime.quantization): per-channel int8 weights, uint8 activations (onnxruntime's
        fast x86 kernels are u8s8: int8 activations ran B1 1.8x slower), the kept modules excluded."""
        onnx = require("onnx", "onnx")
        q = require("onnxruntime.quantization", "onnx")
        batches = options.calibration.batches(options.batch or 1)

        class Reader(q.CalibrationDataReader):
            def __init__(self):
                self.items = iter(batches)

            def get_next(self):
                item = next(self.items, None)
                return None if item is None else {"input": item}

        excluded = [n.name for n in model.graph.node if kept_by(module_of(n.name), options.keeps)]
        src, dst = out.with_name(out.name + ".fp32.onnx"), out.with_name(out.name + ".int8.onnx")
        hint = _DropHint()   # onnxruntime's pre-processing advice goes to the root logger, past --quiet
        logging.getLogger().addFilter(hint)
        try:
            onnx.save(model, str(src))
            q.quantize_static(str(src), str(dst), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              nodes_to_exclude=excluded, calibrate_method=q.CalibrationMethod.MinMax)
            quantized = onnx.load(str(dst))
        except Exception as e:
            raise ExportError(f"onnxruntime quantization failed: {one_line(e)}") from e
        finally:
            logging.getLogger().removeFilter(hint)
            src.unlink(missing_ok=True)
            dst.unlink(missing_ok=True)
        del quantized.metadata_props[:]
        return quantized


def save_onnx(model, path: Path, manifest: dict) -> None:
    """Embed the manifest, check the model (full check) and save it: the last step of every ONNX writer."""
    onnx = require("onnx", "onnx")
    embed = model.metadata_props.add()
    embed.key, embed.value = EMBED_KEY, json.dumps(manifest)
    model.producer_name, model.producer_version = "mixformer-deploy", manifest["versions"]["mixformer-deploy"]
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {one_line(e)}") from e
    onnx.save(model, str(path))


class _DropHint(logging.Filter):
    """onnxruntime's advice to run its pre-processing: the graph is already shape-inferred and simplified."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


def export_onnx(deploy_model, options: ExportOptions, manifest: dict):
    """The deploy form (with its precision keeps at fp16) -> a simplified ONNX ModelProto, its outputs only;
    the per-stage tensor names go into the manifest for localization."""
    onnx = require("onnx", "onnx")
    from ...deploy.precision import with_keeps

    opset = options.target.opset
    outputs = output_names(deploy_model)
    names = deploy_model.stage_names()[:-len(outputs)]
    debug_names = [DEBUG_PREFIX + n for n in names] if options.debug_outputs else []
    if options.precision == "fp16":
        inner, dtype = with_keeps(deploy_model, torch.float16, options.keeps), torch.float16
    else:
        inner, dtype = deploy_model, torch.float32
    module = _Exportable(inner, dtype, options.debug_outputs).eval()
    example = torch.zeros(options.batch or 2, 3, options.height, options.width)
    dynamic = {n: {0: "batch"} for n in ["input", *outputs, *debug_names]} if options.batch is None else None
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=[*outputs, *debug_names],
                              dynamic_axes=dynamic, do_constant_folding=True)
        model = onnx.load_from_string(buf.getvalue())
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {one_line(e)}") from e
    nodes_exported = len(model.graph.node)
    if options.target.simplify:
        slim = require("onnxslim", "onnx")
        try:
            model = slim.slim(model)
        except Exception as e:
            raise ExportError(f"onnxslim failed: {one_line(e)}") from e
    if options.debug_outputs:  # keep the stage tensors' names, but ship the outputs only
        kept = [o for o in model.graph.output if not o.name.startswith(DEBUG_PREFIX)]
        del model.graph.output[:]
        model.graph.output.extend(kept)
        _drop_dead_nodes(model.graph)
        manifest["stage_outputs"] = {**deploy_model.stage_layout(), "tensors": dict(zip(names, debug_names))}
    manifest.update({"opset": opset, "nodes": {"exported": nodes_exported, "shipped": len(model.graph.node)}})
    return model
