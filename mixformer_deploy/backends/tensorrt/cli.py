"""`trt-lint`: check an ONNX file against TensorRT's published ONNX operator support (no TensorRT needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ...errors import ArtifactError, GateError
from ...cli.app import app


@app.command("trt-lint", rich_help_panel="Verify")
def trt_lint_cmd(
    artifact: Annotated[Path, typer.Argument(help="An ONNX file (e.g. a .trt.onnx artifact).", show_default=False)],
    trt_version: Annotated[str, typer.Option("--trt-version", help="TensorRT major version: 10 or 11.")] = "11",
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
):
    """Operators, attributes, data types, opset, dynamic dimensions, custom-domain ops and Q/DQ placement,
    checked against NVIDIA's ONNX operator matrix for TensorRT (kept in the package with its source).

    Exit 0 clean, 1 with findings (each names the node and its op), 4 for a file that is not ONNX."""
    from .lint import lint, lint_lines

    if not artifact.is_file():
        raise ArtifactError(f"not found: {artifact}")
    report = lint(artifact, trt_version, path=artifact)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in lint_lines(report):
            typer.echo(line)
    if not report.clean:
        raise GateError(f"{artifact.name}: {len(report.findings)} TensorRT {report.trt_version} finding(s), "
                        f"first: {report.findings[0].line()}")
