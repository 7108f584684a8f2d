"""Reading LiteRT (``.tflite``) flatbuffers with ai-edge-litert's generated schema, and our manifest in the
flatbuffer's ``metadata`` table. Used by the litert exporter and its runner; the schema is imported only
once the bytes carry the TFL3 identifier."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...errors import ArtifactError, MissingBackendError, UsageError, one_line
from ...manifest import EMBED_KEY, parse_embedded
from ...optional import require
from ..executorch.spec import graph_form_option  # the same XNNPACK graph forms
from ..spec import FP16, FP32, INT8_PER_TENSOR, BackendSpec, Options, block_option

TFLITE_ID = b"TFL3"
SCHEMA = "ai_edge_litert.schema_py_generated"
# data movement: not counted in the ops per precision
LAYOUT_OPS = ("RESHAPE", "TRANSPOSE", "QUANTIZE", "DEQUANTIZE", "CONCATENATION", "SLICE", "PAD")


def unpack(data: bytes, name: str):
    """The flatbuffer as the schema's object tree (``ModelT``); ArtifactError when it is not one."""
    if len(data) < 8 or data[4:8] != TFLITE_ID:
        raise ArtifactError(f"{name}: not a LiteRT/TFLite flatbuffer (no TFL3 identifier)")
    schema = require(SCHEMA, "litert")
    try:
        return schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    except Exception as e:
        raise ArtifactError(f"{name}: corrupt LiteRT flatbuffer ({one_line(e, 200)})") from e


def read_model(path: Path):
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    return unpack(path.read_bytes(), path.name)


def model_manifest(model, name: str) -> dict | None:
    """The manifest in an unpacked model's metadata table (None when it has none)."""
    for m in model.metadata or []:
        if text_of(m.name) != EMBED_KEY:
            continue
        try:
            text = bytes(model.buffers[m.buffer].data)
        except Exception as e:
            raise ArtifactError(f"{name}: unreadable embedded manifest ({one_line(e, 200)})") from e
        return parse_embedded(text, name)
    return None


def embedded_manifest(path: Path) -> dict | None:
    return model_manifest(read_model(path), Path(path).name)


def text_of(v) -> str:
    """A flatbuffer string field (bytes) as str."""
    return v.decode() if isinstance(v, bytes) else str(v)


def op_name(model, op, schema) -> str:
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    return text_of(code.customCode) if builtin == schema.BuiltinOperator.CUSTOM else names.get(builtin, str(builtin))


def op_histogram(model) -> dict:
    schema = require(SCHEMA, "litert")
    ops = Counter(op_name(model, op, schema) for g in model.subgraphs for op in g.operators)
    return dict(sorted(ops.items()))


def ops_per_precision(model, schema) -> dict:
    """Compute ops by the precision they read: int8 (quantized input), fp16 (float16 weights, stored as such
    or dequantized from float16 just before), else their first input's type."""
    g = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    short = {"FLOAT32": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16", "FLOAT64": "fp64"}
    fp16 = {i for i, t in enumerate(g.tensors) if t.type == schema.TensorType.FLOAT16}
    fp16 |= {op.outputs[0] for op in g.operators
             if op_name(model, op, schema) == "DEQUANTIZE" and op.inputs[0] in fp16 and len(op.outputs)}
    out: Counter = Counter()
    for op in g.operators:
        if op_name(model, op, schema) in LAYOUT_OPS:
            continue
        ins = [i for i in op.inputs if i >= 0]
        first = names.get(g.tensors[ins[0]].type, "?") if ins else "?"
        out["fp16" if fp16 & set(ins) else short.get(first, first.lower())] += 1
    return dict(out)


@dataclass(frozen=True)
class LiteRtOptions(Options):
    graph_form: str = graph_form_option()
    block: str = block_option()


class LiteRtSpec(BackendSpec):
    key = "litert"
    suffix = ".tflite"
    extra = "litert"
    runtime = "litert"
    runners = {"litert": "LiteRtRunner"}
    exporter_name = "LiteRtExporter"
    precisions = ("fp32", "fp16", "int8")
    calibrated = ("int8",)
    tolerances = {"fp32": FP32, "fp16": FP16, "int8": INT8_PER_TENSOR}
    Options = LiteRtOptions
    versions = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")
    description = "LiteRT (TensorFlow Lite) .tflite with the XNNPACK delegate (Android, iOS, embedded CPUs)"
    title = "LiteRT"
    runs_here = "litert (XNNPACK)"
    verified = "Linux x86 CPU"
    export_cost = "costly"
    capabilities = frozenset({"int8", "reproducible", "backbone", "inspect", "embedded_manifest", "fp16",
                              "phone_bench"})
    phone_bench = "benchmark_model"   # the on-device benchmark binary (phone.py drives it)

    def check(self, options) -> None:
        super().check(options)
        if options.batch is None:
            raise UsageError("litert exports a fixed batch here: use --batch N")
        status = self.status()
        if not status["installed"]:
            raise MissingBackendError(f"{status['package']} is {status['note']}")

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def inspect(self, path: Path) -> dict:
        schema = require(SCHEMA, self.extra)
        model = read_model(path)
        g = model.subgraphs[0]
        types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

        def desc(idx):
            t = g.tensors[idx]
            return {"name": text_of(t.name), "dtype": types.get(t.type, str(t.type)).lower(),
                    "shape": [int(d) for d in t.shape] if t.shape is not None else None}

        tensor_types = Counter(types.get(t.type, str(t.type)).lower() for t in g.tensors)
        ranks = [len(t.shape) for t in g.tensors if t.shape is not None]
        manifest = model_manifest(model, Path(path).name) or {}
        return {"format": "tflite", "version": model.version, "inputs": [desc(i) for i in g.inputs],
                "outputs": [desc(i) for i in g.outputs], "ops": op_histogram(model), "nodes": len(g.operators),
                "tensor_types": dict(sorted(tensor_types.items())), "max_rank": max(ranks) if ranks else None,
                "precisions": ops_per_precision(model, schema), "graph_form": manifest.get("graph_form"),
                "kept_fp32": (manifest.get("quantization") or {}).get("float32", []),
                "signatures": [text_of(s.signatureKey) for s in model.signatureDefs or []]}


SPEC = LiteRtSpec()
