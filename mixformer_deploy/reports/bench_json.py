"""The benchmark result document, schema ``mixformer-deploy/bench/1`` (described in benchmarks/SCHEMA.md).

One document is one run on one machine: the environment, a machine fingerprint whose slug names result
files, what each artifact is, the FLOP-floor inputs, and per (artifact, batch) statistics with the raw
samples. Timings are only ever compared within a fingerprint.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

from .. import __version__
from ..errors import InputFileError

SCHEMA = "mixformer-deploy/bench/1"

# keys every document, environment, artifact and result row carries (validate() checks them)
DOC_KEYS = ("schema", "created", "tool", "machine", "environment", "settings", "floor", "artifacts", "results",
            "skipped", "warnings")
ENV_KEYS = ("cpu_model", "cores", "threads", "memory_bytes", "gpu", "os", "python", "backends", "tool_version")
MACHINE_KEYS = ("cpu_model", "cores", "threads", "gpu", "slug")
ARTIFACT_KEYS = ("name", "role", "path", "runtime", "device", "precision", "size_bytes", "load_ms",
                 "peak_rss_bytes", "manifest")
MANIFEST_KEYS = ("variant", "input_size", "precision", "batch", "weights_sha256")
RESULT_KEYS = ("artifact", "role", "runtime", "device", "precision", "form", "variant", "input_size", "batch",
               "first_inference_ms", "iterations", "latency_ms", "cv", "throughput_ips", "peak_rss_bytes",
               "ratio_to_first", "ratio_to_reference", "floor_ms", "floor_fraction", "warnings", "samples_ms")
LATENCY_KEYS = ("p50", "p90", "p95", "p99", "mean", "std", "min", "max")


# ---------------------------------------------------------------- environment and fingerprint

def _fallback_hardware() -> dict:
    """Until/unless mixformer_deploy.environment is importable: the few facts the schema needs."""
    cpu = platform.processor() or platform.machine() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"cpu": cpu, "usable_cpus": usable, "logical_cores": os.cpu_count(), "memory_bytes": None,
            "os": platform.platform(), "python": platform.python_version(), "gpus": []}


def _fallback_backends() -> dict:
    from ..optional import version_of
    return {k: {"version": version_of(d)} for k, d in
            (("torch", "torch"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("numpy", "numpy"))}


def environment(device: str = "cpu", threads: int | None = None) -> dict:
    """CPU/GPU model, cores, threads used, memory, OS, Python, backend versions, this tool's version."""
    try:
        from .. import environment as env_module
        hw, backends = env_module.hardware(), env_module.backends_status()
    except ImportError:
        hw, backends = _fallback_hardware(), _fallback_backends()
    gpus = hw.get("gpus") or []
    gpu = None
    if device.startswith("cuda") and gpus:
        index = int(device.split(":")[1]) if ":" in device else 0
        g = gpus[min(index, len(gpus) - 1)]
        gpu = {"model": g.get("name"), "driver": g.get("driver"), "memory_bytes": g.get("memory_bytes"),
               "cuda": g.get("cuda")}
    from ..optional import version_of
    versions = {k: (v.get("version") if isinstance(v, dict) else v) for k, v in backends.items()}
    versions.setdefault("numpy", version_of("numpy"))
    return {
        "cpu_model": hw.get("cpu") or "unknown", "cores": hw.get("usable_cpus") or hw.get("logical_cores"),
        "physical_cores": hw.get("physical_cores"), "threads": threads, "memory_bytes": hw.get("memory_bytes"),
        "gpu": gpu, "os": hw.get("os"), "python": hw.get("python"), "backends": versions,
        "tool_version": __version__, "device": device,
    }


