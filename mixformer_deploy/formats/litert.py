"""Reading LiteRT (``.tflite``) flatbuffers with ai-edge-litert's generated schema, and our manifest in the
flatbuffer's ``metadata`` table. Used by the litert target and its runner; the schema is imported only once
the bytes carry the TFL3 identifier."""

from __future__ import annotations

from pathlib import Path

from ..backends import require
from ..errors import ArtifactError, one_line
from ..manifest import EMBED_KEY, parse_embedded

TFLITE_ID = b"TFL3"


def unpack(data: bytes, name: str):
    """The flatbuffer as the schema's object tree (``ModelT``); ArtifactError when it is not one."""
    if len(data) < 8 or data[4:8] != TFLITE_ID:
        raise ArtifactError(f"{name}: not a LiteRT/TFLite flatbuffer (no TFL3 identifier)")
    schema = require("ai_edge_litert.schema_py_generated", "litert")
    try:
        return schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    except Exception as e:
        raise ArtifactError(f"{name}: corrupt LiteRT flatbuffer ({one_line(e, 200)})") from e


def read_model(path: Path):
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    return unpack(path.read_bytes(), path.name)


def embedded_manifest(path: Path) -> dict | None:
    model = read_model(path)
    for m in model.metadata or []:
        if (m.name.decode() if isinstance(m.name, bytes) else m.name) != EMBED_KEY:
            continue
        try:
            text = bytes(model.buffers[m.buffer].data)
        except Exception as e:
            raise ArtifactError(f"{Path(path).name}: unreadable embedded manifest ({one_line(e, 200)})") from e
        return parse_embedded(text, Path(path).name)
    return None
