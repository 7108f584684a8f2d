"""ncnn: Tencent's inference runtime for phones, ARM Linux and single-board computers.

The artifact is a directory ``<name>.ncnn/`` holding pnnx's ``model.ncnn.param`` (the graph, text) and
``model.ncnn.bin`` (the weights), and ``manifest.json``: the param/bin pair has no metadata slot, so the
manifest is embedded as a file of the directory.
"""

from __future__ import annotations

from pathlib import Path

from ...artifact import sha256_file
from ...errors import ArtifactError
from ...manifest import parse_embedded
from ..spec import FP16, FP32, BackendSpec

PARAM, BIN, MANIFEST = "model.ncnn.param", "model.ncnn.bin", "manifest.json"
INPUT_BLOB = "in0"   # pnnx's names: the input in0, the outputs out0, out1, ... in the module's order


def output_blob(i: int) -> str:
    return f"out{i}"


def artifact_files(path: Path) -> tuple[Path, Path]:
    """The param and bin files of an ncnn artifact; ArtifactError naming what is missing or garbled."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path.name}: not an ncnn artifact (a directory with {PARAM} and {BIN})")
    param, weights = path / PARAM, path / BIN
    for f in (param, weights):
        if not f.is_file() or f.stat().st_size == 0:
            raise ArtifactError(f"{path.name}: {f.name} is missing or empty")
    with open(param, "rb") as fh:
        magic = fh.readline().strip()
    if magic != b"7767517":
        raise ArtifactError(f"{path.name}: {PARAM} is not an ncnn param file (bad magic)")
    return param, weights


def check_weights(path: Path) -> None:
    """The .bin is the one the export wrote: its sha256 is in the manifest (ncnn reads a truncated or
    altered .bin without complaint)."""
    _, weights = artifact_files(path)
    recorded = ((embedded_manifest(path) or {}).get("ncnn") or {}).get("bin_sha256")
    if recorded and sha256_file(weights) != recorded:
        raise ArtifactError(f"{Path(path).name}: {BIN} does not match its manifest's sha256 (truncated or altered)")


def embedded_manifest(path: Path) -> dict | None:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        return parse_embedded(f.read_text(), path.name)
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{Path(path).name}: unreadable {MANIFEST} ({type(e).__name__})") from e


def param_ops(param: Path) -> dict[str, int]:
    """Layer type -> count, from the param file's layer lines (``Type name inputs outputs ...``)."""
    counts: dict[str, int] = {}
    lines = param.read_text().splitlines()[2:]
    for line in lines:
        if line.strip():
            kind = line.split()[0]
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


class NcnnSpec(BackendSpec):
    key = "ncnn"
    suffix = ".ncnn"
    is_dir = True
    extra = "ncnn"
    runtime = "ncnn"
    runners = {"ncnn": "NcnnRunner"}
    exporter_name = "NcnnExporter"
    precisions = ("fp32", "fp16")
    tolerances = {"fp32": FP32, "fp16": FP16}
    versions = ("ncnn", "pnnx")
    description = "ncnn (pnnx conversion; phones, ARM Linux, Raspberry Pi)"
    title = "ncnn"
    runs_here = "ncnn (fp16: weights stored in half precision; x86 computes in fp32)"
    verified = "Linux x86 CPU"
    capabilities = frozenset({"reproducible", "backbone", "inspect", "embedded_manifest", "fp16", "checksum"})

    def read_embedded(self, path: Path) -> dict | None:
        return embedded_manifest(path)

    def verify(self, path: Path) -> None:
        check_weights(path)

    def inspect(self, path: Path) -> dict:
        check_weights(path)
        param, _ = artifact_files(path)
        ops = param_ops(param)
        manifest = embedded_manifest(path) or {}
        net = manifest.get("ncnn") or {}
        outputs = [{"name": b, "dtype": "fp32", "shape": s}
                   for b, s in zip(net.get("output_blobs") or [], net.get("output_shapes") or [])]
        return {"format": "ncnn", "inputs": [{"name": INPUT_BLOB, "dtype": "fp32", "shape": net.get("input_shape")}],
                "outputs": outputs, "ops": ops, "nodes": sum(ops.values()), "max_rank": 4,
                # ncnn computes in float32 unless the CPU has fp16 arithmetic (ARMv8.2) and the net opts in
                "precisions": {"fp32": sum(ops.values())}, "kept_fp32": [],
                "note": "weights stored in fp16, arithmetic in fp32 (fp16 where the CPU has fp16 arithmetic); "
                        "per-layer float32 keeps are not expressible in ncnn's param format"
                if manifest.get("precision") == "fp16" else None}


SPEC = NcnnSpec()
