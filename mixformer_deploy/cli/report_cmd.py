"""`report`: merge benchmark results from several machines and devices into one readable page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app

PANEL = "Measure"


@app.command("report", rich_help_panel=PANEL)
def report(
    results: Annotated[list[Path], typer.Argument(help="Result files written by `bench --json` (schema mixformer-deploy/bench/1).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="report.md (Markdown) or report.html; PNG plots are written beside it.")] = Path("report.md"),
):
    """Merge benchmark results into one report: a section per machine with its environment and a results
    table, and PNG plots (latency distributions from the raw samples, latency against batch size, speed-up
    against the reference or first artifact). Needs the plot extra (matplotlib).

    The last line printed is the report's path.
    """
    from ..reports import write_bench_report
    from ..reports.bench_json import read_results

    docs = [read_results(p) for p in results]
    out, plots = write_bench_report(docs, output)
    for p in plots.values():
        typer.echo(f"wrote {p}")
    typer.echo(str(out))
