"""`bench`: latency of artifacts (interleaved, one worker process each), with an optional regression gate."""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import GateError, InputFileError, UsageError
from ..backends import runtime_keys
from ..backends.runner import parse_runtime_options
from ..quiet import held_back
from .app import app, show_progress, console as make_console

PANEL = "Measure"
MIB = 2 ** 20
Runtime = Enum("Runtime", {k: k for k in ("auto", *runtime_keys())}, type=str)
RUNTIME_OPTION_HELP = "A runtime's own setting, KEY=VALUE, repeatable (e.g. precision=bf16 for openvino); see README."


def parse_batches(text: str) -> list[int]:
    """'1,8' -> [1, 8]."""
    try:
        batches = [int(p) for p in str(text).replace(" ", "").split(",") if p]
    except ValueError:
        raise UsageError(f"bad --batch {text!r}: comma-separated positive integers, e.g. 1,8") from None
    if not batches or min(batches) < 1:
        raise UsageError(f"bad --batch {text!r}: comma-separated positive integers, e.g. 1,8")
    return batches


@contextmanager
def progress_bar():
    """A rich progress bar on stderr on a terminal; nothing in CI or when piped."""
    if not show_progress():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting workers", total=1.0)
        yield lambda fraction, text: bar.update(task, completed=fraction, description=text)


# The terminal table (the --markdown file keeps every column and the file names): the columns in order, and
# which give way first when the console is too narrow for all of them. A number is never cut: a column
# goes whole. Latencies are ms per batch; the caption under the table says so and what each column means.
COLUMNS = ("p50", "p90", "p99", "mean ± sd", "CV", "img/s", "speed-up", "floor", "RSS", "size")
GIVE_WAY = ("size", "RSS", "p90", "mean ± sd", "floor", "img/s", "p99", "CV")   # size, RSS: in the legend too
SAME_RUNTIME = {"onnx": "onnxruntime"}   # a target whose runtime goes by another name


def _num(v, digits: int = 3) -> str:
    """Short and never in exponent form: 0.847, 12.3, 1234, 0.000012 (a spread of 7.5e-15 reads 0)."""
    if v is None:
        return "–"
    if abs(v) >= 10 ** digits:
        return f"{v:.0f}"
    text = f"{v:.{digits}g}"
    return text if "e" not in text else (f"{v:.6f}".rstrip("0").rstrip(".") or "0")


def _fixed(v, decimals: int, suffix: str = "") -> str:
    """A figure whose unit wants fixed decimals (a speed-up, MiB); "–" where there is none."""
    return "–" if v is None else f"{v:.{decimals}f}{suffix}"


def row_label(r: dict, number: int, target: str | None) -> str:
    """A row's short name: the artifact's number in the legend, its target, precision and batch. The
    runtime too where it is not the target's own, so that no latency passes for another runtime's."""
    runtime = r.get("runtime") or "?"
    if r.get("role") == "reference":
        what = "torch ref"
    elif target:
        what = target if runtime in (target, SAME_RUNTIME.get(target)) else f"{target} on {runtime}"
    else:
        what = runtime + (f" {r['form']}" if r.get("form") else "")
    return f"#{number} {what} {r.get('precision') or '?'} b{r['batch']}"


def _cells(r: dict, size: int | None) -> dict[str, str]:
    """A result row's figures by column name, each short enough never to need cutting."""
    from ..reports.markdown import speedup

    lat = r.get("latency_ms") or {}
    mean, std = lat.get("mean"), lat.get("std")
    cv = r.get("cv")
    return {"p50": _num(lat.get("p50")), "p90": _num(lat.get("p90")), "p99": _num(lat.get("p99")),
            "mean ± sd": "–" if mean is None else _num(mean) + ("" if std is None else f" ± {_num(std, 2)}"),
            "CV": "–" if cv is None else f"{cv:.0%}" if cv >= 0.1 else f"{cv:.1%}",
            "img/s": _num(r.get("throughput_ips"), 4), "speed-up": _fixed(speedup(r)[0], 2, "×"),
            "floor": "–" if r.get("floor_fraction") is None else f"{r['floor_fraction']:.0%}",
            "RSS": _fixed(r["peak_rss_bytes"] / MIB if r.get("peak_rss_bytes") else None, 0),
            "size": _fixed(size / MIB if size else None, 1)}


