"""LiteRT target (formerly TensorFlow Lite): a `.tflite` flatbuffer through litert-torch, run by ai-edge-litert's
interpreter with its XNNPACK delegate (the CPU path on Android, iOS and here).

fp32: ``litert_torch.convert`` of the graph (the XNNPACK form of the deploy form by default: LayerNorm as
FULLY_CONNECTED GEMVs instead of MEAN/SQUARED_DIFFERENCE chains, ``--graph-form deploy`` for the deploy form
as is). int8: litert-torch's PT2E path - its PT2EQuantizer (symmetric, per-channel weights, static
per-tensor activations) observes the calibration images, then the converter writes int8 kernels with
quantize/dequantize at the edges (float32 input and logits); kept modules and normalizations are left
unannotated, so they stay float32. fp16: float32 conversion, then ai-edge-quantizer's float casting of the
FULLY_CONNECTED / CONV weights to float16 (half the size; XNNPACK computes in float32 on x86 and may use
fp16 arithmetic on ARM).

Manifest: embedded in the flatbuffer's ``metadata`` table (name ``mixformer_deploy.manifest``, a UTF-8
JSON buffer), as well as the sidecar.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..backends import require
from ..errors import ExportError, UsageError, one_line
from ..formats.litert import TFLITE_ID, embedded_manifest, read_model, unpack
from ..manifest import EMBED_KEY
from .base import INT8_PER_TENSOR, ExportOptions, Target, Tolerance
from .executorch import GRAPH_FORM, _form, _installed

log = logging.getLogger(__name__)
EDGE_KEEPS = ("patch_embed.stem.0", "head")


class LiteRtTarget(Target):
    key = "litert"
    suffix = ".tflite"
    extra = "litert"
    runtime = "litert"
    precisions = ("fp32", "fp16", "int8")
    calibrated = ("int8",)
    tolerances = {"fp32": Tolerance(1e-4, 1e-4, 0.99999), "fp16": Tolerance(2e-2, 2e-2, 0.999),
                  "int8": INT8_PER_TENSOR}
    options = (GRAPH_FORM,)
    versions = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")
    description = "LiteRT (TensorFlow Lite) .tflite with the XNNPACK delegate (Android, iOS, embedded CPUs)"

    def check(self, options: ExportOptions) -> None:
        super().check(options)
        if options.batch is None:
            raise UsageError("litert exports a fixed batch here: use --batch N")
        _installed("litert_torch", self.extra)

    def export(self, deploy_model, options: ExportOptions, out: Path, manifest: dict) -> dict:
        self.check(options)
        litert_torch = require("litert_torch", self.extra)
        form = options.opt("graph_form") or GRAPH_FORM.default
        module = _form(deploy_model, form)
        example = (torch.zeros(options.batch, 3, options.height, options.width),)
        facts = {"graph_form": form}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if options.precision == "int8":
                module, quant_config = self._pt2e(module, example, options, facts)
            else:
                quant_config = None
            try:
                data = litert_torch.convert(module, example, quant_config=quant_config).model_content()
            except Exception as e:
                raise ExportError(f"litert-torch conversion failed: {one_line(e)}") from e
        if options.precision == "fp16":
            data = self._fp16_weights(bytes(data))
            facts["quantization"] = {"scheme": "float16 weights (ai-edge-quantizer float casting), float32 compute"}
        manifest.update(facts)
        ops = op_histogram(unpack(bytes(data), "converted model"))
        manifest["ops"] = ops
        Path(out).write_bytes(with_metadata(bytes(data), EMBED_KEY, json.dumps(manifest, sort_keys=True).encode()))
        return {**facts, "ops": ops}

    def _pt2e(self, module, example, options: ExportOptions, facts: dict):
        from litert_torch.quantize import pt2e_quantizer as q
        from litert_torch.quantize.quant_config import QuantConfig
        pt2e = require("torchao.quantization.pt2e.quantize_pt2e", self.extra)
        from ..deploy.xnnpack import kept_filter

        if options.calibration is None:
            raise UsageError("litert int8 needs calibration images")
        # the first conv and the head stay float32 whatever the keeps: a quantized first or last op makes the
        # converter give the model int8 input or output, and the contract is float32 images in, logits out
        keeps = sorted(set(options.keeps) | set(EDGE_KEEPS))
        keep = kept_filter(keeps)

        class KeepingQuantizer(q.PT2EQuantizer):
            """PT2EQuantizer whose annotations skip kept modules (its set_module_name cannot take None)."""

            def annotate(self, model):
                model = self._annotate_for_static_quantization_config(model)
                for node in model.graph.nodes:
                    if not keep(node):
                        node.meta.pop("quantization_annotation", None)
                q.propagate_annotation(model)
                return model

        quantizer = KeepingQuantizer().set_global(q.get_symmetric_quantization_config(is_per_channel=True))
        x = torch.from_numpy(options.calibration.x).float()
        b = options.batch
        try:
            captured = torch.export.export(module, example, strict=False).module()
            prepared = pt2e.prepare_pt2e(captured, quantizer)
            for i in range(0, len(x) - len(x) % b or len(x), b):
                prepared(x[i:i + b])
            converted = pt2e.convert_pt2e(prepared, fold_quantize=False)
        except Exception as e:
            raise ExportError(f"litert-torch PT2E quantization failed: {one_line(e)}") from e
        facts["quantization"] = {"scheme": "litert-torch PT2EQuantizer symmetric int8, per-channel weights, "
                                           "static per-tensor activations",
                                 "float32": keeps + ["every XnnLayerNorm (normalization statistics)"]}
        return converted, QuantConfig(pt2e_quantizer=quantizer)

    @staticmethod
    def _fp16_weights(data: bytes) -> bytes:
        aeq = require("ai_edge_quantizer", "litert")
        recipe = [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
                   "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                                 "compute_precision": "FLOAT", "explicit_dequantize": True}}]
        try:
            qt = aeq.Quantizer(data, recipe)
            return bytes(qt.quantize().quantized_model)
        except Exception as e:
            raise ExportError(f"ai-edge-quantizer float16 casting failed: {one_line(e)}") from e

    # ------------------------------------------------------------------ reading artifacts

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def inspect(self, path: Path) -> dict:
        schema = require("ai_edge_litert.schema_py_generated", self.extra)
        model = read_model(path)
        g = model.subgraphs[0]
        types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

        def desc(idx):
            t = g.tensors[idx]
            return {"name": _s(t.name), "dtype": types.get(t.type, str(t.type)).lower(),
                    "shape": [int(d) for d in t.shape] if t.shape is not None else None}

        ops = op_histogram(model)
        tensor_types = Counter(types.get(t.type, str(t.type)).lower() for t in g.tensors)
        ranks = [len(t.shape) for t in g.tensors if t.shape is not None]
        # the precision each compute op runs in: the type of its first input
        per_precision: Counter = Counter()
        for op in g.operators:
            name = _op_name(model, op, schema)
            if name in ("RESHAPE", "TRANSPOSE", "QUANTIZE", "DEQUANTIZE", "CONCATENATION", "SLICE", "PAD"):
                continue
            first = next((i for i in op.inputs if i >= 0), None)
            per_precision[types.get(g.tensors[first].type, "?").lower() if first is not None else "?"] += 1
        manifest = self.read_embedded(path) or {}
        return {"format": "tflite", "version": model.version, "inputs": [desc(i) for i in g.inputs],
                "outputs": [desc(i) for i in g.outputs], "ops": ops, "nodes": len(g.operators),
                "tensor_types": dict(sorted(tensor_types.items())), "max_rank": max(ranks) if ranks else None,
                "precisions": dict(per_precision), "graph_form": manifest.get("graph_form"),
                "kept_fp32": (manifest.get("quantization") or {}).get("float32", []),
                "signatures": [_s(s.signatureKey) for s in model.signatureDefs or []]}


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _op_name(model, op, schema) -> str:
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    return _s(code.customCode) if builtin == schema.BuiltinOperator.CUSTOM else names.get(builtin, str(builtin))


def op_histogram(model) -> dict:
    schema = require("ai_edge_litert.schema_py_generated", "litert")
    ops = Counter(_op_name(model, op, schema) for g in model.subgraphs for op in g.operators)
    return dict(sorted(ops.items()))


def with_metadata(data: bytes, name: str, payload: bytes) -> bytes:
    """The flatbuffer with a metadata entry ``name`` -> a buffer holding ``payload`` (replacing one of the
    same name). Models whose buffers live outside the flatbuffer (offset/size, > 2 GB) are refused."""
    flatbuffers = require("flatbuffers", "litert")
    schema = require("ai_edge_litert.schema_py_generated", "litert")
    model = unpack(data, "converted model")
    for b in model.buffers or []:  # weights stored after the flatbuffer (offset/size): bring them inline
        if (getattr(b, "offset", 0) or 0) > 1:
            if b.offset + b.size > len(data) or b.size > 2**31 - 2**24:
                raise ExportError("the converted model's weights do not fit one flatbuffer; cannot embed the manifest")
            b.data, b.offset, b.size = np.frombuffer(data, np.uint8, count=b.size, offset=b.offset), 0, 0
    buf = schema.BufferT()
    buf.data = np.frombuffer(payload, dtype=np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = name, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if _s(m.name) != name] + [entry]
    builder = flatbuffers.Builder(len(data) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_ID)
    return bytes(builder.Output())
