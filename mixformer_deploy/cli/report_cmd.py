"""`report`: merge benchmark results from several machines and devices into one readable page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app

PANEL = "Measure"


@app.command("report", rich_help_panel=PANEL)
def report(
    results: Annotated[list[Path], typer.Argument(help="Result files written by `bench --json` (schema mixformer-deploy/bench/1), or a benchmark script's mobile-bench/1, openvino-bench/1 or backbone-bench/1 file (its runs are read).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="report.md (Markdown) or report.html; PNG plots are written beside it.")] = Path("report.md"),
    comparison: Annotated[Optional[Path], typer.Option("--comparison", help="Also write the comparison table alone as Markdown (e.g. for a CI job summary).")] = None,
):
    """Merge benchmark results into one report: with several results, a comparison table with one row per
    (machine, artifact) and each file's machine facts (CPU/GPU/SoC, OS, runtime versions); a section per
    machine with its environment and a results table; and PNG plots (latency distributions from the raw
    samples, latency against batch size, speed-up against the reference or first artifact). Needs the plot
    extra (matplotlib). A file of any other schema is refused (exit 4).

    The last line printed is the report's path.
    """
    from ..artifact import atomic_file
    from ..reports import write_bench_report
    from ..reports.fleet import comparison_markdown, read_fleet_results

    docs = [doc for p in results for doc in read_fleet_results(p)]
    out, plots = write_bench_report(docs, output)
    for p in plots.values():
        typer.echo(f"wrote {p}")
    if comparison is not None:
        with atomic_file(comparison) as tmp:
            tmp.write_text(comparison_markdown(docs))
        typer.echo(f"wrote {comparison}")
    typer.echo(str(out))
