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

from . import __version__
from .artifact import SCHEMA  # noqa: F401 (re-exported: the manifest schema, defined with the artifact)
from .optional import version_of
from .errors import ArtifactError, one_line

EMBED_KEY = "mixformer_deploy.manifest"


def parse_embedded(text: str | bytes | None, name: str) -> dict | None:
    """The text a format embeds under EMBED_KEY -> the manifest (None when absent or not an object); text that
    is not JSON is a bad artifact. One parser for every format's reader."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:   # UnicodeDecodeError included
        raise ArtifactError(f"{name}: its embedded manifest is not JSON ({one_line(e, 120)})") from e
    return data if isinstance(data, dict) else None


def tool_versions(*dists: str) -> dict:
    out = {"mixformer-deploy": __version__, "python": platform.python_version()}
    for d in ("torch", "numpy", *dists):
        out[d] = version_of(d)
    return out


def artifact_name(variant: str, height: int, width: int, batch: int | None, precision: str, suffix: str,
                  backbone: bool = False) -> str:
    """DESIGN's contract: mixformer-{variant}-{H}x{W}-{b<N>|dyn}-{precision}{suffix}; a backbone (no
    classifier, feature maps out) adds -backbone before the suffix."""
    b = "dyn" if batch is None else f"b{batch}"
    return f"mixformer-{variant.lower()}-{height}x{width}-{b}-{precision}{'-backbone' if backbone else ''}{suffix}"


def now_iso() -> str:
    """UTC now, or SOURCE_DATE_EPOCH when set (reproducible builds: same inputs, same bytes)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return when.replace(microsecond=0).isoformat()


