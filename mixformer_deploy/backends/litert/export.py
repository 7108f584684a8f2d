"""LiteRT exporter (formerly TensorFlow Lite): a `.tflite` flatbuffer through litert-torch, run by
ai-edge-litert's interpreter with its XNNPACK delegate (the CPU path on Android, iOS and here).

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

import numpy as np
import torch

from ...errors import ExportError, one_line
from ...manifest import EMBED_KEY
from ...optional import require
from ..exporter import ExportContext, Exporter, ExportOptions
from ..xnnpack import graph_form, kept_filter, pt2e_int8
from .spec import SCHEMA, TFLITE_ID, op_histogram, text_of, unpack

log = logging.getLogger(__name__)
# the first conv and the head stay float32 whatever the keeps: a quantized first or last op makes the
# converter give the model int8 input or output, and the contract is float32 images in, logits out
EDGE_KEEPS = ("patch_embed.stem.0", "head")


class LiteRtExporter(Exporter):
    def export(self, deploy_model, ctx: ExportContext) -> dict:
        options, manifest = ctx.options, ctx.manifest
        litert_torch = require("litert_torch", self.spec.extra)
        module = graph_form(deploy_model, options.target.graph_form)
        example = (torch.zeros(options.batch, 3, options.height, options.width),)
        facts = {"graph_form": options.target.graph_form}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            quant_config = None
            if options.precision == "int8":
                module, quant_config = self._int8(module, example, options, facts)
            try:
                data = litert_torch.convert(module, example, quant_config=quant_config).model_content()
            except Exception as e:
                raise ExportError(f"litert-torch conversion failed: {one_line(e)}") from e
        if options.precision == "fp16":
            data = _fp16_weights(bytes(data))
            facts["quantization"] = {"scheme": "float16 weights (ai-edge-quantizer float casting), float32 compute"}
        manifest.update(facts)
        ops = op_histogram(unpack(bytes(data), "converted model"))
        manifest["ops"] = ops
        ctx.tmp.write_bytes(with_metadata(bytes(data), EMBED_KEY, json.dumps(manifest, sort_keys=True).encode()))
        return {**facts, "ops": ops}

    def _int8(self, module, example, options: ExportOptions, facts: dict):
        """PT2E int8 with litert-torch's quantizer, kept modules (and the edges) left unannotated; the
        quantize ops stay unfolded for the converter, which takes the quantizer as its QuantConfig."""
        from litert_torch.quantize import pt2e_quantizer as q
        from litert_torch.quantize.quant_config import QuantConfig

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
        converted = pt2e_int8(module, example, quantizer, options.calibration, options.batch, self.spec.extra,
                              fold_quantize=False)
        facts["quantization"] = {"scheme": "litert-torch PT2EQuantizer symmetric int8, per-channel weights, "
                                           "static per-tensor activations",
                                 "float32": keeps + ["every XnnLayerNorm (normalization statistics)"]}
        return converted, QuantConfig(pt2e_quantizer=quantizer)


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


def with_metadata(data: bytes, name: str, payload: bytes) -> bytes:
    """The flatbuffer with a metadata entry ``name`` -> a buffer holding ``payload`` (replacing one of the
    same name). Models whose buffers live outside the flatbuffer (offset/size, > 2 GB) are refused."""
    flatbuffers = require("flatbuffers", "litert")
    schema = require(SCHEMA, "litert")
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
    model.metadata = [m for m in (model.metadata or []) if text_of(m.name) != name] + [entry]
    builder = flatbuffers.Builder(len(data) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_ID)
    return bytes(builder.Output())
