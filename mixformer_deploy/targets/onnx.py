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
from collections import Counter
from pathlib import Path

import torch

from ..backends import require
from ..errors import ExportError, UsageError, one_line
from ..formats.onnx import embedded_manifest, external_files, load_onnx
from ..manifest import EMBED_KEY
from .base import INT8_PER_TENSOR, ExportOptions, Target, TargetOption, Tolerance

log = logging.getLogger(__name__)
DEFAULT_OPSET = 17
DEBUG_PREFIX = "debug_"
SHAPE_OPS = {"Constant", "Shape", "Reshape", "Cast", "Identity", "Transpose", "Split", "Concat", "Slice",
             "Squeeze", "Unsqueeze", "Pad", "Flatten", "QuantizeLinear", "DequantizeLinear"}


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


def module_of(node_name: str) -> str:
    """The deploy-form module an exported node came from: '/stages.0/stages.0.0/norm1/...' -> the last
    dotted scope ('stages.0.0.norm1' style names are rebuilt from the scope path)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    scope = ""
    for p in parts:
        scope = p if scope and p.startswith(scope + ".") else (f"{scope}.{p}" if scope else p)
    return scope.replace(".module", "")


class OnnxTarget(Target):
    key = "onnx"
    suffix = ".onnx"
    extra = "onnx"
    runtime = "onnxruntime"
    precisions = ("fp32", "fp16", "int8")
    calibrated = ("int8",)
    tolerances = {"fp32": Tolerance(1e-4, 1e-4, 0.99999), "fp16": Tolerance(2e-2, 2e-2, 0.999),
                  "int8": INT8_PER_TENSOR}   # per-tensor activation scales (MinMax): the accuracy gate judges
    options = (
        TargetOption("opset", "ONNX opset (default 17; LayerNormalization needs >= 17).", int, DEFAULT_OPSET),
        TargetOption("simplify", "Simplify the graph with onnxslim (default true).", bool, True),
    )
    versions = ("onnx", "onnxruntime", "onnxslim")
    description = "ONNX (onnxruntime, and the input of TensorRT, OpenVINO and others)"

    def check(self, options: ExportOptions) -> None:
        super().check(options)
        opset = options.opt("opset")
        if opset is not None and opset < 17:
            raise UsageError(f"opset {opset} is too old: LayerNormalization needs opset >= 17")

    def export(self, deploy_model, options: ExportOptions, out: Path, manifest: dict) -> dict:
        onnx = require("onnx", self.extra)
        self.check(options)
        model = export_onnx(deploy_model, options, manifest)
        if options.precision == "int8":
            model = self._quantize(model, options, out)
        embed = model.metadata_props.add()
        embed.key, embed.value = EMBED_KEY, json.dumps(manifest)
        model.producer_name, model.producer_version = "mixformer-deploy", manifest["versions"]["mixformer-deploy"]
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejected the exported model: {one_line(e)}") from e
        onnx.save(model, str(out))
        return {"opset": options.opt("opset") or DEFAULT_OPSET, "nodes": manifest["nodes"]}

    def _quantize(self, model, options: ExportOptions, out: Path):
        """Static QDQ int8 (onnxruntime.quantization): per-channel weights, the kept modules excluded."""
        onnx = require("onnx", self.extra)
        q = require("onnxruntime.quantization", self.extra)
        x = options.calibration.x
        batch = options.batch or 1

        class Reader(q.CalibrationDataReader):
            def __init__(self):
                self.items = iter(x[i:i + batch] for i in range(0, len(x) - len(x) % batch, batch))

            def get_next(self):
                item = next(self.items, None)
                return None if item is None else {"input": item}

        keeps = set(options.keeps)
        excluded = [n.name for n in model.graph.node
                    if any(module_of(n.name) == k or module_of(n.name).startswith(k + ".") for k in keeps)]
        src, dst = out.with_name(out.name + ".fp32.onnx"), out.with_name(out.name + ".int8.onnx")
        hint = _DropHint()   # onnxruntime's pre-processing advice goes to the root logger, past --quiet
        logging.getLogger().addFilter(hint)
        try:
            onnx.save(model, str(src))
            q.quantize_static(str(src), str(dst), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
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

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def files(self, path: Path) -> list[Path]:
        path = Path(path)
        return [path, *external_files(load_onnx(path, load_weights=False), path.parent)] if path.is_file() else []

    def inspect(self, path: Path) -> dict:
        onnx = require("onnx", self.extra)
        model = load_onnx(path, load_weights=False)
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:
            inferred = model
        g = inferred.graph
        types = {v.name: v.type.tensor_type for v in [*g.value_info, *g.input, *g.output, ]}
        types.update({t.name: t for t in g.initializer})
        name_of = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
                   onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT64: "int64",
                   onnx.TensorProto.DOUBLE: "fp64"}

        def dtype(name):
            t = types.get(name)
            code = getattr(t, "elem_type", None) or getattr(t, "data_type", None)
            return name_of.get(code, str(code)) if code else None

        def io_desc(values):
            return [{"name": v.name, "dtype": dtype(v.name),
                     "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

        ranks = [len(v.type.tensor_type.shape.dim) for v in [*g.value_info, *g.input, *g.output]
                 if v.type.tensor_type.HasField("shape")]
        per_precision: Counter = Counter()
        compute_fp32: Counter = Counter()
        for node in model.graph.node:
            if node.op_type in SHAPE_OPS or not node.output:
                continue
            # the precision an op computes in: its float input's type (a QDQ op's input is dequantized)
            ins = [dtype(i) for i in node.input if i and dtype(i) in ("fp32", "fp16", "bf16")]
            p = "int8" if any(_from_dq(model, i) for i in node.input) else (ins[0] if ins else dtype(node.output[0]))
            per_precision[p or "unknown"] += 1
            if p == "fp32":
                compute_fp32[module_of(node.name)] += 1
        manifest = embedded_manifest(path)
        reduced = manifest and manifest.get("precision") not in (None, "fp32")
        return {
            "format": "onnx", "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                                          default=None),
            "inputs": io_desc(g.input), "outputs": io_desc(g.output),
            "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
            "nodes": len(model.graph.node), "max_rank": max(ranks) if ranks else None,
            "precisions": dict(per_precision),   # compute ops, by the float type they read (the graph's own)
            "data_movement_ops": len(model.graph.node) - sum(per_precision.values()),  # Reshape, Cast, Q/DQ, ...
            "kept_fp32": sorted(m for m in compute_fp32 if m) if reduced else [],
        }


class _DropHint(logging.Filter):
    """onnxruntime's advice to run its pre-processing: the graph is already shape-inferred and simplified."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


def _from_dq(model, tensor: str) -> bool:
    for n in model.graph.node:
        if tensor in n.output:
            return n.op_type == "DequantizeLinear"
    return False


def export_onnx(deploy_model, options: ExportOptions, manifest: dict):
    """The deploy form (with its precision keeps at fp16) -> a simplified ONNX ModelProto, its outputs only;
    the per-stage tensor names go into the manifest for localization."""
    onnx = require("onnx", "onnx")
    from ..deploy.precision import with_keeps

    opset = options.opt("opset") or DEFAULT_OPSET
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
    if options.opt("simplify") is not False:
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
