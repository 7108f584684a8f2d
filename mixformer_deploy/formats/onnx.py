"""Reading ONNX files safely: one-line errors for missing, non-ONNX, truncated files, and external data
that would be read from outside the model's folder."""

from __future__ import annotations

from pathlib import Path

from ..backends import require
from ..errors import ArtifactError
from ..manifest import EMBED_KEY, parse_embedded


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
