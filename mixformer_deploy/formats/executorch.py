"""Reading ExecuTorch programs (``.pte``) through the ExecuTorch runtime, and our manifest, which a .pte
carries as a constant method (it has no free-form metadata field). Used by the executorch target and its
runner; executorch is imported only once the file looks like a program."""

from __future__ import annotations

from pathlib import Path

from ..backends import require
from ..errors import ArtifactError, one_line
from ..manifest import parse_embedded

MANIFEST_METHOD = "mixformer_manifest"   # a method returning the manifest's UTF-8 JSON as a uint8 tensor


def load_program(path: Path):
    """The ExecuTorch runtime's Program for a .pte (ArtifactError when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"ET12":
        raise ArtifactError(f"{path.name}: not an ExecuTorch program (no ET12 header)")
    rt = require("executorch.runtime", "executorch")
    try:
        return rt.Runtime.get().load_program(data)
    except Exception as e:
        raise ArtifactError(f"{path.name}: ExecuTorch cannot load it ({one_line(e, 200)})") from e


def program_manifest(program, name: str) -> dict | None:
    """The manifest a loaded program carries (None when it has no manifest method)."""
    if MANIFEST_METHOD not in program.method_names:
        return None
    try:
        tensor = program.load_method(MANIFEST_METHOD).execute([])[0]
        text = bytes(tensor.numpy().astype("uint8").tobytes())
    except Exception as e:
        raise ArtifactError(f"{name}: unreadable embedded manifest ({one_line(e, 200)})") from e
    return parse_embedded(text, name)


def embedded_manifest(path: Path) -> dict | None:
    return program_manifest(load_program(path), Path(path).name)
