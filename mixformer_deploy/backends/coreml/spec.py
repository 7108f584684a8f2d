"""Core ML's light facts and its package reader: the root spec named by Manifest.json, its weight blobs,
our manifest in the spec's user-defined metadata, and what ``inspect`` reports of the ML program. Used by
the exporter, the runner and generic code; coremltools is imported only when a spec is parsed (its import
costs seconds and it is an optional extra)."""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...errors import ArtifactError, MissingBackendError, UsageError, one_line
from ...manifest import EMBED_KEY, parse_embedded
from ...optional import require
from ..spec import FP16, FP32, BackendSpec, Options, option

INPUT, LOGITS = "input", "logits"   # the plain form's feature names (the contract parity and benchmarks run on)
WEIGHT_OPS = ("const", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_affine_dequantize")


def coremltools():
    """Import coremltools quietly: on Linux it logs that its native runtime (macOS only) is missing, it
    warns about untested torch/scikit-learn versions, and torchao (which it imports) about its CUDA
    kernels; none of it is news to our users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("coremltools", "torchao", "torch.utils._pytree")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:  # torchao (imported by coremltools) logs its missing CUDA kernels
            lg.setLevel(logging.ERROR)
        try:
            return require("coremltools", "coreml")
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def spec_path(package: Path) -> Path:
    """The root model file that the package's Manifest.json names."""
    package = Path(package)
    if not package.exists():
        raise ArtifactError(f"artifact not found: {package}")
    if not package.is_dir():
        raise ArtifactError(f"{package.name}: not an .mlpackage directory")
    manifest = package / "Manifest.json"
    try:
        info = json.loads(manifest.read_text())
        root = info["itemInfoEntries"][info["rootModelIdentifier"]]["path"]
    except FileNotFoundError:
        raise ArtifactError(f"{package.name}: not an .mlpackage (no Manifest.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{package.name}: unreadable Manifest.json ({type(e).__name__})") from e
    p = package / "Data" / root
    if not p.is_file():
        raise ArtifactError(f"{package.name}: the model spec {p.relative_to(package)} is missing")
    return p


def read_spec(package: Path):
    """The package's Model protobuf (ArtifactError when missing or corrupt; the package's layout is
    checked before coremltools is imported)."""
    p = spec_path(package)
    coremltools()
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(p.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ArtifactError(f"{Path(package).name}: corrupt model spec ({one_line(e, 120)})") from e
    if spec.WhichOneof("Type") is None or not spec.specificationVersion:
        raise ArtifactError(f"{Path(package).name}: corrupt model spec (no model type or version)")
    return spec


def all_ops(block):
    """A MIL block's operations, nested blocks included."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from all_ops(inner)


def main_block(spec):
    """The ML program's main block (None for other model types)."""
    if spec.WhichOneof("Type") != "mlProgram":
        return None
    fn = spec.mlProgram.functions.get("main")
    return fn.block_specializations.get(fn.opset) if fn is not None else None


def check_weights(package: Path, spec) -> None:
    """Every weight blob the program references exists and is long enough (ArtifactError otherwise)."""
    block = main_block(spec)
    if block is None:
        return
    base = spec_path(package).parent
    sizes: dict[str, int] = {}
    for op in all_ops(block):
        if op.type not in WEIGHT_OPS:
            continue
        for attr in op.attributes.values():
            if not attr.HasField("blobFileValue"):
                continue
            name, offset = attr.blobFileValue.fileName, attr.blobFileValue.offset
            rel = name.split("@model_path/", 1)[-1]
            if rel not in sizes:
                f = base / rel
                if not f.is_file():
                    raise ArtifactError(f"{Path(package).name}: its weights are missing ({rel})")
                sizes[rel] = f.stat().st_size
            if offset >= sizes[rel]:
                raise ArtifactError(f"{Path(package).name}: its weights file {rel} is truncated "
                                    f"({sizes[rel]} bytes, a weight at offset {offset})")


def spec_manifest(spec, name: str) -> dict | None:
    """Our manifest from a read spec's user-defined metadata (None when it has none)."""
    return parse_embedded(spec.description.metadata.userDefined.get(EMBED_KEY), name)


def embedded_manifest(package: Path) -> dict | None:
    """The package's embedded manifest; None without coremltools (the sidecar serves, and inspect and
    load say the extra is missing)."""
    try:
        coremltools()
    except MissingBackendError:
        return None
    return spec_manifest(read_spec(package), Path(package).name)


# ---------------------------------------------------------------------- deployment targets

# deployment targets by platform, oldest first; ML programs start at iOS15 / macOS12
PLATFORMS = {
    "iOS": ("iOS13", "iOS14", "iOS15", "iOS16", "iOS17", "iOS18"),
    "macOS": ("macOS10.15", "macOS11", "macOS12", "macOS13", "macOS14", "macOS15"),
}
OLDEST_ML_PROGRAM = {"iOS": "iOS15", "macOS": "macOS12"}
DEFAULT_DEPLOYMENT_TARGET = "iOS16"
OFFERED = ("iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14", "macOS15")
# Core ML specification version -> the deployment targets that introduced it
SPEC_VERSIONS = {6: "iOS15/macOS12", 7: "iOS16/macOS13", 8: "iOS17/macOS14", 9: "iOS18/macOS15"}


def platform_of(name: str) -> tuple[str, int] | None:
    """A deployment target's platform and its index in ``PLATFORMS`` (None: not a target we know)."""
    for platform, names in PLATFORMS.items():
        for i, n in enumerate(names):
            if n.lower() == str(name).lower():
                return platform, i
    return None


def deployment_target(name: str) -> str:
    """A --minimum-deployment-target value -> its canonical spelling, or a UsageError: unknown names list
    the choices, targets too old for an ML program name the oldest that works."""
    found = platform_of(name)
    if found is None:
        raise UsageError(f"bad --minimum-deployment-target {name!r}: choose one of {', '.join(OFFERED)}")
    platform, i = found
    oldest = OLDEST_ML_PROGRAM[platform]
    if i < PLATFORMS[platform].index(oldest):
        raise UsageError(f"--minimum-deployment-target {PLATFORMS[platform][i]} is too old: Core ML ML programs "
                         f"need {oldest} or newer; the oldest that works for this model is {oldest}")
    return PLATFORMS[platform][i]


# ---------------------------------------------------------------------- inspect helpers

DTYPES = {10: "fp16", 11: "fp32", 12: "fp64", 13: "bf16", 21: "int8", 22: "int16", 23: "int32", 24: "int64",
          31: "uint8", 32: "uint16", 1: "bool", 2: "string"}
FLOAT = ("fp16", "fp32", "bf16", "fp64")


def _tensor_type(value_type):
    return value_type.tensorType if value_type.HasField("tensorType") else None


def program_facts(spec) -> dict:
    """Op histogram, maximum rank, ops per compute precision (an op's precision is its first output's
    float type; const and cast ops are counted apart)."""
    block = main_block(spec)
    if block is None:
        return {"ops": None, "max_rank": None, "precisions": None, "ops_fp16": None, "ops_fp32": None,
                "casts": None, "_fp32_names": set()}
    ops: Counter = Counter()
    per_precision: Counter = Counter()
    by_precision: dict[str, Counter] = {"fp16": Counter(), "fp32": Counter()}
    fp32_names: set[str] = set()
    max_rank = 0
    for op in all_ops(block):
        ops[op.type] += 1
        for o in op.outputs:
            t = _tensor_type(o.type)
            if t is not None:
                max_rank = max(max_rank, t.rank)
        if op.type in ("const", "cast") or not op.outputs:
            continue
        t = _tensor_type(op.outputs[0].type)
        p = DTYPES.get(t.dataType) if t is not None else None
        if p not in FLOAT:
            continue
        per_precision[p] += 1
        by_precision.setdefault(p, Counter())[op.type] += 1
        if p == "fp32":
            name = op.attributes["name"].immediateValue.tensor.strings.values[0] if "name" in op.attributes else ""
            fp32_names.add(name)
    return {"ops": dict(sorted(ops.items())), "nodes": sum(ops.values()),
            "compute_ops": sum(per_precision.values()), "max_rank": max_rank,
            "precisions": dict(sorted(per_precision.items())),
            "ops_fp16": dict(sorted(by_precision["fp16"].items())),
            "ops_fp32": dict(sorted(by_precision["fp32"].items())),
            "casts": ops.get("cast", 0), "_fp32_names": fp32_names}


def feature(desc) -> dict:
    """One input or output of the model description: name, kind and its type's facts."""
    t = desc.type
    kind = t.WhichOneof("Type")
    out = {"name": desc.name, "kind": kind}
    if kind == "multiArrayType":
        m = t.multiArrayType
        out["dtype"] = {65568: "fp32", 65552: "fp16", 65600: "fp64", 131104: "int32"}.get(m.dataType, str(m.dataType))
        out["shape"] = list(m.shape)
        if m.HasField("shapeRange"):
            out["shape_range"] = [[r.lowerBound, r.upperBound] for r in m.shapeRange.sizeRanges]
    elif kind == "imageType":
        im = t.imageType
        out.update({"width": im.width, "height": im.height,
                    "color_space": {10: "grayscale", 20: "RGB", 30: "BGR"}.get(im.colorSpace, str(im.colorSpace))})
    elif kind == "dictionaryType":
        out["key"] = t.dictionaryType.WhichOneof("KeyType")
    if desc.shortDescription:
        out["description"] = desc.shortDescription
    return out


# ---------------------------------------------------------------------- the backend

@dataclass(frozen=True)
class CoreMlOptions(Options):
    minimum_deployment_target: str = option(
        DEFAULT_DEPLOYMENT_TARGET,
        f"Oldest OS the ML program runs on: {', '.join(OFFERED)} (default {DEFAULT_DEPLOYMENT_TARGET}).")
    image_input: bool = option(False, "App-facing form: an RGB image input (CVPixelBuffer) instead of the "
                                      "normalized tensor (parity does not run on it).")
    classifier: bool = option(False, "App-facing form: a classifier with the labels (classLabel + probabilities "
                                     "outputs) instead of logits (parity does not run on it).")


class CoreMlSpec(BackendSpec):
    key = "coreml"
    suffix = ".mlpackage"
    is_dir = True
    extra = "coreml"
    runtime = "coreml"
    runners = {"coreml": "CoreMlRunner"}
    exporter_name = "CoreMlExporter"
    precisions = ("fp32", "fp16")
    # fp32: the design's defaults (untested on a Mac here); fp16: as loose as the ONNX fp16 target
    tolerances = {"fp32": FP32, "fp16": FP16}
    Options = CoreMlOptions
    versions = ("coremltools",)
    description = "Core ML ML program (.mlpackage) for iOS/macOS; converts anywhere, predicts on macOS only"
    title = "Core ML"
    runs_here = "conversion only; prediction needs macOS"
    verified = "conversion on Linux x86 CPU"
    export_cost = "costly"
    capabilities = frozenset({"reproducible", "backbone", "inspect", "embedded_manifest", "fp16"})

    def check(self, options) -> None:
        super().check(options)
        deployment_target(options.target.minimum_deployment_target)
        coremltools()  # exit 3 naming the extra before any weights are read

    def unjudged_form(self, options) -> str | None:
        forms = [f"--{k.replace('_', '-')}" for k in ("image_input", "classifier") if getattr(options.target, k)]
        if forms:
            return (f"parity judges the plain form only, not {' '.join(forms)} (an app-facing form; "
                    "benchmarks/mac_check.py checks its inputs and outputs)")
        return None

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def verify(self, path: Path) -> None:
        """The program parses and every weight blob it references is there (coremltools reads the spec;
        no prediction, so this runs on Linux too)."""
        check_weights(Path(path), read_spec(Path(path)))

    def inspect(self, path: Path) -> dict:
        coremltools()
        path = Path(path)
        spec = read_spec(path)
        check_weights(path, spec)
        embedded = self.read_embedded(path) or {}
        facts = program_facts(spec)
        recorded = (embedded.get("coreml") or {}).get("kept_fp32") or {}
        fp32_names = facts.pop("_fp32_names")
        meta = spec.description.metadata
        return {
            "format": "coreml mlprogram",
            "specification_version": spec.specificationVersion,
            "minimum_deployment_target": SPEC_VERSIONS.get(spec.specificationVersion,
                                                           f"spec {spec.specificationVersion}"),
            "form": (embedded.get("coreml") or {}).get("form"),
            "inputs": [feature(d) for d in spec.description.input],
            "outputs": [feature(d) for d in spec.description.output],
            **facts,
            # the recorded keeps whose ops the program really computes in float32
            "kept_fp32": sorted(m for m, names in recorded.items() if any(n in fp32_names for n in names)),
            "metadata": {"author": meta.author, "license": meta.license, "version": meta.versionString,
                         "short_description": meta.shortDescription,
                         "user_defined": sorted(k for k in meta.userDefined)},
            "files": {str(f.relative_to(path)): f.stat().st_size for f in self.files(path)},
        }


SPEC = CoreMlSpec()
