"""`export`: weights -> deploy form -> artifact, then the parity gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ParityError
from .app import app, show_progress


@app.command("export", rich_help_panel="Deploy")
def export_cmd(
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="onnx (openvino, coreml, tensorrt/trt, executorch, litert planned).")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", "-w", help="Checkpoint (.safetensors/.pt/.pth/.pdparams). Default: the shipped weights.")] = None,
    variant: Annotated[str, typer.Option(help="auto (infer from the weights) or B0..B6; B0..B6 without --weights = seeded random weights.")] = "auto",
    img_size: Annotated[Optional[str], typer.Option("--img-size", help="N or HxW (height x width), multiples of 32. Default: the weights' training size, else 224.")] = None,
    batch: Annotated[Optional[str], typer.Option(help="1, N, or dynamic.")] = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default 17).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 or fp16 (fp16 keeps float32 input and output).")] = None,
    simplify: Annotated[Optional[bool], typer.Option("--simplify/--no-simplify", help="Simplify with onnxslim.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory (default ./artifacts/) or a file path with the target's suffix.")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Export profile: a name under export/ (e.g. onnx-fp16) or a TOML path; options override it.")] = None,
    check: Annotated[Optional[bool], typer.Option("--check/--no-check", help="Run the parity gate after export (exit 1 on failure).")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes, for --variant without --weights (default 1000).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON result instead of the path.")] = False,
):
    """Export weights to a deployable artifact and check its parity with PyTorch.

    With no arguments: the shipped weights to ONNX (fp32, batch 1) in ./artifacts/, checked.
    The last line printed is the artifact's path. A failing artifact is kept as <name>.failed and the
    command exits 1.
    """
    from ..export_api import export
    from ..profiles import load_profile

    prof = load_profile(profile) if profile else {}
    pick = lambda value, key, default: value if value is not None else prof.get(key, default)  # noqa: E731
    kwargs = dict(
        weights=weights, target=pick(target, "target", "onnx"), variant=variant,
        img_size=pick(img_size, "img_size", None), batch=pick(batch, "batch", 1), precision=pick(precision, "precision", "fp32"),
        opset=pick(opset, "opset", None), simplify=pick(simplify, "simplify", True), output=output,
        check=pick(check, "check", True), num_classes=num_classes)
    if show_progress():
        from rich.console import Console
        with Console(stderr=True).status("exporting and checking..."):
            result = export(**kwargs)
    else:
        result = export(**kwargs)
    if result.parity is not None and not as_json:
        from rich.console import Console

        from .parity_cmd import print_report
        print_report(result.parity, Console(stderr=True))
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "parity": result.parity.to_dict() if result.parity else None}, indent=2))
    else:
        typer.echo(str(result.path))
    if not result.passed:
        raise ParityError(f"artifact failed parity; kept for inspection as {result.path}")
