"""LiteRT exporter (formerly TensorFlow Lite): a `.tflite` flatbuffer through litert-torch, run by
ai-edge-litert's interpreter with its XNNPACK delegate (the CPU path on Android, iOS and here).

fp32: ``litert_torch.convert`` of the graph (the XNNPACK form of the deploy form by default: LayerNorm as
FULLY_CONNECTED GEMVs instead of MEAN/SQUARED_DIFFERENCE chains, ``--graph-form deploy`` for the deploy form
as is). int8: litert-torch's PT2E path - its PT2EQuantizer (symmetric, per-channel weights, static
per-tensor activations) observes the calibration images, then the converter writes int8 kernels with
quantize/dequantize at the edges (float32 input and logits); kept modules and normalizations are left
unannotated, so they stay float32. fp16: float32 conversion, then ai-edge-quantizer's float casting of the
FULLY_CONNECTED / CONV weights to float16 (half the size; XNNPACK computes in float32 on x86 and may use
fp16 arithmetic on ARM), the ops of kept modules excluded (their weights stay float32).

Manifest: embedded in the flatbuffer's ``metadata`` table (name ``mixformer_deploy.manifest``, a UTF-8
JSON buffer), as well as the sidecar.
"""

from __future__ import annotations

import json
import logging
import re
import warnings

import numpy as np
import torch

from ...deploy.precision import kept_by
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
            scopes = kept_scopes(bytes(data), options.keeps, module)
            data = _fp16_weights(bytes(data), scopes)
            facts["quantization"] = {"scheme": "float16 weights (ai-edge-quantizer float casting), float32 compute",
                                     "float32": sorted(options.keeps), "float32_ops": len(scopes)}
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


def _fp16_weights(data: bytes, kept: list[str]) -> bytes:
    """Every weight cast to float16 but those of the ops whose scopes are ``kept`` (a later recipe entry
    overrides an earlier one for the ops it matches)."""
    aeq = require("ai_edge_quantizer", "litert")
    recipe = [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
               "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                             "compute_precision": "FLOAT", "explicit_dequantize": True}}]
    recipe += [{"regex": f"^{re.escape(scope)}$", "operation": "*", "algorithm_key": "no_quantize"} for scope in kept]
    try:
        qt = aeq.Quantizer(data, recipe)
        return bytes(qt.quantize().quantized_model)
    except Exception as e:
        raise ExportError(f"ai-edge-quantizer float16 casting failed: {one_line(e)}") from e


def kept_scopes(data: bytes, keeps: list[str], module: torch.nn.Module) -> list[str]:
    """ai-edge-quantizer's scopes (output tensor names, each followed by ';') of the ops inside kept modules.
    litert-torch names a tensor after the modules it was computed in, '<class>_<local name>' per module
    called; a graph output is renamed, so an op is also placed by its weights' names (a LayerNorm's 1/C
    constants have none: by its output). A constant buffer shared with a kept op stays float32 for all its
    users (ai-edge-quantizer fails to cast it for some only)."""
    if not keeps:
        return []
    names = _called_names(module)
    model = unpack(data, "converted model")
    g = model.subgraphs[0]
    kept = set()
    for k, op in enumerate(g.operators):
        tensors = [text_of(g.tensors[i].name) for i in [*op.outputs, *op.inputs[1:]] if i >= 0]
        owner = next((names[p] for p in map(_stack_path, tensors) if p in names), None)
        if owner and kept_by(owner, keeps):
            kept.add(k)
    buffer_of = {i: t.buffer for i, t in enumerate(g.tensors) if t.buffer and _has_data(model.buffers[t.buffer])}
    constants = [{buffer_of[i] for i in op.inputs[1:] if i in buffer_of} for op in g.operators]
    while True:   # to a fixed point: a user of a shared constant may share another one
        shared = set().union(*(constants[k] for k in kept))
        more = {k for k, c in enumerate(constants) if c & shared} - kept
        if not more:
            break
        kept |= more
    return [";".join(text_of(g.tensors[i].name) for i in g.operators[k].outputs if i >= 0) + ";"
            for k in sorted(kept) if len(g.operators[k].outputs)]


def _has_data(buffer) -> bool:
    return buffer.data is not None and len(buffer.data) > 0 or (getattr(buffer, "offset", 0) or 0) > 1


def _stack_path(tensor_name: str) -> str:
    """'pkg.Root/torch.nn.modules.container.Sequential_0/pkg.XnnBlock_1/torch.nn.modules.linear.Linear_proj;2'
    -> 'Sequential_0/XnnBlock_1/Linear_proj' (class and local name of each module called below the root)."""
    return "/".join(seg.rsplit(".", 1)[-1] for seg in tensor_name.split(";")[0].split("/")[1:])


def _called_names(module: torch.nn.Module) -> dict[str, str]:
    """Module paths as litert-torch's tensor names spell them ('Sequential_0/XnnBlock_1/Linear_proj') -> the
    module's name ('stages.0.1.proj'); ModuleLists and ModuleDicts are never called, so they are not in them."""
    out: dict[str, str] = {}
    for name, _ in module.named_modules():
        parts = name.split(".") if name else []
        segments = []
        for i, part in enumerate(parts):
            m = module.get_submodule(".".join(parts[:i + 1]))
            if not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                segments.append(f"{type(m).__name__}_{part}")
        if segments:
            out.setdefault("/".join(segments), name)
    return out


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
