"""`export`: weights -> deploy form -> artifact, then the parity gate.

The generic options are declared here; every target's own options (Target.options) are added to the
command from the targets table, their help prefixed with the targets that take them.
"""

import inspect
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ParityError
from ..targets import keys as target_keys
from ..targets import option_owners
from .app import app, quiet, show_progress, console as make_console

GENERIC = "Export"
TARGET_PANEL = "Target options"


def export_cmd(
    target: Annotated[Optional[str], typer.Option("--target", "-t", help=f"{', '.join(target_keys())} (trt = tensorrt).", rich_help_panel=GENERIC)] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", "-w", help="Checkpoint (.safetensors/.pt/.pth/.pdparams). Default: the shipped weights.", rich_help_panel=GENERIC)] = None,
    variant: Annotated[str, typer.Option(help="auto (infer from the weights) or B0..B6; B0..B6 without --weights = seeded random weights.", rich_help_panel=GENERIC)] = "auto",
    img_size: Annotated[Optional[str], typer.Option("--img-size", help="N or HxW (height x width), multiples of 32. Default: the weights' training size, else 224.", rich_help_panel=GENERIC)] = None,
    batch: Annotated[Optional[str], typer.Option(help="1, N, or dynamic.", rich_help_panel=GENERIC)] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, fp16, bf16 or int8, as the target offers (reduced precisions keep float32 input and output).", rich_help_panel=GENERIC)] = None,
    keep_fp32: Annotated[Optional[list[str]], typer.Option("--keep-fp32", help="Reduced precision: also keep these deploy-form modules in float32 (glob, repeatable, e.g. 'stages.3.*.attention').", rich_help_panel=GENERIC)] = None,
    default_keeps: Annotated[Optional[bool], typer.Option("--default-keeps/--no-default-keeps", help="Reduced precision: keep LayerNorm, attention logits + softmax, pooling + head in float32.", rich_help_panel=GENERIC)] = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="int8: a folder of calibration images (default with the shipped weights: the digits training split).", rich_help_panel=GENERIC)] = None,
    calibration_size: Annotated[Optional[int], typer.Option("--calibration-size", help="int8: how many calibration images (default 300).", rich_help_panel=GENERIC)] = None,
    accuracy_set: Annotated[Optional[Path], typer.Option("--accuracy-set", help="Gate accuracy on a folder with one sub-folder per class label.", rich_help_panel=GENERIC)] = None,
    max_accuracy_drop: Annotated[Optional[str], typer.Option("--max-accuracy-drop", help="Extra misclassified images allowed: N or P% (default by precision).", rich_help_panel=GENERIC)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory (default ./artifacts/) or a path with the target's suffix.", rich_help_panel=GENERIC)] = None,
    profile: Annotated[Optional[str], typer.Option(help="Export profile: a name under export/ (e.g. onnx-fp16) or a TOML path; options override it.", rich_help_panel=GENERIC)] = None,
    check: Annotated[Optional[bool], typer.Option("--check/--no-check", help="Run the parity gate after export (exit 1 on failure). Default: where the target's runtime runs here.", rich_help_panel=GENERIC)] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes, for --variant without --weights (default 1000).", rich_help_panel=GENERIC)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON result instead of the path.", rich_help_panel=GENERIC)] = False,
    **target_opts,
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
    given_target_opts = {k: pick(v, k, None) for k, v in target_opts.items()}
    given_target_opts.update({k: v for k, v in prof.get("target_options", {}).items() if given_target_opts.get(k) is None})
    kwargs = dict(
        weights=weights, target=pick(target, "target", "onnx"), variant=variant,
        img_size=pick(img_size, "img_size", None), batch=pick(batch, "batch", 1),
        precision=pick(precision, "precision", "fp32"), output=output, check=pick(check, "check", None),
        num_classes=num_classes, keep_fp32=tuple(keep_fp32 or prof.get("keep_fp32", ())),
        default_keeps=pick(default_keeps, "default_keeps", True), calibration=pick(calibration, "calibration", None),
        calibration_size=pick(calibration_size, "calibration_size", 300), target_options=given_target_opts,
        accuracy_set=accuracy_set, max_accuracy_drop=max_accuracy_drop)
    if show_progress() and not quiet():
        from rich.console import Console
        with Console(stderr=True).status("exporting and checking..."):
            result = export(**kwargs)
    else:
        result = export(**kwargs)
    if result.parity is not None and not as_json and not quiet():
        from rich.console import Console

        from .parity_cmd import print_report
        print_report(result.parity, make_console(stderr=True))
    after = result.after
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "parity": result.parity.to_dict() if result.parity else None,
                               "after": None if after is None else {
                                   "lines": after.lines, "path": str(after.path) if after.path else None,
                                   "error": str(after.error) if after.error else None}}, indent=2))
    else:
        for line in (after.lines if after is not None else []):
            typer.echo(line)
        typer.echo(str(after.path if after is not None and after.path else result.path))
    if not result.passed:
        raise ParityError(f"artifact failed parity; kept for inspection as {result.path}")
    if after is not None and after.error is not None:
        raise after.error


def _with_target_options(func):
    """Replace ``**target_opts`` by one keyword parameter per target option, so Typer shows them."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    annotations = dict(func.__annotations__)
    annotations.pop("target_opts", None)
    for name, (opt, owners) in sorted(option_owners().items()):
        kind = bool if opt.type is bool else opt.type
        decl = (f"{opt.flag}/--no-{opt.flag[2:]}",) if kind is bool else (opt.flag,)
        help_text = f"{'/'.join(owners)}: {opt.help}"
        annotations[name] = Annotated[Optional[kind], typer.Option(*decl, help=help_text, rich_help_panel=TARGET_PANEL,
                                                                   show_default=False)]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotations[name]))

    def wrapper(**kwargs):
        generic = {k: kwargs.pop(k) for k in list(kwargs) if k in sig.parameters}
        return func(**generic, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = annotations
    wrapper.__doc__, wrapper.__name__ = func.__doc__, func.__name__
    return wrapper


app.command("export", rich_help_panel="Deploy")(_with_target_options(export_cmd))
