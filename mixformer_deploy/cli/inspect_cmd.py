"""`inspect`: what is inside an artifact of any target, read by that target's own reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import ArtifactError
from .app import app, console as make_console


def inspect_artifact(path: Path) -> dict:
    from ..artifact import read_manifest, resolve_artifact, size_bytes, target_of

    path = resolve_artifact(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    target = target_of(path)
    if target is None:
        raise ArtifactError(f"{path.name}: not an artifact any target writes (no manifest, unknown suffix)")
    facts = target.inspect(path)
    try:
        manifest = read_manifest(path)
    except ArtifactError:
        manifest = None
    return {"artifact": str(path), "target": target.key, "size_bytes": size_bytes(path), **facts,
            **_float32_split(facts.get("kept_fp32") or [], manifest), "manifest": manifest}


def _float32_split(fp32_modules: list[str], manifest: dict | None) -> dict:
    """The float32 modules of a reduced-precision artifact in two kinds: kept by a rule (the manifest's
    resolved keeps: LayerNorms, attention logits, pool, head, --keep-fp32) and merely not quantized (the
    backend's choice, e.g. an int8 Add); one list of both would blame the rules for the backend's choices."""
    if not fp32_modules:
        return {}
    kept = ((manifest or {}).get("precision_keeps") or {}).get("modules") or []
    by_rule = [m for m in fp32_modules if any(m == k or m.startswith(k + ".") for k in kept)]
    return {"fp32_kept_by_rule": by_rule, "fp32_other": [m for m in fp32_modules if m not in by_rule]}


@app.command("inspect", rich_help_panel="Verify")
def inspect_cmd(
    artifact: Annotated[Path, typer.Argument(help="An exported artifact (file or directory).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """Inputs, outputs, op histogram, maximum rank, ops per precision, float32 keeps, size, manifest."""
    info = inspect_artifact(artifact)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    console = make_console()
    m = info.get("manifest") or {}
    rank = f"  max rank {info['max_rank']}" if info.get("max_rank") is not None else ""
    console.print(f"[bold]{artifact.name}[/bold]  target {info['target']}  {info['size_bytes'] / 2**20:.2f} MiB  "
                  f"precision {m.get('precision', '?')}{rank}")
    for kind in ("inputs", "outputs"):
        for io in info.get(kind) or []:
            facts = (io.get("name"), io.get("dtype"), io.get("shape"))
            console.print(f"{kind[:-1]}: " + " ".join(str(v) for v in facts if v is not None))
    if info.get("precisions"):
        console.print("ops per precision: " + ", ".join(f"{k} {v}" for k, v in info["precisions"].items()))
    for key, what in (("fp32_kept_by_rule", "kept in float32 by rule"), ("fp32_other", "float32, not quantized")):
        if info.get(key):
            console.print(f"{what} ({len(info[key])}): " + ", ".join(info[key][:12])
                          + (" ..." if len(info[key]) > 12 else ""))
    ops = info.get("ops") or {}
    if any(isinstance(v, dict) or v is None for v in ops.values()):
        # grouped histograms (ExecuTorch: ops inside the delegate and ops left on portable kernels)
        if info.get("instructions"):
            console.print("instructions: " + ", ".join(f"{k} {v}" for k, v in info["instructions"].items()))
        for group, hist in ops.items():
            name = f"{group.replace('_', '-')} ops"
            if hist is None:
                console.print(f"{name}: not recorded in the manifest")
            else:
                _histogram(console, f"{name}: {info.get(f'{group}_ops') or sum(hist.values())}", hist)
        if "compute_off_delegate" in info:
            off = info["compute_off_delegate"]
            console.print("compute ops off the delegate: " + ("not recorded" if off is None else
                                                              ", ".join(f"{k} {v}" for k, v in off.items()) or "none"))
    elif ops:
        _histogram(console, "op histogram", ops)
    for note in [info.get("note")] if info.get("note") else []:
        console.print(f"note: {note}")


def _histogram(console, title: str, counts: dict) -> None:
    """One op -> count table, largest first (an empty group says so instead of printing an empty table)."""
    if not counts:
        console.print(f"{title} (none)")
        return
    table = Table(title=title, title_justify="left")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        table.add_row(op, str(n))
    console.print(table)
