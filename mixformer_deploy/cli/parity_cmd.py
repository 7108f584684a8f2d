"""`parity` (is the artifact the reference function?) and `predict` (what does it say about my images?)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import CheckpointError, ParityError, UsageError
from ..backends.runner import parse_runtime_options
from .app import app, console as make_console
from .bench_cmd import RUNTIME_OPTION_HELP

PANEL = "Verify"


def _console() -> Console:
    return make_console()


def _num(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


SET_LABEL_MAX = 12  # a longer input-set name (an image folder's path) is "set N" in the table, named below it
METRICS = (
    ("inputs", lambda m: str(m.count)),
    ("max |a-r|", lambda m: _num(m.max_abs)),
    ("mean |a-r|", lambda m: _num(m.mean_abs)),
    ("relative L2", lambda m: _num(m.rel_l2)),
    ("cosine", lambda m: _num(m.cosine, ".8f")),
    ("min per-input cosine", lambda m: _num(m.min_sample_cosine, ".8f")),
    ("top-1 agreement", lambda m: _pct(m.top1_agreement)),
    ("top-5 agreement", lambda m: _pct(m.top5_agreement)),
    ("accuracy artifact", lambda m: _pct(m.accuracy_artifact)),
    ("accuracy reference", lambda m: _pct(m.accuracy_reference)),
    ("within max-abs bound", lambda m: "yes" if m.max_abs_ok else "[red]no[/red]"),
)


def set_labels(names) -> tuple[list[str], list[str]]:
    """Column labels for input sets: a name that is short stays; a long one (a folder's path) becomes
    'set N', with a legend line 'set N: <name>', so that no header is cut and two folders stay apart."""
    labels, legend = [], []
    for name in names:
        if len(name) <= SET_LABEL_MAX and "/" not in name and name not in labels:
            labels.append(name)
        else:
            labels.append(f"set {len(legend) + 1}")
            legend.append(f"{labels[-1]}: {name}")
    return labels, legend


def _metric_rows(report, cols: dict) -> list[tuple[str, list[str]]]:
    """(metric, one cell per input set): the metrics that apply (no top-k for feature maps, accuracy only
    where a set is labelled)."""
    out = []
    for label, cell in METRICS:
        if label.startswith("accuracy") and all(m.accuracy_reference is None for m in cols.values()):
            continue
        if report.outputs and label.startswith("top-"):  # feature maps have no classes
            continue
        out.append((label, [cell(m) for m in cols.values()]))
    return out


def _metrics_tables(report, width: int = 100) -> tuple[list[Table], list[str]]:
    """Metrics as rows and input sets as columns; as many tables as it takes for every column to keep its
    whole header and numbers at ``width`` (each repeats the metric column), and the set-name legend."""
    backbone = bool(report.outputs)
    cols = dict(report.outputs) if backbone else {**report.sets, "all inputs": report.overall}
    labels, legend = set_labels(list(cols))
    rows = _metric_rows(report, cols)
    plain = lambda text: Text.from_markup(text).plain  # noqa: E731
    first = max(len(label) for label, _ in rows) + 3    # its padding and left border
    widths = [max([len(labels[i])] + [len(plain(cells[i])) for _, cells in rows]) + 3 for i in range(len(cols))]
    chunks, start, used = [], 0, first + 1
    for i, w in enumerate(widths):
        if i > start and used + w > width:
            chunks.append(range(start, i))
            start, used = i, first + 1
        used += w
    chunks.append(range(start, len(cols)))
    title = ("feature maps (all inputs)" if backbone else "logits") + ": artifact vs PyTorch float32 reference"
    tables = []
    for n, chunk in enumerate(chunks):
        table = Table(title=title if n == 0 else None, title_justify="left")
        table.add_column("metric", no_wrap=True)
        for i in chunk:
            table.add_column(labels[i], justify="right", no_wrap=True)
        for label, cells in rows:
            table.add_row(label, *(cells[i] for i in chunk))
        tables.append(table)
    return tables, legend


def _stage_table(report) -> Table:
    table = Table(title=f"stages (diverged: relative L2 > {report.stage_tolerance:.3g})", title_justify="left")
    for name in ("stage", "shape", "max |a-r|", "relative L2", "cosine", ""):
        table.add_column(name, justify="left" if name in ("stage", "shape", "") else "right", no_wrap=True)
    for s in report.stages:
        table.add_row(s.name, "x".join(map(str, s.shape)), _num(s.max_abs), _num(s.rel_l2), _num(s.cosine, ".6f"),
                      "[red]diverged[/red]" if s.diverged else "")
    return table


def print_report(report, console: Console) -> None:
    tol, o, rt, ref = report.tolerance, report.overall, report.runtime, report.reference
    ref_name = Path(ref["path"]).name if ref.get("path") else "seeded random weights"
    console.print(f"[bold]{Path(report.artifact).name}[/bold]  runtime {rt.get('runtime')} on {rt.get('device')} "
                  f"({rt.get('precision')})  reference: {ref_name} ({ref['source']}), PyTorch float32")
    top1 = (f"each of the {len(report.outputs)} feature maps on its own" if report.outputs else
            f"top-1 gated on {o.gated} of {o.count} inputs whose margin exceeds their bound")
    console.print(f"rule, per input: max|a-r| <= atol {tol['atol']:g} + rtol {tol['rtol']:g} x max|r| of that input "
                  f"and cosine >= {tol['min_cosine']:g}; {top1}")
    tables, legend = _metrics_tables(report, console.width)
    for table in tables:
        console.print(table)
    for line in legend:  # a path stays whole (copyable), whatever the width
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"observed: max|a-r| {o.max_abs:.3g}, implying rtol {o.implied_rtol:.3g} at atol 0; worst input "
                  f"{o.worst_input_name or o.worst_input} (max|a-r| {o.worst_abs:.3g} vs bound {o.bound:.3g}); "
                  f"lowest cosine {o.largest_min_cosine:.8f}")
    for g in report.accuracy:
        console.print(f"accuracy {g.set}: {g.count - g.artifact_errors}/{g.count} (reference "
                      f"{g.count - g.reference_errors}/{g.count}, {g.extra:+d} misclassified; {g.rule}) "
                      + ("ok" if g.passed else "[red]FAIL[/red]"))
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if report.passed:
        console.print("[bold green]PASS[/bold green]")
        return
    for reason in report.failures:
        console.print(f"[red]-[/red] {reason}")
    if report.stages:
        console.print(_stage_table(report))
    if report.first_failing_stage:
        console.print(f"first diverging stage: [bold]{report.first_failing_stage}[/bold]")
    console.print("[bold red]FAIL[/bold red]")


@app.command(rich_help_panel=PANEL)
def parity(
    artifact: Annotated[Path, typer.Argument(help="The artifact (.onnx, ...) or a weights file.", show_default=False)],
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", help="Reference weights. Default: the shipped weights when the artifact was exported "
                                "from them, else the seeded random model its manifest records.")] = None,
    inputs: Annotated[Optional[list[str]], typer.Option(
        "--inputs", "-i", help="[bold]photos[/bold], [bold]random[/bold], [bold]dataset[/bold] (held-out digits) "
                               "or an image folder; repeat for several. Default: photos + random "
                               "(+ dataset with the shipped weights).")] = None,
    atol: Annotated[Optional[float], typer.Option(min=0.0, help="Absolute tolerance (default: the target's).")] = None,
    rtol: Annotated[Optional[float], typer.Option(min=0.0, help="Relative tolerance, times max|reference|.")] = None,
    min_cosine: Annotated[Optional[float], typer.Option(
        "--min-cosine", min=-1.0, max=1.0, help="Smallest cosine similarity that passes.")] = None,
    runtime: Annotated[str, typer.Option(help="Runtime to run the artifact: auto (the one its manifest names), torch, "
                                              "onnxruntime, ...")] = "auto",
    device: Annotated[str, typer.Option(help="auto (the GPU when the runtime has one here, else cpu), cpu or cuda[:N].")] = "auto",
    threads: Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads of the runtime. Default: the runtime's own (all usable cores).")] = None,
    runtime_option: Annotated[Optional[list[str]], typer.Option("--runtime-option", "-O", help=RUNTIME_OPTION_HELP)] = None,
    accuracy_set: Annotated[Optional[Path], typer.Option("--accuracy-set", help="Gate accuracy on a folder with one sub-folder per class label.")] = None,
    max_accuracy_drop: Annotated[Optional[str], typer.Option("--max-accuracy-drop", help="Extra misclassified images allowed: N or P% (default by precision: int8 3 of the 360 held-out digits or 1% of a folder; fp16/bf16 1 or 0.3%).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the full report as JSON here.")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML here (for CI).")] = None,
    localize: Annotated[bool, typer.Option("--localize", help="On failure, run `debug` on the artifact: the "
                                                              "first block and branch beyond budget (exports probes).")] = False,
):
    """Check that an artifact computes the reference function: exit 0 pass, 1 fail (names the first
    diverging stage), 4 bad artifact or weights."""
    from ..artifact import write_json_atomic
    from ..parity import check_parity
    from ..reports.junit import write_junit

    if weights is not None and not weights.is_file():
        raise CheckpointError(f"weights not found: {weights}")
    report = check_parity(artifact, weights=weights, inputs=inputs, atol=atol, rtol=rtol, min_cosine=min_cosine,
                          runtime=runtime, device=device, threads=threads,
                          runtime_options=parse_runtime_options(runtime_option),
                          accuracy_set=accuracy_set, max_accuracy_drop=max_accuracy_drop)
    print_report(report, _console())
    if json_out:
        write_json_atomic(json_out, report.to_dict())
    if junit:
        write_junit(report, junit)
    if not report.passed:
        where = f"; first diverging stage: {report.first_failing_stage}" if report.first_failing_stage else ""
        if localize:
            where += "; " + _localized(artifact, weights, inputs, threads, runtime_option)
        else:
            where += f"; localize it by block: mixformer-deploy debug {artifact}" + (f" -w {weights}" if weights else "")
        raise ParityError(f"parity failed: {report.failures[0] if report.failures else 'see report'}{where}")


def _localized(artifact: Path, weights, inputs, threads, runtime_option) -> str:
    """``parity --localize``: the debug command's report and verdict. It exports probes, so it imports the
    artifact's exporter (the one exception to "parity imports no exporter")."""
    from ..debug import debug_artifact
    from ..errors import MixformerDeployError
    from .debug_cmd import print_debug_report

    try:
        report = debug_artifact(artifact, weights=weights, inputs=inputs, threads=threads,
                                runtime_options=parse_runtime_options(runtime_option))
    except MixformerDeployError as e:  # the gate's verdict stands; the localization's failure is said
        return f"cannot localize: {e}"
    print_debug_report(report)
    return report.verdict()


# ---------------------------------------------------------------- predict

def _model_source(artifact: Path | None, weights: Path | None) -> Path:
    from ..shipped import DEFAULT_WEIGHTS

    if artifact is not None and weights is not None:
        raise UsageError("give --artifact or --weights, not both")
    if weights is not None or artifact is None:
        path = weights if weights is not None else DEFAULT_WEIGHTS
        if not path.is_file():
            raise CheckpointError(f"weights not found: {path}" + ("" if weights else " (pass --weights or --artifact)"))
        return path
    return artifact


@app.command(rich_help_panel=PANEL)
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files (png, jpg, ...).", show_default=False)],
    artifact: Annotated[Optional[Path], typer.Option("--artifact", "-a", help="An exported artifact.")] = None,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", help="A weights file (default: the shipped weights).")] = None,
    runtime: Annotated[str, typer.Option(help="auto (the one the artifact's manifest names), torch, onnxruntime, ...")] = "auto",
    device: Annotated[str, typer.Option(help="auto (the GPU when the runtime has one here, else cpu), cpu or cuda[:N].")] = "auto",
    threads: Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads of the runtime. Default: the runtime's own (all usable cores).")] = None,
    runtime_option: Annotated[Optional[list[str]], typer.Option("--runtime-option", "-O", help=RUNTIME_OPTION_HELP)] = None,
    top: Annotated[int, typer.Option(min=1, help="How many classes to show per image.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """Classify images with an artifact or weights: top classes with labels and probabilities."""
    from ..predict import classify

    results = classify(_model_source(artifact, weights), images, runtime, device, top,
                       parse_runtime_options(runtime_option), threads)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    console = _console()
    for r in results:
        table = Table(title=Path(r["image"]).name, title_justify="left")
        for name, just in (("#", "right"), ("class", "right"), ("label", "left"), ("probability", "right")):
            table.add_column(name, justify=just)
        for rank, t in enumerate(r["top"], 1):
            table.add_row(str(rank), str(t["class"]), t["label"], f"{t['probability']:.4f}")
        console.print(table)
