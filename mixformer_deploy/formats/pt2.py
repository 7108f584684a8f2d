"""Reading AOTInductor .pt2 packages (zip archives) without loading them: members, the compiled model's
own metadata, and our manifest stored under extra/. Used by the aoti target and its runner."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..errors import ArtifactError
from ..manifest import parse_embedded

MANIFEST_FILE = "mixformer_deploy.manifest.json"   # under the archive's extra/ folder


def archive_members(path: Path) -> dict[str, str]:
    """Short name (the part after the archive root) -> member name, for a .pt2 zip."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path.name}: not a readable .pt2 package ({type(e).__name__})") from e
    return {n.split("/", 1)[1] if "/" in n else n: n for n in names}


def read_member(path: Path, short: str) -> bytes | None:
    members = archive_members(path)
    if short not in members:
        return None
    with zipfile.ZipFile(path) as z:
        return z.read(members[short])


def package_facts(path: Path) -> dict:
    """What the compiled model says about itself (no loading): device, platform, CPU ISA, GPU arch, and
    the metadata we asked the compiler to embed."""
    members = archive_members(path)
    meta = [s for s in members if s.startswith("data/aotinductor/") and s.endswith("wrapper_metadata.json")]
    if not meta:
        raise ArtifactError(f"{path.name}: not an AOTInductor package (no compiled model inside)")
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(members[meta[0]]))
    except (ValueError, zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{path.name}: unreadable AOTInductor metadata ({type(e).__name__})") from e


def embedded_manifest(path: Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    return parse_embedded(read_member(path, f"extra/{MANIFEST_FILE}"), path.name)
