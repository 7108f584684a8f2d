"""Reading OpenVINO IR directories (``model.xml`` + ``model.bin``) without OpenVINO: the files, our rt_info
section (manifest, and the .bin's size and sha256 recorded at export), and the check that the .bin is the
one written with the .xml. Used by the openvino target and its runner."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

from ..errors import ArtifactError
from ..manifest import parse_embedded

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
