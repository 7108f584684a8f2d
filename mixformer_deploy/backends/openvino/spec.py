"""OpenVINO's light facts, and reading IR directories (``model.xml`` + ``model.bin``) without OpenVINO:
the files, our rt_info section (manifest, and the .bin's size and sha256 recorded at export), and the
check that the .bin is the one written with the .xml. ``inspect`` alone loads the IR (through OpenVINO)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...artifact import sha256_file
from ...errors import ArtifactError, MissingBackendError, UsageError, one_line
from ...manifest import parse_embedded
from ...optional import require, version_of
from ..spec import FP16, FP32, INT8_PER_TENSOR, BackendSpec, Options, Tolerance, block_option, option

XML, BIN = "model.xml", "model.bin"
RT_SECTION = "mixformer_deploy"       # rt_info/<mixformer_deploy>/<manifest value=...>, <bin_sha256 value=...>


def ir_files(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    if not path.is_dir():
        raise ArtifactError(f"{path.name}: an OpenVINO artifact is a directory holding {XML} and {BIN}")
    xml, bin_ = path / XML, path / BIN
    missing = [p.name for p in (xml, bin_) if not p.is_file()]
    if missing:
        raise ArtifactError(f"{path.name}: {' and '.join(missing)} missing (an OpenVINO IR needs {XML} + {BIN})")
    return xml, bin_


def read_rt_info(path: Path) -> dict[str, str]:
    """Our rt_info section of the IR (``name -> value``), read from the XML alone (no weights, no
    OpenVINO needed); ArtifactError for a file that is not an IR."""
    path = Path(path)
    xml, _ = ir_files(path)
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as e:
        raise ArtifactError(f"{path.name}/{XML}: not a readable OpenVINO IR ({type(e).__name__})") from e
    if root.tag != "net":
        raise ArtifactError(f"{path.name}/{XML}: not an OpenVINO IR (root <{root.tag}>, expected <net>)")
    section = root.find(f"rt_info/{RT_SECTION}")
    if section is None:
        return {}
    return {child.tag: child.get("value", "") for child in section}


def verify_weights(path: Path) -> None:
    """The .bin must be the one written with this .xml: its size and sha256 are recorded in rt_info
    (a missing, truncated or swapped .bin is an ArtifactError, not a crash or silent garbage)."""
    path = Path(path)
    _, bin_ = ir_files(path)
    info = read_rt_info(path)
    size, sha = info.get("bin_size"), info.get("bin_sha256")
    actual = bin_.stat().st_size
    if size and size.isdigit() and int(size) != actual:
        raise ArtifactError(f"{path.name}/{BIN}: {actual} bytes, the IR was written with {size} "
                            "(truncated, or another model's weights)")
    if sha and sha256_file(bin_) != sha:
        raise ArtifactError(f"{path.name}/{BIN}: sha256 differs from the one recorded in {XML} "
                            "(the weights were swapped or corrupted)")


def embedded_manifest(path: Path) -> dict | None:
    return parse_embedded(read_rt_info(path).get("manifest"), Path(path).name)


def openvino():
    return require("openvino", "openvino")


def module_of(name: str) -> str:
    """The deploy-form module an OpenVINO op came from, by its ONNX scope name
    ('/stages.0/stages.0.0/norm1/LayerNormalization' -> 'stages.0.0.norm1'). The scope ends at the first
    op-type part (capitalized: 'Gemm', 'MatMul', 'Reshape_3'), as OpenVINO appends parts of its own
    ('/head/Gemm/WithoutBiases')."""
    parts = [p for p in name.split("/") if p]
    scope = ""
    for p in parts[:-1]:
        if p[:1].isupper():
            break
        scope = p if scope and p.startswith(scope + ".") else (f"{scope}.{p}" if scope else p)
    return scope.replace(".module", "")


STRUCTURAL = {"Parameter", "Result", "Constant", "Convert", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
              "Concat", "Split", "VariadicSplit", "Slice", "StridedSlice", "ShapeOf", "Gather", "Pad",
              "Broadcast", "FakeQuantize"}
HEAVY = {"MatMul", "Convolution", "GroupConvolution", "ScaledDotProductAttention"}
LAYOUT = ("Reshape", "Transpose", "Convert", "Squeeze", "Unsqueeze")


def _dtype(et) -> str:
    name = et.get_type_name()
    return {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "i8": "int8", "u8": "uint8", "i64": "int64",
            "i32": "int32", "f64": "fp64", "boolean": "bool"}.get(name, name)


def _ir_version(xml: Path) -> int | None:
    with open(xml, "rb") as f:
        head = f.read(400).decode("utf-8", "replace")
    m = re.search(r'<net [^>]*version="(\d+)"', head)
    return int(m.group(1)) if m else None


def _fed_by_fq(op) -> bool:
    """Whether an op computes on quantized data: an input from FakeQuantize, directly or through a layout
    op (NNCF quantizes the input of a Transpose/Reshape chain)."""
    for inp in op.inputs():
        src = inp.get_source_output().get_node()
        while src.get_type_name() in LAYOUT:
            src = src.input_value(0).get_node()
        if src.get_type_name() == "FakeQuantize":
            return True
    return False


def _op_precisions(ops) -> tuple[Counter, Counter]:
    """Compute ops per precision (FakeQuantize counted under its own name), and the fp32 heavy ops per
    module."""
    per_precision: Counter = Counter()
    fp32_heavy: Counter = Counter()
    for op in ops:
        t = op.get_type_name()
        if t == "FakeQuantize":  # the quantization itself, not an op that computes in a precision
            per_precision["FakeQuantize"] += 1
            continue
        if t in STRUCTURAL:
            continue
        p = "int8" if _fed_by_fq(op) else _dtype(op.get_output_element_type(0))
        per_precision[p] += 1
        if t in HEAVY and p == "fp32":
            fp32_heavy[module_of(op.get_friendly_name())] += 1
    return per_precision, fp32_heavy


def _weight_bytes(ops) -> dict[str, int]:
    weights: Counter = Counter()
    for op in ops:
        if op.get_type_name() == "Constant":
            et = op.get_output_element_type(0)
            if et.is_real() or et.get_type_name() in ("i8", "u8", "i4", "u4"):
                weights[_dtype(et)] += op.get_byte_size()
    return dict(weights)


def _ports(ports) -> list[dict]:
    return [{"name": p.get_any_name(), "dtype": _dtype(p.get_element_type()),
             "shape": [d.get_length() if d.is_static else "batch" for d in p.get_partial_shape()]} for p in ports]


# The runner's bf16 execution of a float IR (~8e-3 rel. L2 measured on B1): BF16's atol and rtol, with the
# tighter cosine (0.998, BF16 allows 0.995) that this execution was measured to hold.
OPENVINO_BF16 = Tolerance(1e-1, 5e-2, 0.998)


@dataclass(frozen=True)
class OpenVinoOptions(Options):
    nncf_preset: str = option("performance", "int8: NNCF quantization preset (performance: symmetric "
                              "activations; mixed: asymmetric activations).", ("performance", "mixed"))
    nncf_model_type: str = option("transformer", "int8: NNCF model type (transformer: NNCF's transformer rules, "
                                  "e.g. no quantizers on Add/LayerNorm inputs; none: generic CNN rules).",
                                  ("transformer", "none"))
    smooth_quant: float = option(-1.0, "int8: SmoothQuant alpha for MatMuls (negative: off).")
    nncf_graph: str = option("frontend", "int8: quantize the ONNX frontend's graph, then fuse (frontend: "
                             "measured +1 held-out error on the shipped weights) or fuse attention first, then "
                             "quantize (fused: +4).", ("frontend", "fused"))
    bias_correction: str = option("fast", "int8: NNCF bias correction (fast: the fast variant; full: the slower "
                                  "exact one; none: off).", ("fast", "full", "none"))
    block: str = block_option()


class OpenVinoSpec(BackendSpec):
    key = "openvino"
    suffix = ".openvino"
    is_dir = True
    extra = "openvino"
    runtime = "openvino"
    runners = {"openvino": "OpenVinoRunner"}
    exporter_name = "OpenVinoExporter"
    precisions = ("fp32", "fp16", "int8")
    calibrated = ("int8",)
    # fp32: IEEE float32 execution (the runner forces it). fp16: fp16 weights, f32 compute (~4e-4 rel. L2
    # measured on the shipped weights). int8: the accuracy gate judges it; parity only catches a broken graph
    # (B0 at 32x32, NNCF default: max|a-r| up to 0.73x max|r|, a worst-input cosine of 0.52 on a held-out digit
    # with near-flat logits, while the held-out accuracy drops by 1 image; a wrong graph is far below).
    tolerances = {"fp32": FP32, "fp16": FP16, "bf16": OPENVINO_BF16, "int8": INT8_PER_TENSOR}
    Options = OpenVinoOptions
    versions = ("openvino", "nncf", "onnx", "onnxslim")
    description = "OpenVINO IR (fp32, fp16-compressed weights, NNCF int8): the fastest CPU path"
    title = "OpenVINO"
    runs_here = "openvino"
    verified = "Linux x86 CPU"
    capabilities = frozenset({"int8", "reproducible", "backbone", "inspect", "embedded_manifest", "checksum",
                              "fp16"})

    def check(self, options) -> None:
        super().check(options)
        openvino()
        if options.precision == "int8" and version_of("nncf") is None:
            raise MissingBackendError('nncf is not installed: pip install "mixformer-deploy[openvino]"')
        alpha = options.target.smooth_quant
        if alpha > 1.0:
            raise UsageError(f"bad --smooth-quant {alpha}: an alpha in [0, 1], or negative for off")

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def files(self, path: Path) -> list[Path]:
        path = Path(path)
        return [p for p in (path / XML, path / BIN) if p.is_file()] if path.is_dir() else []

    def inspect(self, path: Path) -> dict:
        ov = openvino()
        path = Path(path)
        xml, bin_ = ir_files(path)
        verify_weights(path)
        try:
            model = ov.Core().read_model(str(xml), str(bin_))
        except Exception as e:
            raise ArtifactError(f"{path.name}: OpenVINO cannot read it ({one_line(e, 200)})") from e
        ops = model.get_ordered_ops()
        ranks = [o.get_partial_shape().rank.get_length() for op in ops for o in op.outputs()
                 if o.get_partial_shape().rank.is_static]
        per_precision, fp32_heavy = _op_precisions(ops)
        precision = (self.read_embedded(path) or {}).get("precision")
        return {
            "format": "openvino-ir", "ir_version": _ir_version(xml), "files": [p.name for p in self.files(path)],
            "inputs": _ports(model.inputs), "outputs": _ports(model.outputs),
            "ops": dict(sorted(Counter(op.get_type_name() for op in ops).items())), "nodes": len(ops),
            "max_rank": max(ranks) if ranks else None,
            "precisions": dict(per_precision), "weight_bytes": _weight_bytes(ops),
            "kept_fp32": sorted(m for m in fp32_heavy if m) if precision == "int8" else [],
        }


SPEC = OpenVinoSpec()
