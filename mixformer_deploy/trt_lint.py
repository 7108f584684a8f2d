"""trt-lint: check an ONNX file against what TensorRT's ONNX parser supports, without TensorRT.

Why: TensorRT is not installable everywhere (its libraries come from NVIDIA's index, and it needs a GPU),
but the ONNX it will compile can be checked anywhere. The rules come from NVIDIA's published operator
support matrix (onnx-tensorrt ``docs/operators.md``), kept as data in ``resources/trt_onnx_support.json``
with its source and version, plus TensorRT's explicit-quantization placement rules:

- operators: unsupported or unknown to the matrix, custom-domain ops (they would need a plugin);
- attributes and inputs the matrix restricts (Resize modes, pooling dilations, TopK ``sorted``,
  constant ``axes``, extra LayerNormalization outputs, ...);
- data types: DOUBLE (cast down), UINT8 inside the network, types TensorRT has no kernel for;
- opset range; dynamic dimensions other than the batch;
- Q/DQ: zero points must be zero, scales constant and positive, activations per-tensor, a Q feeds only
  DQs, a DQ reads a Q or constant weights, and no DQ feeds a normalization (its mean and variance would
  be computed from int8-rounded values: the normalization is one of the float32 keeps).

``findings`` make the lint fail (exit 1); ``notes`` are facts worth knowing that TensorRT handles
(int64 activations, a dynamic batch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .backends import require
from .errors import UsageError

VERSIONS = ("10", "11")
DEFAULT_VERSION = "11"
STANDARD_DOMAINS = ("", "ai.onnx")
NORMALIZATIONS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization")
# ONNX TensorProto data type -> the matrix's spelling
_DTYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
                9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64",
                15: "COMPLEX128", 16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 21: "UINT4",
                22: "INT4", 23: "FP4"}
_SUPPORTED_DTYPES = {"FP32", "FP16", "BF16", "FP8", "FP4", "INT32", "INT64", "INT8", "INT4", "UINT8", "BOOL"}


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str      # node name ('#12' for an unnamed node; a tensor name for graph-level findings)
    op: str        # op type ('' for graph-level findings)
    message: str

    def line(self) -> str:
        where = f"{self.node} ({self.op})" if self.op else self.node
        return f"{self.rule}: {where}: {self.message}"


@dataclass
class LintReport:
    path: str | None
    trt_version: str
    matrix: str
    opset: int | None
    nodes: int
    findings: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"path": self.path, "trt_version": self.trt_version, "matrix": self.matrix, "opset": self.opset,
                "nodes": self.nodes, "clean": self.clean, "findings": [asdict(f) for f in self.findings],
                "notes": [asdict(f) for f in self.notes]}

    def summary(self) -> dict:
        """What goes into a manifest."""
        return {"trt_version": self.trt_version, "clean": self.clean, "findings": len(self.findings),
                "notes": [n.line() for n in self.notes][:10]}


@lru_cache(maxsize=1)
def support_data() -> dict:
    """The operator support matrix shipped with the package (see its ``source`` field)."""
    text = resources.files("mixformer_deploy").joinpath("resources", "trt_onnx_support.json").read_text()
    return json.loads(text)


def operators_for(version: str) -> dict:
    data = support_data()
    ops = dict(data["operators"])
    v = data["versions"][version]
    ops.update(v.get("added_operators") or {})
    for name in v.get("removed_operators") or []:
        ops[name] = {"supported": False}
    return ops


def lint(model, trt_version: str = DEFAULT_VERSION, path: str | Path | None = None) -> LintReport:
    """Lint an ONNX ModelProto (or a path) for TensorRT ``trt_version`` ('10' or '11')."""
    onnx = require("onnx", "onnx")
    trt_version = str(trt_version)
    if trt_version not in VERSIONS:
        raise UsageError(f"bad --trt-version {trt_version!r}: choose one of {', '.join(VERSIONS)}")
    if not hasattr(model, "graph"):
        from .formats.onnx import load_onnx
        path = path or model
        model = load_onnx(model, load_weights=False)
    data = support_data()
    version = data["versions"][trt_version]
    ops = operators_for(trt_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
    report = LintReport(str(path) if path else None, trt_version, version["label"], opset, len(model.graph.node))
    add = report.findings.append
    note = report.notes.append

    # ---- graph-level facts
    if opset is not None and not version["opset_min"] <= opset <= version["opset_max"]:
        add(Finding("opset", "model", "", f"opset {opset} is outside TensorRT {trt_version}'s "
                                         f"{version['opset_min']}..{version['opset_max']}"))
    consts = {t.name for t in model.graph.initializer}
    init = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in STANDARD_DOMAINS:
            consts.update(n.output)
    elem: dict[str, int] = {}
    for v in [*g.value_info, *g.input, *g.output]:
        if v.type.HasField("tensor_type"):
            elem[v.name] = v.type.tensor_type.elem_type
    for t in model.graph.initializer:
        elem[t.name] = t.data_type
    io_names = {v.name for v in [*model.graph.input, *model.graph.output]}
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            if d.dim_value <= 0:
                if axis == 0:
                    note(Finding("dynamic-batch", v.name, "", f"dynamic batch ({d.dim_param or '?'}): the "
                                                               "engine needs an optimization profile"))
                else:
                    add(Finding("dynamic-dim", v.name, "", f"axis {axis} is dynamic ({d.dim_param or '?'}): "
                                                          "only the batch axis should be; fix the other sizes"))
    for name, code in sorted(elem.items()):
        dt = _DTYPE_NAMES.get(code, str(code))
        if dt == "DOUBLE":
            add(Finding("dtype", name, "", "DOUBLE tensor: TensorRT casts it to FLOAT, clamped to +-FLT_MAX"))
        elif dt == "UINT8" and name not in io_names:
            add(Finding("dtype", name, "", "UINT8 is supported only as a network input or output"))
        elif code and dt not in _SUPPORTED_DTYPES and dt != "DOUBLE":
            add(Finding("dtype", name, "", f"data type {dt} has no TensorRT equivalent"))

    # ---- per node
    producer = {o: n for n in model.graph.node for o in n.output if o}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    int64_acts = 0
    custom = set(version.get("custom_operators") or [])
    for idx, n in enumerate(model.graph.node):
        name = n.name or f"#{idx}"
        op = n.op_type
        if n.domain not in STANDARD_DOMAINS:
            if op in custom:
                note(Finding("trt-custom-op", name, op, f"TensorRT {trt_version} parses {op} natively"))
            else:
                add(Finding("custom-domain", name, op, f"op of domain {n.domain!r}: TensorRT's parser has no "
                                                      "such operator; it needs a TensorRT plugin"))
            continue
        spec = ops.get(op)
        if spec is None:
            add(Finding("unsupported-op", name, op, f"{op} is not in TensorRT {trt_version}'s ONNX operator matrix"))
            continue
        if not spec.get("supported"):
            add(Finding("unsupported-op", name, op, f"TensorRT {trt_version}'s ONNX parser does not support {op}"))
            continue
        _check_attributes(n, name, data, add)
        _check_inputs(n, name, data, consts, add)
        types = spec.get("types")
        if types and n.input and n.input[0] and n.input[0] in elem:
            dt = _DTYPE_NAMES.get(elem[n.input[0]], "?")
            if dt not in types and not (op == "DequantizeLinear" and dt in ("INT8", "INT4", "FP8", "FP4")):
                add(Finding("op-dtype", name, op, f"input {n.input[0]!r} is {dt}; TensorRT's {op} takes "
                                                  f"{', '.join(types)}"))
        limit = data["max_used_outputs"].get(op)
        if limit is not None:
            extra = [o for o in n.output[limit:] if o and (o in consumers or o in graph_outputs)]
            if extra:
                add(Finding("extra-output", name, op, f"uses output(s) {', '.join(extra)}: TensorRT's {op} "
                                                      f"supports only the first {limit}"))
        for o in n.output:
            if o and elem.get(o) == 7 and o not in consts and op not in ("Shape", "Constant", "Size"):
                int64_acts += 1
        if op in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(n, name, init, consts, producer, consumers, graph_outputs, add)
    if int64_acts:
        note(Finding("int64", "model", "", f"{int64_acts} INT64 tensors computed at run time (shape arithmetic "
                                           "is fine; INT64 activations run slower than INT32)"))
    return report


def _attr(n, key):
    onnx = require("onnx", "onnx")
    for a in n.attribute:
        if a.name == key:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return None


def _check_attributes(n, name, data, add) -> None:
    for key, rule in (data["attribute_rules"].get(n.op_type) or {}).items():
        value = _attr(n, key)
        if rule.get("forbidden"):
            if value is not None:
                add(Finding("bad-attribute", name, n.op_type, f"attribute {key} is not supported by TensorRT"))
            continue
        if rule.get("all_ones"):
            if value is not None and any(int(v) != 1 for v in value):
                add(Finding("bad-attribute", name, n.op_type, f"{key}={list(value)}: TensorRT supports only ones"))
            continue
        if value is None:
            value = rule.get("default")
        if "allowed" in rule and value not in rule["allowed"]:
            allowed = ", ".join(map(str, rule["allowed"]))
            add(Finding("bad-attribute", name, n.op_type, f"{key}={value!r}: TensorRT supports {allowed}"))
    ranks = data["spatial_ranks"].get(n.op_type)
    kernel = _attr(n, "kernel_shape")
    if ranks and kernel is not None and len(kernel) not in ranks:
        add(Finding("bad-attribute", name, n.op_type, f"{len(kernel)}-D kernel: TensorRT pools 2-D or 3-D only"))


def _check_inputs(n, name, data, consts, add) -> None:
    for i in data["constant_inputs"].get(n.op_type, []):
        if i < len(n.input) and n.input[i] and n.input[i] not in consts:
            add(Finding("non-constant-input", name, n.op_type, f"input {i} ({n.input[i]}) must be a build-time "
                                                               "constant (an initializer) for TensorRT"))


def _check_qdq(n, name, init, consts, producer, consumers, graph_outputs, add) -> None:
    numpy_helper = require("onnx.numpy_helper", "onnx")
    op = n.op_type
    scale = init.get(n.input[1]) if len(n.input) > 1 else None
    if scale is not None:
        s = numpy_helper.to_array(scale)
        if (s <= 0).any():
            add(Finding("qdq-scale", name, op, "scale must be positive"))
    zp = init.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if zp is not None and (numpy_helper.to_array(zp) != 0).any():
        add(Finding("qdq-zero-point", name, op, "zero point must be 0 (TensorRT quantizes symmetrically)"))
    if op == "QuantizeLinear":
        x = n.input[0]
        if x not in consts and scale is not None and len(scale.dims) and max(scale.dims) > 1:
            add(Finding("qdq-per-channel-activation", name, op, "activations are quantized per tensor in "
                                                                "TensorRT; per-channel scales are for weights"))
        bad = [c for c in consumers.get(n.output[0], []) if c.op_type != "DequantizeLinear"]
        if bad:
            add(Finding("qdq-pair", name, op, f"feeds {bad[0].op_type} {bad[0].name!r}: a QuantizeLinear "
                                              "must be followed by DequantizeLinear"))
    else:
        src = producer.get(n.input[0])
        if n.input[0] not in consts and (src is None or src.op_type != "QuantizeLinear"):
            add(Finding("qdq-pair", name, op, "reads neither a QuantizeLinear nor constant weights"))
        for c in consumers.get(n.output[0], []):
            if c.op_type in NORMALIZATIONS and c.input and c.input[0] == n.output[0]:
                add(Finding("qdq-normalization-input", c.name or name, c.op_type,
                            f"its input is dequantized int8 ({n.name}): the normalization would compute mean "
                            "and variance from int8-rounded values; keep its input in float"))


def lint_lines(report: LintReport) -> list[str]:
    head = (f"{report.path or 'model'}: TensorRT {report.trt_version} ({report.matrix}), opset {report.opset}, "
            f"{report.nodes} nodes: " + ("clean" if report.clean else f"{len(report.findings)} finding(s)"))
    return [head, *(f.line() for f in report.findings), *(f"note: {n.line()}" for n in report.notes)]
