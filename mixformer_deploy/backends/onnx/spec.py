"""Reading ONNX files safely: one-line errors for missing, non-ONNX, truncated files, and external data
that would be read from outside the model's folder."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...optional import require
from ...errors import ArtifactError, UsageError
from ...manifest import EMBED_KEY, parse_embedded
from ..spec import FP16, FP32, INT8_PER_TENSOR, BackendSpec, Options, block_option, option


def external_files(model, folder: Path) -> list[Path]:
    """The external-data files an ONNX model refers to; ArtifactError for any outside ``folder``."""
    onnx = require("onnx", "onnx")
    root = folder.resolve()
    out: list[Path] = []
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        p = (folder / location).resolve()
        if not location or Path(location).is_absolute() or root not in p.parents:
            raise ArtifactError(f"{t.name}: external data {location!r} lies outside the model's folder")
        if p not in out:
            out.append(p)
    return out


def _check_declared_sizes(model, name: str) -> None:
    """A tensor whose shape declares more elements than its bytes hold is corrupt (or hostile: a runtime
    would try to allocate what it declares)."""
    onnx = require("onnx", "onnx")
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data"):
            continue
        count = 1
        for d in t.dims:
            count *= int(d)
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:
            continue
        if count * itemsize != len(t.raw_data):
            raise ArtifactError(f"{name}: tensor {t.name!r} declares {count} elements but holds "
                                f"{len(t.raw_data)} bytes (corrupt)")


def load_onnx(path: str | Path, load_weights: bool = True):
    """onnx.load with one-line errors for files that are missing, not ONNX, truncated or unsafe."""
    onnx = require("onnx", "onnx")
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ArtifactError(f"{path.name}: not a readable ONNX model ({type(e).__name__})") from e
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise ArtifactError(f"{path.name}: not a usable ONNX model (empty graph, inputs or outputs)")
    _check_declared_sizes(model, path.name)
    files = external_files(model, path.parent)
    if load_weights and files:
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ArtifactError(f"{path.name}: external data missing: {', '.join(missing)}")
        try:
            from onnx.external_data_helper import load_external_data_for_model
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise ArtifactError(f"{path.name}: unreadable external data ({type(e).__name__})") from e
    return model


def embedded_manifest(path: str | Path) -> dict | None:
    model = load_onnx(path, load_weights=False)
    for prop in model.metadata_props:
        if prop.key == EMBED_KEY:
            return parse_embedded(prop.value, Path(path).name)
    return None


def module_of(node_name: str) -> str:
    """The deploy-form module an exported node came from: '/stages.0/stages.0.0/norm1/...' -> the last
    dotted scope ('stages.0.0.norm1' style names are rebuilt from the scope path). A name that is not UTF-8
    (a damaged file: protobuf hands it over as bytes) is read with replacement characters."""
    if isinstance(node_name, bytes):
        node_name = node_name.decode("utf-8", "replace")
    parts = [p for p in node_name.split("/") if p][:-1]
    scope = ""
    for p in parts:
        scope = p if scope and p.startswith(scope + ".") else (f"{scope}.{p}" if scope else p)
    return scope.replace(".module", "")


def _from_dq(model, tensor: str) -> bool:
    for n in model.graph.node:
        if tensor in n.output:
            return n.op_type == "DequantizeLinear"
    return False


SHAPE_OPS = {"Constant", "Shape", "Reshape", "Cast", "Identity", "Transpose", "Split", "Concat", "Slice",
             "Squeeze", "Unsqueeze", "Pad", "Flatten", "QuantizeLinear", "DequantizeLinear"}
DEFAULT_OPSET = 20   # GELU as one Gelu op (17-19 spell it as five); --opset 17 for runtimes without opset 20


@dataclass(frozen=True)
class OnnxOptions(Options):
    opset: int = option(DEFAULT_OPSET, "ONNX opset (default 20: GELU as one op; 17 for runtimes without opset 20, "
                                        "the oldest with LayerNormalization).")
    simplify: bool = option(True, "Simplify the graph with onnxslim (default true).")
    block: str = block_option()


class OnnxSpec(BackendSpec):
    key = "onnx"
    suffix = ".onnx"
    extra = "onnx"
    runtime = "onnxruntime"
    runners = {"onnxruntime": "OnnxRuntimeRunner"}
    exporter_name = "OnnxExporter"
    precisions = ("fp32", "fp16", "int8")
    calibrated = ("int8",)
    tolerances = {"fp32": FP32, "fp16": FP16,
                  "int8": INT8_PER_TENSOR}   # per-tensor activation scales (MinMax): the accuracy gate judges
    Options = OnnxOptions
    versions = ("onnx", "onnxruntime", "onnxslim")
    description = "ONNX (onnxruntime, and the input of TensorRT, OpenVINO and others)"
    title = "ONNX"
    runs_here = "onnxruntime"
    verified = "Linux x86 CPU"
    capabilities = frozenset({"int8", "reproducible", "backbone", "inspect", "embedded_manifest", "fp16"})

    def check(self, options) -> None:
        super().check(options)
        if options.target.opset < 17:
            raise UsageError(f"opset {options.target.opset} is too old: LayerNormalization needs opset >= 17")

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


SPEC = OnnxSpec()
