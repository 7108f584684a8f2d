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
from typing import Any, Callable

from ...optional import require
from ...errors import UsageError

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


@dataclass
class _Graph:
    """What every rule reads: the model, its inferred types, the matrix for one TensorRT version, and the
    report the rules add findings and notes to."""

    model: Any
    inferred: Any                 # the graph with shape inference's value_info (the model's if it failed)
    trt_version: str
    version: dict                 # the matrix's record of this TensorRT version
    data: dict                    # the whole support matrix
    ops: dict                     # operator -> its support record, for this version
    report: LintReport
    consts: set = field(default_factory=set)
    init: dict = field(default_factory=dict)
    elem: dict = field(default_factory=dict)          # tensor name -> ONNX element type
    producer: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=dict)
    graph_outputs: set = field(default_factory=set)

    def add(self, finding: Finding) -> None:
        self.report.findings.append(finding)

    def note(self, finding: Finding) -> None:
        self.report.notes.append(finding)

    def supported(self, n) -> bool:
        """A standard-domain node whose op the matrix supports (the per-op rules apply to it)."""
        return n.domain in STANDARD_DOMAINS and bool((self.ops.get(n.op_type) or {}).get("supported"))


def _graph(model, trt_version: str, report: LintReport) -> _Graph:
    onnx = require("onnx", "onnx")
    data = support_data()
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        inferred = model.graph
    g = _Graph(model, inferred, trt_version, data["versions"][trt_version], data, operators_for(trt_version), report)
    graph = model.graph
    g.init = {t.name: t for t in graph.initializer}
    g.consts = set(g.init) | {o for n in graph.node if n.op_type == "Constant" and n.domain in STANDARD_DOMAINS
                              for o in n.output}
    for v in [*inferred.value_info, *inferred.input, *inferred.output]:
        if v.type.HasField("tensor_type"):
            g.elem[v.name] = v.type.tensor_type.elem_type
    g.elem.update({t.name: t.data_type for t in graph.initializer})
    g.producer = {o: n for n in graph.node for o in n.output if o}
    for n in graph.node:
        for i in n.input:
            if i:
                g.consumers.setdefault(i, []).append(n)
    g.graph_outputs = {o.name for o in graph.output}
    return g


def lint(model, trt_version: str = DEFAULT_VERSION, path: str | Path | None = None) -> LintReport:
    """Lint an ONNX ModelProto (or a path) for TensorRT ``trt_version`` ('10' or '11'): every rule of
    ``RULES`` in order, so the findings come graph-level first, then node by node."""
    trt_version = str(trt_version)
    if trt_version not in VERSIONS:
        raise UsageError(f"bad --trt-version {trt_version!r}: choose one of {', '.join(VERSIONS)}")
    if not hasattr(model, "graph"):
        from ..onnx.spec import load_onnx
        path = path or model
        model = load_onnx(model, load_weights=False)
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
    label = support_data()["versions"][trt_version]["label"]
    report = LintReport(str(path) if path else None, trt_version, label, opset, len(model.graph.node))
    g = _graph(model, trt_version, report)
    for rule in RULES:
        rule(g)
    return report


# ---------------------------------------------------------------------- graph-level rules

def _opset(g: _Graph) -> None:
    opset, v = g.report.opset, g.version
    if opset is not None and not v["opset_min"] <= opset <= v["opset_max"]:
        g.add(Finding("opset", "model", "", f"opset {opset} is outside TensorRT {g.trt_version}'s "
                                           f"{v['opset_min']}..{v['opset_max']}"))


def _dynamic_dims(g: _Graph) -> None:
    """A dynamic batch is a note (the engine gets a profile); any other dynamic axis is a finding."""
    for v in g.model.graph.input:
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if d.dim_value > 0:
                continue
            if axis == 0:
                g.note(Finding("dynamic-batch", v.name, "", f"dynamic batch ({d.dim_param or '?'}): the "
                                                             "engine needs an optimization profile"))
            else:
                g.add(Finding("dynamic-dim", v.name, "", f"axis {axis} is dynamic ({d.dim_param or '?'}): "
                                                        "only the batch axis should be; fix the other sizes"))


