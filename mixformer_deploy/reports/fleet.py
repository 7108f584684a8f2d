"""A fleet's benchmark results side by side: which files ``report`` reads, and the comparison table with one
row per (machine, artifact) across every file, each row carrying its own file's machine facts.

Timings are still never compared across machines by the tool: the table puts them beside each other so a
reader sees which machine, OS and runtime version each number came from. A result marked replayed (its
``provenance``, e.g. a phone document made by replaying a tool's documented output) says so in every row.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputFileError
from .bench_json import SCHEMA, read_results, validate

# The benchmark scripts' own documents whose ``runs`` are bench/1 documents: report reads those runs.
WRAPPERS = ("mixformer-deploy/mobile-bench/1", "mixformer-deploy/openvino-bench/1",
            "mixformer-deploy/backbone-bench/1")
# Known documents with no bench/1 runs inside: refused, with where their timings are.
NO_TIMINGS = {
    "mixformer-deploy/gpu-check/1": "its timings are the bench-<machine>.json written beside it",
    "mixformer-deploy/tensorrt-onnx/1": "it records graph facts and parity, no timings",
}
HEADERS = ("Machine", "CPU / SoC", "GPU", "OS", "Artifact", "Runtime", "Device", "Precision", "Batch",
           "p50 ms", "images/s", "Source")


def read_fleet_results(path: str | Path) -> list[dict]:
    """The bench/1 documents in one result file: the file itself, or a benchmark script's runs.

    A schema other than bench/1 or the known wrappers is refused (InputFileError: exit 4, one line), so a
    document the report would misread never reaches a table."""
    path = Path(path)
    schema = _schema_of(path)
    if schema in WRAPPERS:
        return _unwrap(path)
    if schema in NO_TIMINGS:
        raise InputFileError(f"{path.name}: a {schema} document, not {SCHEMA}: {NO_TIMINGS[schema]}")
    return [read_results(path)]


def _schema_of(path: Path) -> str | None:
    """The file's schema, or None when it is not a readable JSON object (read_results then says why)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc.get("schema") if isinstance(doc, dict) else None


def _unwrap(path: Path) -> list[dict]:
    """A wrapper's runs, each checked as a bench/1 document (a run that is not: exit 4)."""
    runs = json.loads(path.read_text()).get("runs")
    if not isinstance(runs, list) or not runs:
        raise InputFileError(f"{path.name}: no runs to report")
    for i, run in enumerate(runs):
        problems = validate(run) if isinstance(run, dict) else ["not an object"]
        if problems:
            raise InputFileError(f"{path.name}: run {i} is not a {SCHEMA} document ({'; '.join(problems[:3])})")
    return runs


# ---------------------------------------------------------------- the comparison table

def provenance(doc: dict) -> str:
    """'measured' unless the document says otherwise (a replayed phone run: 'replayed')."""
    p = doc.get("provenance")
    return (p.get("kind") if isinstance(p, dict) else p) or "measured"


def machine_facts(doc: dict) -> dict[str, str]:
    """CPU or SoC (with cores), GPU (with driver and CUDA) and OS of the machine one file was recorded on."""
    env = doc["environment"]
    gpu = env.get("gpu") or {}
    gpu_text = "–"
    if gpu.get("model"):
        extra = ", ".join(f"{k} {gpu[k]}" for k in ("driver", "cuda") if gpu.get(k))
        gpu_text = gpu["model"] + (f" ({extra})" if extra else "")
    cores = env.get("cores")
    cpu = env["cpu_model"] + (f", {cores} cores" if cores else "")
    return {"cpu": cpu, "gpu": gpu_text, "os": env.get("os") or "–"}


def runtime_version(doc: dict, runtime: str) -> str | None:
    """The runtime's version from the file's environment (AOTInductor is torch's when not recorded apart)."""
    backends = doc["environment"].get("backends") or {}
    version = backends.get(runtime)
    if version is None and runtime == "aoti":
        version = backends.get("torch")
    return version


def _rows_by_artifact(doc: dict) -> dict[str, list[dict]]:
    """The document's result rows grouped by artifact, in the order they were timed."""
    out: dict[str, list[dict]] = {}
    for r in doc["results"]:
        key = r["artifact"] if "run" not in r else f"{r['artifact']}\0{r['run']}"
        out.setdefault(key, []).append(r)
    return out


def _cell(values: list) -> str:
    """Several batch sizes' values in one cell, in batch order: '16.3 / 1405' (3 significant digits, no
    exponent)."""
    return " / ".join("–" if v is None else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}" for v in values)


def comparison_rows(docs: list[dict]) -> list[list[str]]:
    """One row per (machine, artifact) in every document: facts of the row's own file, p50 and throughput
    per batch size (several batch sizes share a cell, separated by '/')."""
    rows = []
    for doc in docs:
        facts, source = machine_facts(doc), provenance(doc)
        for results in _rows_by_artifact(doc).values():
            results = sorted(results, key=lambda r: r["batch"])
            first = results[0]
            version = runtime_version(doc, first["runtime"])
            runtime = first["runtime"] + (f" {version}" if version else "") + (
                f" ({first['form']})" if first.get("form") else "")
            rows.append([doc["machine"]["slug"], facts["cpu"], facts["gpu"], facts["os"], first["artifact"],
                         runtime, first.get("device") or "–", first.get("precision") or "–",
                         " / ".join(str(r["batch"]) for r in results),
                         _cell([r["latency_ms"].get("p50") for r in results]),
                         _cell([r.get("throughput_ips") for r in results]), source])
    return rows


def comparison(docs: list[dict]) -> dict:
    """The comparison table as headers and rows, sorted by machine (file order kept within a machine)."""
    order = list(dict.fromkeys(d["machine"]["slug"] for d in docs))
    rows = sorted(comparison_rows(docs), key=lambda r: order.index(r[0]))
    return {"headers": list(HEADERS), "rows": rows}


COMPARISON_INTRO = ("One row per machine and artifact (per run, when a file holds several runs) across every "
                    "result file, each with its own file's "
                    "machine facts; batch sizes share a cell (`1 / 8`). Rows of different machines sit side "
                    "by side for reading, not for ratios: each machine's own section below has those. "
                    "*replayed* rows replay a tool's documented output: not a measurement.")


def comparison_markdown(docs: list[dict]) -> str:
    """The comparison table as Markdown, under the report's title (level 3: the level-2 sections are the
    machines) or alone in a CI job summary."""
    from .markdown import _table

    table = comparison(docs)
    return "\n".join(["### Machines side by side", "", COMPARISON_INTRO, "",
                      *_table(table["headers"], table["rows"]), ""])
