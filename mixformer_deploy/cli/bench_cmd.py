"""`bench`: latency of artifacts (interleaved, one worker process each), with an optional regression gate."""

from __future__ import annotations

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


def print_results(doc: dict) -> None:
    from rich.table import Table

    from ..reports.markdown import HEADERS, _f, result_row

    console = make_console()
    m = doc["machine"]
    floor = (doc.get("floor") or {}).get("matmul")
    title = f"{m['slug']}" + (f", float32 matmul {floor['gflops']:.1f} GFLOP/s" if floor else "")
    table = Table(*HEADERS, title=title, title_justify="left")
    sizes = {a["name"]: a.get("size_bytes") for a in doc["artifacts"]}
    for r in doc["results"]:
        table.add_row(*result_row(r, sizes.get(r["artifact"])))
    console.print(table)
    for a in doc["artifacts"]:
        # a phone's tool may not report every figure (executor_runner: no load time): "–", not a crash
        firsts = ", ".join(f"b{r['batch']} {_f(r.get('first_inference_ms'), '.1f', ' ms')}" for r in doc["results"]
                           if r["artifact"] == a["name"])
        line = f"{a['name']}: load {_f(a.get('load_ms'), '.0f', ' ms')}, first inference {firsts}"
        if a.get("peak_rss_bytes") and a.get("rss_before_load_bytes"):
            line += (f", peak RSS {a['peak_rss_bytes'] / MIB:.0f} MiB "
                     f"(+{(a['peak_rss_bytes'] - a['rss_before_load_bytes']) / MIB:.0f} MiB over the idle worker)")
        console.print(line)


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
    if json_out:
        write_results(json_out, doc)
    if markdown:
        from ..reports.markdown import bench_markdown
        markdown.parent.mkdir(parents=True, exist_ok=True)
        link = os.path.relpath(plot, markdown.parent) if plot else None
        markdown.write_text(bench_markdown([doc], {"Latency distribution": link} if plot else None))
    if plot:
        from ..reports.plots import labelled_rows, latency_distribution
        latency_distribution(labelled_rows([doc]), plot)
    print_results(doc)
    if base is not None:
        print_regression(doc["regression"])
    for path in (json_out, markdown, plot):
        if path:
            typer.echo(f"wrote {path}")
    reg = doc.get("regression")
    if reg and reg["verdict"] == "regressed":
        more = f" (and {len(reg['messages']) - 1} more)" if len(reg["messages"]) > 1 else ""
        raise GateError(f"latency regression: {reg['messages'][0]}{more}")
