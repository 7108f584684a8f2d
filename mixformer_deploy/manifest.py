"""Artifact manifests: the JSON sidecar (and embedded copy) that makes an artifact self-describing.

Schema ``mixformer-deploy/manifest/1``: target, runtime, variant, config, num_classes, labels,
input_size [H, W], batch (int or "dynamic"), precision, preprocessing, weights {name, sha256, format,
shipped}, versions, created, stage_outputs (name -> tensor name inside the artifact, for localization),
and parity (filled after the check).
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .backends import version_of
from .errors import ArtifactError

SCHEMA = "mixformer-deploy/manifest/1"
EMBED_KEY = "mixformer_deploy.manifest"


def tool_versions(*dists: str) -> dict:
    out = {"mixformer-deploy": __version__, "python": platform.python_version()}
    for d in ("torch", "numpy", *dists):
        out[d] = version_of(d)
    return out


def sidecar_path(artifact: str | Path) -> Path:
    p = Path(artifact)
    return p.with_name(p.name + ".json")


def artifact_name(variant: str, height: int, width: int, batch: int | None, precision: str, suffix: str) -> str:
    """DESIGN's contract: mixformer-{variant}-{H}x{W}-{b<N>|dyn}-{precision}{suffix}."""
    b = "dyn" if batch is None else f"b{batch}"
    return f"mixformer-{variant.lower()}-{height}x{width}-{b}-{precision}{suffix}"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def write_json_atomic(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(artifact: str | Path) -> dict:
    """The artifact's manifest: the embedded copy when the format has one, else the sidecar."""
    from .targets import target_for_file

    artifact = Path(artifact)
    if not artifact.is_file():
        raise ArtifactError(f"artifact not found: {artifact}")
    target = target_for_file(artifact)
    embedded = target.read_embedded(artifact) if target else None
    if embedded:
        return embedded
    side = sidecar_path(artifact)
    if side.is_file():
        try:
            data = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{side.name}: unreadable manifest ({e})") from e
        if data.get("schema") == SCHEMA:
            return data
    raise ArtifactError(f"{artifact.name}: no mixformer-deploy manifest (neither embedded nor a .json sidecar)")