def _dtypes(g: _Graph) -> None:
    io_names = {v.name for v in [*g.model.graph.input, *g.model.graph.output]}
    for name, code in sorted(g.elem.items()):
        dt = _DTYPE_NAMES.get(code, str(code))
        if dt == "DOUBLE":
            g.add(Finding("dtype", name, "", "DOUBLE tensor: TensorRT casts it to FLOAT, clamped to +-FLT_MAX"))
        elif dt == "UINT8" and name not in io_names:
            g.add(Finding("dtype", name, "", "UINT8 is supported only as a network input or output"))
        elif code and dt not in _SUPPORTED_DTYPES:
            g.add(Finding("dtype", name, "", f"data type {dt} has no TensorRT equivalent"))


def _nodes(g: _Graph) -> None:
    """Every node through ``NODE_RULES`` in order; a rule that returns True has settled the node."""
    for idx, n in enumerate(g.model.graph.node):
        name = n.name or f"#{idx}"
        for rule in NODE_RULES:
            if rule(g, n, name):
                break


def _int64_activations(g: _Graph) -> None:
    count = sum(1 for n in g.model.graph.node if g.supported(n) and n.op_type not in ("Shape", "Constant", "Size")
                for o in n.output if o and g.elem.get(o) == 7 and o not in g.consts)
    if count:
        g.note(Finding("int64", "model", "", f"{count} INT64 tensors computed at run time (shape arithmetic "
                                             "is fine; INT64 activations run slower than INT32)"))


# ---------------------------------------------------------------------- node rules (True: node settled)

def _domain(g: _Graph, n, name: str) -> bool:
    if n.domain in STANDARD_DOMAINS:
        return False
    if n.op_type in set(g.version.get("custom_operators") or []):
        g.note(Finding("trt-custom-op", name, n.op_type, f"TensorRT {g.trt_version} parses {n.op_type} natively"))
    else:
        g.add(Finding("custom-domain", name, n.op_type, f"op of domain {n.domain!r}: TensorRT's parser has no "
                                                        "such operator; it needs a TensorRT plugin"))
    return True


def _operator(g: _Graph, n, name: str) -> bool:
    op, spec = n.op_type, g.ops.get(n.op_type)
    if spec is None:
        g.add(Finding("unsupported-op", name, op, f"{op} is not in TensorRT {g.trt_version}'s ONNX operator matrix"))
    elif not spec.get("supported"):
        g.add(Finding("unsupported-op", name, op, f"TensorRT {g.trt_version}'s ONNX parser does not support {op}"))
    return not g.supported(n)


def _attributes(g: _Graph, n, name: str) -> bool:
    for key, rule in (g.data["attribute_rules"].get(n.op_type) or {}).items():
        value = _attr(n, key)
        if rule.get("forbidden"):
            if value is not None:
                g.add(Finding("bad-attribute", name, n.op_type, f"attribute {key} is not supported by TensorRT"))
            continue
        if rule.get("all_ones"):
            if value is not None and any(int(v) != 1 for v in value):
                g.add(Finding("bad-attribute", name, n.op_type, f"{key}={list(value)}: TensorRT supports only ones"))
            continue
        if value is None:
            value = rule.get("default")
        if "allowed" in rule and value not in rule["allowed"]:
            allowed = ", ".join(map(str, rule["allowed"]))
            g.add(Finding("bad-attribute", name, n.op_type, f"{key}={value!r}: TensorRT supports {allowed}"))
    ranks = g.data["spatial_ranks"].get(n.op_type)
    kernel = _attr(n, "kernel_shape")
    if ranks and kernel is not None and len(kernel) not in ranks:
        g.add(Finding("bad-attribute", name, n.op_type, f"{len(kernel)}-D kernel: TensorRT pools 2-D or 3-D only"))
    return False


def _constant_inputs(g: _Graph, n, name: str) -> bool:
    for i in g.data["constant_inputs"].get(n.op_type, []):
        if i < len(n.input) and n.input[i] and n.input[i] not in g.consts:
            g.add(Finding("non-constant-input", name, n.op_type, f"input {i} ({n.input[i]}) must be a build-time "
                                                                 "constant (an initializer) for TensorRT"))
    return False