def _slug_part(text: str) -> str:
    s = text.lower()
    s = re.sub(r"\((r|tm|c)\)|\bprocessor\b|\bcpu\b|@.*$|\b\d+-core\b|\bnvidia\b|\bgeforce\b", " ", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def fingerprint(env: dict) -> dict:
    """The machine as far as timings care: CPU model, usable cores, threads used (and the GPU if one ran).

    The slug names result files, e.g. ``amd-epyc-7b13-2c-2t`` or ``...-h100-80gb-hbm3``.
    """
    gpu = (env.get("gpu") or {}).get("model")
    slug = f"{_slug_part(env['cpu_model'])}-{env['cores']}c-{env['threads']}t"
    if gpu:
        slug += f"-{_slug_part(gpu)}"
    return {"cpu_model": env["cpu_model"], "cores": env["cores"], "threads": env["threads"], "gpu": gpu,
            "slug": slug}


def build_document(*, artifacts: list, results: list, skipped: list, settings: dict, floor: dict | None,
                   device: str, threads: int, notes: list[str] = ()) -> dict:
    from ..manifest import now_iso

    env = environment(device, threads)
    warnings = list(notes) + [w for r in results for w in r["warnings"]] + [
        f"skipped {s['artifact']} at batch {s['batch']}: {s['reason']}" for s in skipped]
    return {"schema": SCHEMA, "created": now_iso(), "tool": {"name": "mixformer-deploy", "version": __version__},
            "machine": fingerprint(env), "environment": env, "settings": settings, "floor": floor,
            "artifacts": artifacts, "results": results, "skipped": skipped, "warnings": warnings}


# ---------------------------------------------------------------- reading, writing, checking

def validate(doc: dict) -> list[str]:
    """What is missing from a document (empty when it follows the schema)."""
    problems = [f"missing {k}" for k in DOC_KEYS if k not in doc]
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, not {SCHEMA!r}")
    problems += [f"environment: missing {k}" for k in ENV_KEYS if k not in (doc.get("environment") or {})]
    problems += [f"machine: missing {k}" for k in MACHINE_KEYS if k not in (doc.get("machine") or {})]
    for a in doc.get("artifacts") or []:
        problems += [f"artifact {a.get('name')}: missing {k}" for k in ARTIFACT_KEYS if k not in a]
        problems += [f"artifact {a.get('name')}: manifest missing {k}" for k in MANIFEST_KEYS
                     if k not in (a.get("manifest") or {})]
    for r in doc.get("results") or []:
        problems += [f"result {r.get('artifact')}: missing {k}" for k in RESULT_KEYS if k not in r]
        problems += [f"result {r.get('artifact')}: latency_ms missing {k}" for k in LATENCY_KEYS
                     if k not in (r.get("latency_ms") or {})]
    return problems


def read_results(path: str | Path) -> dict:
    """A result file, checked against the schema (a missing, unreadable or foreign file: exit 4)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"result file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputFileError(f"{path.name}: not a readable JSON file ({e})") from e
    if not isinstance(doc, dict):
        raise InputFileError(f"{path.name}: not a {SCHEMA} document")
    problems = validate(doc)
    if problems:
        raise InputFileError(f"{path.name}: not a {SCHEMA} document ({'; '.join(problems[:3])})")
    return doc


def write_results(path: str | Path, doc: dict) -> Path:
    from ..artifact import write_json_atomic
    return write_json_atomic(path, doc)


def merge(docs: list[dict]) -> dict:
    """Several runs of one machine (e.g. one per variant of a suite) as one document. Timings of
    different runs were not interleaved with each other: ratios stay within their own run."""
    if not docs:
        raise ValueError("nothing to merge")
    slugs = {d["machine"]["slug"] for d in docs}
    if len(slugs) > 1:
        raise ValueError(f"refusing to merge runs of different machines: {', '.join(sorted(slugs))}")
    out = {**docs[0], "artifacts": [], "results": [], "skipped": [], "warnings": [], "runs": len(docs)}
    floors = []
    for run, d in enumerate(docs):
        out["artifacts"] += [{**a, "run": run} for a in d["artifacts"]]
        out["results"] += [{**r, "run": run} for r in d["results"]]
        out["skipped"] += d["skipped"]
        out["warnings"] += d["warnings"]
        if d.get("floor"):
            floors.append(d["floor"])
    if floors:
        out["floor"] = {"matmul": floors[0]["matmul"], "matmul_runs": [f["matmul"] for f in floors],
                        "macs_per_image": {k: v for f in floors for k, v in f["macs_per_image"].items()}}
    return out
