"""`info` (model facts, backends, hardware) and `convert-weights` (any checkpoint -> clean safetensors)."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import __version__
from ..errors import CheckpointError, UsageError
from ..quiet import held_back
from .app import app, console as make_console

log = logging.getLogger(__name__)

SEED = 0
DEFAULT_CLASSES = 1000


class Variant(str, Enum):
    auto = "auto"
    B0 = "B0"
    B1 = "B1"
    B2 = "B2"
    B3 = "B3"
    B4 = "B4"
    B5 = "B5"
    B6 = "B6"


# ---------------------------------------------------------------- helpers shared by both commands

def parse_size(text: str, what: str = "--img-size") -> tuple[int, int]:
    """'224' -> (224, 224); '256x192' -> (256, 192) (height x width)."""
    t = str(text).strip().lower().replace("×", "x")
    parts = t.split("x") if "x" in t else [t, t]
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a size: give N or HxW, e.g. 224 or 256x192") from None
    return h, w


def _decode_metadata(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            d = json.loads(v)
            out[k] = d if isinstance(d, (dict, list)) else v
        except (TypeError, ValueError):
            out[k] = v
    return out


def as_variant(value) -> Variant | None:
    """None, a Variant, or its spelling in any case ('b1', 'AUTO')."""
    if value is None or isinstance(value, Variant):
        return value
    text = str(value).strip()
    try:
        return Variant.auto if text.lower() == "auto" else Variant(text.upper())
    except ValueError:
        names = ", ".join(v.value for v in Variant if v is not Variant.auto)
        raise UsageError(f"unknown variant {value!r}: choose auto or one of {names}") from None


def _resolve_model(weights: Path | None, variant: Variant | None, num_classes: int | None):
    """(model, config, weights facts, metadata, inferred) per the contracts on --weights / --variant."""
    from ..checkpoints import load_checkpoint
    from ..model import create_model
    from ..shipped import DEFAULT_WEIGHTS, is_shipped

    variant = as_variant(variant)
    if weights is None and variant is not None:
        if variant is Variant.auto:
            raise UsageError("--variant auto reads the architecture from --weights; name B0..B6 for random weights")
        model = create_model(variant.value, num_classes or DEFAULT_CLASSES, seed=SEED)
        typer.echo(f"warning: no --weights: {variant.value} with seeded random weights (seed {SEED}): "
                   "fine for latency and parity, not for accuracy", err=True)
        return model, model.cfg, {"source": "seeded random", "seed": SEED}, {}, False
    path = weights if weights is not None else DEFAULT_WEIGHTS
    if weights is None and not path.is_file():
        raise CheckpointError(f"the shipped weights {path} are not there: pass --weights PATH, or --variant B0..B6 "
                              "for seeded random weights")
    name = None if variant in (None, Variant.auto) else variant.value
    with held_back("mixformer_deploy.checkpoints"):
        ck = load_checkpoint(path, name, num_classes)
    facts = {"source": "file", "path": str(ck.path.resolve()), "sha256": ck.sha256, "format": ck.format,
             "size_bytes": ck.path.stat().st_size, "shipped": is_shipped(ck.sha256)}
    return ck.model, ck.config, facts, ck.metadata, name is None


# ---------------------------------------------------------------- info

def collect_info(weights: Path | None = None, variant: Variant | None = None, img_size: str | None = None,
                 num_classes: int | None = None) -> dict:
    """Everything `info` reports, as one JSON-ready dict."""
    from .. import environment
    from ..checkpoints import describe_config
    from ..model import check_input_size, count_macs, count_params
    from ..shipped import DEFAULT_SIZE

    if img_size is not None:
        size, size_from = parse_size(img_size), "--img-size"
    model, cfg, wfacts, meta, inferred = _resolve_model(weights, variant, num_classes)
    if img_size is None:
        if meta.get("input_size"):
            try:
                size, size_from = parse_size(meta["input_size"], "recorded input_size"), "weights"
            except UsageError as e:
                raise CheckpointError(f"{Path(wfacts['path']).name}: {e}") from None
        else:
            size, size_from = (DEFAULT_SIZE, DEFAULT_SIZE), "default"
    try:
        check_input_size(cfg, *size)
    except UsageError as e:
        if size_from != "weights":
            raise
        raise CheckpointError(f"{Path(wfacts['path']).name}: the recorded input_size does not fit: {e}") from None
    params = count_params(model)
    macs = count_macs(model, *size)
    return {
        "mixformer_deploy": __version__,
        "model": {
            "variant": cfg.name,
            "inferred": inferred,
            "description": describe_config(cfg),
            "config": cfg.to_dict(),
            "num_classes": cfg.num_classes,
            "parameters": params,
            "parameters_m": round(params / 1e6, 3),
            "input_size": list(size),
            "input_size_from": size_from,
            "macs": macs,
            "gmacs": round(macs / 1e9, 4),
            "flops": 2 * macs,
            "gflops": round(2 * macs / 1e9, 4),
        },
        "weights": {**wfacts, "metadata": _decode_metadata(meta)} if meta else wfacts,
        "backends": environment.backends_status(probe=True),
        "hardware": environment.hardware(),
    }


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2 ** 20:,.1f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:,.1f} GiB"


def _yes(v) -> str:
    return "-" if v is None else "[green]yes[/]" if v else "[red]no[/]"


def _print_human(info: dict) -> None:
    console = make_console()
    if info["model"]["inferred"]:
        console.print(f"inferred: {info['model']['description']}", markup=False)
    console.print(_model_table(info["model"], info["weights"]))
    console.print(_backends_table(info["backends"]))
    console.print(_hardware_table(info["hardware"]))


def _model_table(m: dict, w: dict):
    from rich.table import Table

    t = Table(title="Model", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    c = m["config"]
    h, wd = m["input_size"]
    t.add_row("variant", m["variant"] + (" (inferred from the weights)" if m["inferred"] else ""))
    t.add_row("config", f"embed_dim {c['embed_dim']}, depths {c['depths']}, heads {c['num_heads']}, "
                        f"window {c['window_size']}, mlp_ratio {c['mlp_ratio']:g}")
    t.add_row("classes", str(m["num_classes"]))
    t.add_row("parameters", f"{m['parameters']:,} ({m['parameters'] / 1e6:.2f} M)")
    t.add_row("input size", f"{h}x{wd} (HxW, from {m['input_size_from']})")
    t.add_row("multiply-adds", f"{m['macs'] / 1e9:.2f} GMACs = {m['flops'] / 1e9:.2f} GFLOPs at {h}x{wd}")
    if w["source"] == "file":
        t.add_row("weights", w["path"] + (" (shipped)" if w.get("shipped") else ""))
        t.add_row("format", w["format"])
        t.add_row("sha256", w["sha256"])
        meta = w.get("metadata") or {}
        for k in ("dataset", "heldout_accuracy", "labels"):
            if k in meta:
                v = meta[k]
                t.add_row(k, escape(", ".join(map(str, v)) if isinstance(v, list) else str(v)))
    else:
        t.add_row("weights", f"[yellow]seeded random (seed {w['seed']})[/]: latency and parity only, not accuracy")
    return t


def _backends_table(backends: dict):
    from rich.table import Table

    b = Table(title="Backends", title_justify="left")
    for col in ("backend", "package", "version", "export", "run here", "devices / notes"):
        b.add_column(col)
    for key, e in backends.items():
        note = e["note"].removeprefix("not installed: ")
        notes = ", ".join(e["devices"]) + ("; " if e["devices"] and note else "") + note
        b.add_row(key, e["package"], e["version"] or "[dim]not installed[/]", _yes(e["can_export"]),
                  _yes(e["can_run"]), escape(notes))
    return b


def _hardware_table(hw: dict):
    from rich.table import Table

    g = Table(title="Hardware", show_header=False, title_justify="left")
    g.add_column(style="bold")
    g.add_column()
    cores = f"{hw['physical_cores'] or '?'} physical, {hw['logical_cores'] or '?'} logical"
    if hw.get("usable_cpus") and hw["usable_cpus"] != hw["logical_cores"]:
        cores += f", {hw['usable_cpus']} usable"
    if hw.get("cpu_quota"):
        cores += f", quota {hw['cpu_quota']:g}"
    g.add_row("cpu", f"{hw['cpu']} ({hw['arch']})")
    g.add_row("cores", cores)
    g.add_row("memory", _mib(hw["memory_bytes"]))
    g.add_row("os", hw["os"])
    g.add_row("python", hw["python"])
    for i, gpu in enumerate(hw["gpus"] or [None]):
        if gpu is None:
            g.add_row("gpu", "none visible")
        else:
            extra = ", ".join(f"{k} {gpu[k]}" for k in ("driver", "cuda", "compute_capability") if gpu.get(k))
            g.add_row(f"gpu {i}", f"{gpu['name']}, {_mib(gpu.get('memory_bytes'))}" + (f", {extra}" if extra else ""))
    return g


@app.command("info", rich_help_panel="Inspect")
def info(
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", show_default=False, metavar="PATH",
        help="Checkpoint ([bold].safetensors .pt .pth .ckpt .bin .pdparams[/]). "
             "Default: the shipped reference weights.")] = None,
    variant: Annotated[Optional[Variant], typer.Option(
        "--variant", case_sensitive=False, show_default=False,
        help="B0..B6. Without [bold]--weights[/]: seeded random weights (latency/parity, not accuracy). "
             "With it: the architecture the weights must fit (default: inferred from them).")] = None,
    img_size: Annotated[Optional[str], typer.Option(
        "--img-size", metavar="N|HxW", show_default=False,
        help="Input size, height x width; each side a multiple of 32. "
             "Default: the size the weights record, else 224.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(
        "--num-classes", min=1, show_default=False,
        help="Classes of the head (default: the weights', or 1000 for random weights).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")] = False,
):
    """Model facts (variant, parameters, multiply-adds), each backend's status, and this machine's hardware."""
    data = collect_info(weights, variant, img_size, num_classes)
    if as_json:
        if data["model"]["inferred"]:
            log.info("inferred: %s", data["model"]["description"])
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_human(data)


# ---------------------------------------------------------------- convert-weights

@app.command("convert-weights", rich_help_panel="Inspect")
def convert_weights(
    src: Annotated[Path, typer.Argument(
        metavar="IN", show_default=False,
        help="Any supported checkpoint: [bold].pt .pth .ckpt .bin .safetensors .pdparams[/] (read safely).")],
    out: Annotated[Path, typer.Argument(metavar="OUT.safetensors", show_default=False,
                                        help="Where to write the clean PyTorch safetensors.")],
    variant: Annotated[Variant, typer.Option(
        "--variant", case_sensitive=False,
        help="Architecture the weights must fit; [bold]auto[/] infers it from their shapes.")] = Variant.auto,
    num_classes: Annotated[Optional[int], typer.Option(
        "--num-classes", min=1, show_default=False, help="Classes of the head the weights must have.")] = None,
    img_size: Annotated[Optional[str], typer.Option(
        "--img-size", metavar="N|HxW", show_default=False,
        help="Record this input size in the output (default: keep the one the input records, if any).")] = None,
):
    """Convert a checkpoint to a clean [bold].safetensors[/] whose metadata records variant, config, classes
    and the source's sha256 and format. Prints that summary as JSON; the last line is the output path."""
    from ..checkpoints import convert_weights_file

    size = parse_size(img_size) if img_size is not None else None
    variant = as_variant(variant)
    with held_back("mixformer_deploy.checkpoints"):  # the one "inferred" line is this command's, below
        summary = convert_weights_file(src, out, None if variant in (None, Variant.auto) else variant.value,
                                       num_classes, size)
    if summary["inferred"]:
        log.info("inferred: %s", summary["description"])  # stderr: stdout stays parseable JSON + the path
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(summary["output"])
    sys.stdout.flush()
