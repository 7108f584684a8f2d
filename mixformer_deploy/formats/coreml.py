"""Reading Core ML ML packages (``.mlpackage``): the root spec named by Manifest.json, its weight blobs, and
our manifest in the spec's user-defined metadata. Used by the coreml target and its runner; coremltools is
imported only when a spec is parsed (its import costs seconds and it is an optional extra)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from ..backends import require
from ..errors import ArtifactError, MissingBackendError, one_line
from ..manifest import EMBED_KEY, parse_embedded

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
