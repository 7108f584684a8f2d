"""An artifact: a file or a directory that one target wrote, with its manifest (embedded and/or the sidecar
``<name>.json`` beside it).

Why a concept of its own: export, parity, bench, predict and inspect all need the same answers - which
target wrote it (read from the manifest, the suffix only as a fallback, so two targets may share one),
how many bytes it is (every file, external data included), and how it appears under its final name
complete or not at all (built under a temporary name that carries the writer's pid, renamed whole).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ArtifactError

log = logging.getLogger(__name__)

SCHEMA = "mixformer-deploy/manifest/1"
TMP_MARK = ".partial"


def sha256_file(path: str | Path) -> str:
    """A file's sha256, read in 1 MiB chunks (weights files, an artifact's weight blobs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(artifact: str | Path) -> Path:
    p = Path(artifact)
    return p.with_name(p.name + ".json")


def temp_path(final: Path) -> Path:
    """A temporary name beside ``final`` (same filesystem, so the rename is atomic), unique per process:
    ``.<name>.<pid>.partial<suffix>``, the one pattern every atomic writer uses and the cleanup parses."""
    return final.with_name(f".{final.name}.{os.getpid()}{TMP_MARK}{''.join(final.suffixes[-1:])}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_pid(rest: str) -> int | None:
    """The writer's pid in a temporary's name after ``.<final name>.``: the number just before ``.partial``
    wherever it sits (``<pid>.partial.onnx``, a sidecar's ``json.<pid>.partial.json``, ``<pid>.old.partial``)."""
    parts = rest.split(".")
    if TMP_MARK[1:] not in parts:
        return None
    digits = [x for x in parts[:parts.index(TMP_MARK[1:])] if x.isdigit()]
    return int(digits[-1]) if digits else None


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Temporaries of ``final`` and of its sidecar whose writer process is gone (killed mid-export); live
    writers' stay."""
    removed = []
    prefix = f".{final.name}."
    for p in final.parent.glob(f".{final.name}.*"):
        pid = _writer_pid(p.name[len(prefix):])
        if pid is None or _pid_alive(pid):
            continue
        remove(p)
        removed.append(p)
    return removed


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C held until the block ends, then raised: an artifact and its sidecar (a directory's swap
    too) are published together or not at all. Only the main thread receives signals."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def publish(tmp: Path, final: Path) -> None:
    """Move a finished artifact to its final name. A file replaces atomically; a directory is renamed
    whole, the earlier one first moved aside under a temporary name and removed after."""
    if not tmp.is_dir():
        os.replace(tmp, final)
        return
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.{os.getpid()}.old{TMP_MARK}")
        remove(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    if aside is not None:
        remove(aside)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """The temporary to write ``path``'s content to (temp_path: carries the pid, so a killed writer's is
    cleaned up); renamed to ``path`` when the block ends without error, never left behind by a failed write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: dict) -> Path:
    with atomic_file(path) as tmp:
        write_json(tmp, data)
    return Path(path)


def read_sidecar(artifact: Path) -> dict | None:
    side = sidecar_path(artifact)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{side.name}: unreadable manifest ({type(e).__name__})") from e
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def resolve_artifact(path: str | Path) -> Path:
    """A file inside a directory artifact (an OpenVINO IR's model.xml, what OpenVINO users call "the IR")
    stands for that directory: every reader takes the directory. Anything else is returned unchanged."""
    from .backends import all_specs

    path = Path(path)
    parent = path.parent
    if path.is_file() and any(s.is_dir and s.owns(parent) for s in all_specs(exporting=True)):
        log.info("%s is a file of the artifact %s: reading the artifact", path.name, parent.name)
        return parent
    return path


def target_of(artifact: str | Path):
    """The spec of the backend that wrote ``artifact``: the manifest's ``target`` (sidecar first: cheap),
    else the first backend whose suffix fits and whose reader finds an embedded manifest, else by suffix
    alone. Reads specs only: no exporter is imported."""
    from .backends import all_specs

    specs = {s.key: s for s in all_specs(exporting=True)}
    artifact = Path(artifact)
    side = read_sidecar(artifact)
    if side and side.get("target") in specs:
        return specs[side["target"]]
    fits = [s for s in specs.values() if s.owns(artifact)]
    for s in fits:
        try:
            embedded = s.read_embedded(artifact)
        except (ArtifactError, ImportError):
            continue
        if embedded and embedded.get("target") in specs:
            return specs[embedded["target"]]
    return fits[0] if fits else None


def read_manifest(artifact: str | Path) -> dict:
    """The artifact's manifest: the embedded copy when the format has one, else the sidecar."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise ArtifactError(f"artifact not found: {artifact}")
    target = target_of(artifact)
    embedded = target.read_embedded(artifact) if target else None
    if embedded:
        return embedded
    side = read_sidecar(artifact)
    if side:
        return side
    raise ArtifactError(f"{artifact.name}: no mixformer-deploy manifest (neither embedded nor a .json sidecar)")


def files_of(artifact: str | Path) -> list[Path]:
    """Every file of the artifact (external data and a directory's tree included), not the sidecar."""
    artifact = Path(artifact)
    target = target_of(artifact) if artifact.exists() else None
    if target is not None:
        return target.files(artifact)
    if artifact.is_dir():
        return sorted(f for f in artifact.rglob("*") if f.is_file())
    return [artifact] if artifact.is_file() else []


def size_bytes(artifact: str | Path) -> int:
    return sum(f.stat().st_size for f in files_of(artifact))
