"""`debug`: where an artifact's error comes from, block by block and branch by branch (docs/debug.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import CheckpointError, GateError
from ..backends.runner import parse_runtime_options
from .app import app, console as make_console
from .bench_cmd import RUNTIME_OPTION_HELP

PANEL = "Verify"


class DivergenceFound(GateError):
    """A block exceeds its budget (exit 1): the verdict line is the message."""


def _stage_of(name: str) -> str:
    """'stages.2.1' and 'merges.2' -> 'stage 2'; the stem and the outputs stay themselves."""
    parts = name.split(".")
    return f"stage {parts[1]}" if parts[0] in ("stages", "merges") else name


def _stage_rows(report) -> list[tuple[str, str, object]]:
    """(point, reference, its error): one row per stage (its worst point), every point of the failing
    stage, the failing block's branches under it."""
    failing = _stage_of(report.first_block) if report.first_block else None
    rows, seen = [], {}
    for p in report.blocks + report.outputs:
        stage = _stage_of(p.name)
        if stage == failing:
            rows.append((p.name, p.reference, p))
            if p.name == report.first_block:
                rows += [(f"  {b.name[len(p.name) + 1:]}", f"  {b.reference[len(p.reference) + 1:]}", b)
                         for b in report.branches]
        elif stage in seen:
            i = seen[stage]
            if p.exceeded or (p.rel_l2 > rows[i][2].rel_l2 and not rows[i][2].exceeded):
                rows[i] = rows[i][:2] + (p,)
        else:
            seen[stage] = len(rows)
            rows.append((stage.replace("stage ", "stages."), stage.replace("stage ", "layers."), p)
                        if stage.startswith("stage ") else (p.name, p.reference, p))
    return rows


def _table(report) -> Table:
    table = Table(title=f"error curve: {Path(report.artifact).name} on {report.runtime.get('runtime')} "
                        f"({report.precision}) vs PyTorch float32", title_justify="left")
    for name in ("point", "reference", "rel L2", "worst cos", "budget", ""):
        left = name in ("point", "reference", "")
        table.add_column(name, justify="left" if left else "right", no_wrap=not left, overflow="fold",
                         min_width=None if left else 8)
    for label, reference, p in _stage_rows(report):
        table.add_row(label, reference, f"{p.rel_l2:.2e}", f"{p.worst_cosine:.5f}", f"{p.budget:.1e}",
                      "[red]exceeds[/red]" if p.exceeded else "")
    return table


@app.command(rich_help_panel=PANEL)
def debug(
    artifact: Annotated[Path, typer.Argument(help="The artifact to investigate.", show_default=False)],
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", help="Reference weights (as for parity). Default: the shipped or seeded weights the "
                                "manifest records.")] = None,
    artifact_weights: Annotated[Optional[Path], typer.Option(
        "--artifact-weights", help="The weights the artifact was exported from, when they are not --weights "
                                   "(the probe is exported from them).")] = None,
    inputs: Annotated[Optional[list[str]], typer.Option(
        "--inputs", "-i", help="photos, random, dataset or an image folder; repeat for several. Default: as parity.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="The int8 calibration images, where they are not the recorded ones.")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads of the runtime.")] = None,
    runtime_option: Annotated[Optional[list[str]], typer.Option("--runtime-option", "-O", help=RUNTIME_OPTION_HELP)] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
):
    """Name the first block (then branch) whose error exceeds its budget, on the artifact's own runtime:
    exit 0 no divergence, 1 divergence named, 3 runtime missing here, 4 bad artifact."""
    from ..artifact import write_json_atomic
    from ..debug import debug_artifact

    for path in (weights, artifact_weights):
        if path is not None and not path.is_file():
            raise CheckpointError(f"weights not found: {path}")
    report = debug_artifact(artifact, weights=weights, artifact_weights=artifact_weights, inputs=inputs,
                            calibration=calibration, runtime_options=parse_runtime_options(runtime_option),
                            threads=threads)
    print_debug_report(report)
    if json_out:
        write_json_atomic(json_out, report.to_dict())
    if report.diverged:
        raise DivergenceFound(report.verdict())


def print_debug_report(report) -> None:
    console = make_console()
    console.print(_table(report))
    console.print(f"budget: rel L2 <= {report.budget_rule['growth']:g} x the error entering the point + "
                  f"{report.budget_rule['local']:g} ({report.precision}); probe vs artifact outputs: "
                  f"rel L2 {report.probe_vs_artifact:.3g}; {report.exports} probe export(s)")
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(report.verdict(), markup=False, highlight=False)