def results_table(doc: dict, width: int):
    """The results as a rich Table that fits ``width`` columns, and its columns: short row labels (see
    ``row_label``), whole numbers, and the columns of GIVE_WAY left out, in that order, until it fits."""
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    numbers = {a["name"]: i + 1 for i, a in enumerate(doc["artifacts"])}
    targets = {a["name"]: (a.get("manifest") or {}).get("target") for a in doc["artifacts"]}
    sizes = {a["name"]: a.get("size_bytes") for a in doc["artifacts"]}
    rows = [(row_label(r, numbers.get(r["artifact"], 0), targets.get(r["artifact"])),
             _cells(r, sizes.get(r["artifact"]))) for r in doc["results"]]
    probe = Console(width=10_000, file=io.StringIO())   # wide enough to measure the table's natural width
    columns = list(COLUMNS)
    for dropped in (None, *GIVE_WAY):
        if dropped:
            columns.remove(dropped)
        table = Table("artifact", *columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for col in table.columns[1:]:
            col.justify = "right"
        for label, cells in rows:
            table.add_row(label, *(cells[c] for c in columns))
        if Measurement.get(probe, probe.options, table).maximum <= width:
            break
    return table, columns


def _caption(doc: dict, columns: list[str]) -> str:
    """What the shown columns mean (units stay out of the headers, which keeps the columns narrow)."""
    base = "the reference" if any(r.get("ratio_to_reference") for r in doc["results"]) else "the first artifact"
    parts = ["latency in ms per batch",
             f"speed-up: p50 of {base} over the row's p50 (higher is faster)",
             "floor: the FLOP floor's share of p50" if "floor" in columns else "",
             "RSS: peak, MiB" if "RSS" in columns else "", "size: MiB" if "size" in columns else ""]
    return "; ".join(p for p in parts if p)


def _legend_line(doc: dict, number: int, a: dict) -> str:
    """An artifact's number, file name, load time, first inference and memory (a phone's tool may not
    report every figure: "–", not a crash)."""
    from ..reports.markdown import _f

    firsts = ", ".join(f"b{r['batch']} {_f(r.get('first_inference_ms'), '.1f', ' ms')}" for r in doc["results"]
                       if r["artifact"] == a["name"])
    size = a.get("size_bytes")
    line = (f"#{number} {a['name']}: size {_f(size / MIB if size else None, '.1f', ' MiB')}, "
            f"load {_f(a.get('load_ms'), '.0f', ' ms')}, first inference {firsts}")
    if a.get("peak_rss_bytes") and a.get("rss_before_load_bytes"):
        line += (f", peak RSS {a['peak_rss_bytes'] / MIB:.0f} MiB "
                 f"(+{(a['peak_rss_bytes'] - a['rss_before_load_bytes']) / MIB:.0f} MiB over the idle worker)")
    return line


def print_results(doc: dict) -> None:
    """The table (fitted to the console: 100 columns when piped), its caption, then the numbered legend
    of file names, each on one unbroken line so that a name is never split."""
    console = make_console()
    m = doc["machine"]
    floor = (doc.get("floor") or {}).get("matmul")
    console.print(f"{m['slug']}" + (f", float32 matmul {floor['gflops']:.1f} GFLOP/s" if floor else ""))
    table, columns = results_table(doc, console.width)
    console.print(table)
    console.print(_caption(doc, columns))
    for i, a in enumerate(doc["artifacts"]):
        console.print(_legend_line(doc, i + 1, a), soft_wrap=True)


def _bench_on_phone(artifacts: list[Path], serial: str | None, binary: Path | None, threads: int | None,
                    runs: int, json_out: Path | None) -> None:
    from ..adb import bench_on_device
    from ..reports.bench_json import write_results

    if serial is None or binary is None:
        raise UsageError("--adb SERIAL and --benchmark-binary PATH go together")
    if len(artifacts) != 1:
        raise UsageError("--adb times one artifact at a time")
    doc = bench_on_device(artifacts[0], serial, binary, runs=runs, threads=threads or 2)
    if json_out:
        write_results(json_out, doc)
    print_results(doc)
    if json_out:
        typer.echo(f"wrote {json_out}")


def _write_markdown(path: Path, doc: dict, plot: Path | None) -> None:
    """Whole or not at all (a temporary renamed into place): a Ctrl-C never leaves half a table."""
    from ..artifact import atomic_file
    from ..reports.markdown import bench_markdown

    link = os.path.relpath(plot, path.parent) if plot else None
    with atomic_file(path) as tmp:
        tmp.write_text(bench_markdown([doc], {"Latency distribution": link} if plot else None))


def print_regression(reg: dict) -> None:
    typer.echo(f"regression gate: {reg['verdict']} (threshold +{reg['threshold'] * 100:.3g}%, "
               f"baseline {reg['baseline_machine']} of {reg.get('baseline_created') or '?'})")
    pct = lambda v: f"{(v - 1) * 100:+.1f}%"  # noqa: E731
    for e in reg["rows"]:
        if e["ratio"] is None:
            typer.echo(f"  {e['artifact']} batch {e['batch']}: no baseline row")
        else:
            typer.echo(f"  {e['artifact']} batch {e['batch']}: {e['baseline_p50_ms']:.3g} -> {e['p50_ms']:.3g} ms "
                       f"({pct(e['ratio'])}, 95% CI {pct(e['low'])}..{pct(e['high'])}): {e['status']}")


def _report(doc: dict, json_out: Path | None, markdown: Path | None, plot: Path | None) -> None:
    """The files asked for (each whole or not at all), then the table (and the regression verdict) on stdout."""
    from ..bench import hold_for_test
    from ..reports.bench_json import write_results

    if json_out:
        write_results(json_out, doc)
    hold_for_test("write")
    if markdown:
        _write_markdown(markdown, doc, plot)
    if plot:
        from ..reports.plots import labelled_rows, latency_distribution
        latency_distribution(labelled_rows([doc]), plot)
    print_results(doc)
    if doc.get("regression") is not None:
        print_regression(doc["regression"])
    for path in (json_out, markdown, plot):
        if path:
            typer.echo(f"wrote {path}")


@app.command("bench", rich_help_panel=PANEL)
def bench(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifacts (.onnx, ...) or weights files (run by the torch runtime).", show_default=False)],
    runtime: Annotated[Runtime, typer.Option(help="Runtime for every artifact; auto picks it by file suffix.")] = Runtime.auto,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    batch: Annotated[str, typer.Option("--batch", "-b", help="Batch sizes, comma-separated (e.g. 1,8). A fixed-batch artifact runs only its own.")] = "1",
    threads: Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads for every runtime and the matmul-rate probe. Default: all usable cores.")] = None,
    runtime_option: Annotated[Optional[list[str]], typer.Option("--runtime-option", "-O", help=RUNTIME_OPTION_HELP)] = None,
    warmup_s: Annotated[float, typer.Option("--warmup-s", min=0, help="Warm-up time per artifact and batch (at least 3 iterations).")] = 1.0,
    min_iters: Annotated[int, typer.Option("--min-iters", min=1, help="Timed iterations per row, at least.")] = 20,
    duration_s: Annotated[float, typer.Option("--duration-s", min=0, help="Timed seconds per row, at least.")] = 5.0,
    with_reference: Annotated[bool, typer.Option("--with-reference", help="Also time PyTorch eager (float32) of the same weights.")] = False,
    weights: Annotated[Optional[Path], typer.Option(help="Weights of the reference (default: what the manifest names: the shipped weights or a seeded random model).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result (schema mixformer-deploy/bench/1, raw samples included).")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Write a Markdown table of the results.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of the latency distributions (needs the plot extra).")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="An earlier --json result: exit 1 if p50 latency regressed beyond --max-regression.")] = None,
    max_regression: Annotated[str, typer.Option(help="Allowed p50 slow-down: 10% or 10 (a value with % or above 1 is a percentage) or 0.1 (a fraction).")] = "10%",
    no_floor: Annotated[bool, typer.Option("--no-floor", help="Skip the FLOP floor (MAC count and matmul-rate probe).")] = False,
    adb: Annotated[Optional[str], typer.Option("--adb", metavar="SERIAL", help="Time the artifact on an Android device over adb with the runtime's own benchmark tool (.pte: executor_runner, .tflite: benchmark_model).", rich_help_panel="On a phone")] = None,
    benchmark_binary: Annotated[Optional[Path], typer.Option("--benchmark-binary", help="With --adb: the runtime's benchmark tool built for the phone's ABI.", rich_help_panel="On a phone")] = None,
):
    """Time artifacts: load time, first inference, p50/p90/p95/p99/mean/std/min/max latency (ms), throughput
    (images/s), peak memory, size, and the FLOP floor.

    Several artifacts are measured interleaved (rounds alternate between them, each in its own process);
    each row shows its p50 relative to the first artifact. With --baseline the command exits 1 when a p50
    is slower than the baseline's beyond --max-regression, judged by a bootstrap confidence interval of
    the ratio of medians; a baseline from another machine only warns.
    """
    from ..bench import Policy, benchmark
    from ..regression import compare, parse_threshold
    from ..reports.bench_json import read_results, write_results

    if adb is not None or benchmark_binary is not None:
        return _bench_on_phone(artifacts, adb, benchmark_binary, threads, min_iters, json_out)

    batches = parse_batches(batch)
    threshold = parse_threshold(max_regression)
    base = read_results(baseline) if baseline is not None else None
    if plot:  # fail before the run, not after it
        from ..optional import require
        require("matplotlib", "plot")
    policy = Policy(warmup_s=warmup_s, duration_s=duration_s, min_iters=min_iters)
    with progress_bar() as tick, held_back("mixformer_deploy.checkpoints"):
        doc = benchmark(artifacts, runtime.value, device, batches, threads, policy, with_reference, weights,
                        floor=not no_floor, progress=tick, runtime_options=parse_runtime_options(runtime_option))
    if base is not None:
        try:
            doc["regression"] = compare(doc, base, threshold)
        except InputFileError:
            if json_out:   # a baseline that does not fit (exit 4) does not lose the run
                write_results(json_out, doc)
            raise
    _report(doc, json_out, markdown, plot)
    reg = doc.get("regression")
    if reg and reg["verdict"] == "regressed":
        more = f" (and {len(reg['messages']) - 1} more)" if len(reg["messages"]) > 1 else ""
        raise GateError(f"latency regression: {reg['messages'][0]}{more}")