def _op_dtype(g: _Graph, n, name: str) -> bool:
    types = g.ops[n.op_type].get("types")
    if types and n.input and n.input[0] and n.input[0] in g.elem:
        dt = _DTYPE_NAMES.get(g.elem[n.input[0]], "?")
        if dt not in types and not (n.op_type == "DequantizeLinear" and dt in ("INT8", "INT4", "FP8", "FP4")):
            g.add(Finding("op-dtype", name, n.op_type, f"input {n.input[0]!r} is {dt}; TensorRT's {n.op_type} "
                                                       f"takes {', '.join(types)}"))
    return False


def _extra_outputs(g: _Graph, n, name: str) -> bool:
    limit = g.data["max_used_outputs"].get(n.op_type)
    if limit is not None:
        extra = [o for o in n.output[limit:] if o and (o in g.consumers or o in g.graph_outputs)]
        if extra:
            g.add(Finding("extra-output", name, n.op_type, f"uses output(s) {', '.join(extra)}: TensorRT's "
                                                           f"{n.op_type} supports only the first {limit}"))
    return False


def _qdq_constants(g: _Graph, n, name: str) -> bool:
    """Scales positive, zero points zero (TensorRT quantizes symmetrically)."""
    if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return False
    numpy_helper = require("onnx.numpy_helper", "onnx")
    scale = g.init.get(n.input[1]) if len(n.input) > 1 else None
    if scale is not None and (numpy_helper.to_array(scale) <= 0).any():
        g.add(Finding("qdq-scale", name, n.op_type, "scale must be positive"))
    zp = g.init.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if zp is not None and (numpy_helper.to_array(zp) != 0).any():
        g.add(Finding("qdq-zero-point", name, n.op_type, "zero point must be 0 (TensorRT quantizes symmetrically)"))
    return False


def _quantize_placement(g: _Graph, n, name: str) -> bool:
    """A Q quantizes activations per tensor and feeds only DQs."""
    if n.op_type != "QuantizeLinear":
        return False
    scale = g.init.get(n.input[1]) if len(n.input) > 1 else None
    if n.input[0] not in g.consts and scale is not None and len(scale.dims) and max(scale.dims) > 1:
        g.add(Finding("qdq-per-channel-activation", name, n.op_type, "activations are quantized per tensor in "
                                                                     "TensorRT; per-channel scales are for weights"))
    bad = [c for c in g.consumers.get(n.output[0], []) if c.op_type != "DequantizeLinear"]
    if bad:
        g.add(Finding("qdq-pair", name, n.op_type, f"feeds {bad[0].op_type} {bad[0].name!r}: a QuantizeLinear "
                                                   "must be followed by DequantizeLinear"))
    return False


def _dequantize_placement(g: _Graph, n, name: str) -> bool:
    """A DQ reads a Q or constant weights, and feeds no normalization (its mean and variance would come
    from int8-rounded values)."""
    if n.op_type != "DequantizeLinear":
        return False
    src = g.producer.get(n.input[0])
    if n.input[0] not in g.consts and (src is None or src.op_type != "QuantizeLinear"):
        g.add(Finding("qdq-pair", name, n.op_type, "reads neither a QuantizeLinear nor constant weights"))
    for c in g.consumers.get(n.output[0], []):
        if c.op_type in NORMALIZATIONS and c.input and c.input[0] == n.output[0]:
            g.add(Finding("qdq-normalization-input", c.name or name, c.op_type,
                          f"its input is dequantized int8 ({n.name}): the normalization would compute mean "
                          "and variance from int8-rounded values; keep its input in float"))
    return False


def _attr(n, key):
    onnx = require("onnx", "onnx")
    for a in n.attribute:
        if a.name == key:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return None


NODE_RULES: tuple[Callable[[_Graph, Any, str], bool], ...] = (
    _domain, _operator, _attributes, _constant_inputs, _op_dtype, _extra_outputs, _qdq_constants,
    _quantize_placement, _dequantize_placement)
RULES: tuple[Callable[[_Graph], None], ...] = (_opset, _dynamic_dims, _dtypes, _nodes, _int64_activations)


def lint_lines(report: LintReport) -> list[str]:
    head = (f"{report.path or 'model'}: TensorRT {report.trt_version} ({report.matrix}), opset {report.opset}, "
            f"{report.nodes} nodes: " + ("clean" if report.clean else f"{len(report.findings)} finding(s)"))
    return [head, *(f.line() for f in report.findings), *(f"note: {n.line()}" for n in report.notes)]
