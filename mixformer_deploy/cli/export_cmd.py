"""`export`: weights -> deploy form -> artifact, then the parity gate.

The generic options are declared here; every backend's own options (its spec's Options dataclass) are added to
the command from the registry, their help prefixed with the targets that take them.
"""

import inspect
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ParityError, UsageError
from ..backends import get_spec, option_owners
from ..backends import keys as target_keys
from .app import app, quiet, show_progress, console as make_console

GENERIC = "Export"
TARGET_PANEL = "Target options"
ALL = "all"  # --target all: every target of the table (mixformer_deploy.export_all)
BACKBONE = "Backbone (dense tasks)"


def export_cmd(
    target: Annotated[Optional[str], typer.Option("--target", "-t", help=f"{', '.join(target_keys())} (trt = tensorrt), or all: every target that builds here, one table (--precision may then be a comma list, e.g. fp32,int8).", rich_help_panel=GENERIC)] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", "-w", help="Checkpoint (.safetensors/.pt/.pth/.pdparams). Default: the shipped weights.", rich_help_panel=GENERIC)] = None,
    variant: Annotated[str, typer.Option(help="auto (infer from the weights) or B0..B6; B0..B6 without --weights = seeded random weights.", rich_help_panel=GENERIC)] = "auto",
    img_size: Annotated[Optional[str], typer.Option("--img-size", help="N or HxW (height x width), multiples of 32. Default: the weights' training size, else 224.", rich_help_panel=GENERIC)] = None,
    batch: Annotated[Optional[str], typer.Option(help="1, N, or dynamic.", rich_help_panel=GENERIC)] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, fp16, bf16 or int8, as the target offers (reduced precisions keep float32 input and output).", rich_help_panel=GENERIC)] = None,
    keep_fp32: Annotated[Optional[list[str]], typer.Option("--keep-fp32", help="Reduced precision: also keep these deploy-form modules in float32 (glob, repeatable, e.g. 'stages.3.*.attention'); 'auto' searches for the smallest set that passes the gate (int8).", rich_help_panel=GENERIC)] = None,
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
    head: Annotated[Optional[str], typer.Option("--head", help="classifier (logits out) or none: a backbone for dense tasks, whose outputs are the stages' feature maps (features_0..3, NCHW, strides 4-32).", rich_help_panel=BACKBONE)] = None,
    out_indices: Annotated[Optional[str], typer.Option("--out-indices", help="--head none: which stages' feature maps, e.g. 1,2,3 (default 0,1,2,3).", rich_help_panel=BACKBONE)] = None,
    out_norm: Annotated[Optional[bool], typer.Option("--out-norm/--no-out-norm", help="--head none: a LayerNorm per output, with the checkpoint's norm{i} weights (a detection/segmentation checkpoint).", rich_help_panel=BACKBONE)] = None,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="With --target all: then time every artifact that runs here and PyTorch eager in one interleaved run (3 s each).", rich_help_panel=GENERIC)] = False,
    **target_opts,
):
    """Export weights to a deployable artifact and check its parity with PyTorch.

    With no arguments: the shipped weights to ONNX (fp32, batch 1) in ./artifacts/, checked.
    The last line printed is the artifact's path. A failing artifact is kept as <name>.failed and the
    command exits 1.

    --target all: every target that builds here, one table, summary.md in --output (its path is the last
    line); exit 1 if any artifact fails its gate.
    """
    from ..export_api import export
    from ..profiles import load_profile

    if (target or "").strip().lower() == ALL:
        _check_all_request(profile, target_opts)
        return _export_all(
            as_json=as_json, weights=weights, variant=variant, img_size=img_size, batch=batch, precision=precision,
            keep_fp32=tuple(keep_fp32 or ()), default_keeps=default_keeps, calibration=calibration,
            calibration_size=calibration_size, accuracy_set=accuracy_set, max_accuracy_drop=max_accuracy_drop,
            output=output, check=check, num_classes=num_classes, head=head, out_indices=out_indices,
            out_norm=out_norm, bench=bench)
    if bench:
        raise UsageError("--bench goes with --target all; to time one artifact: "
                         "mixformer-deploy bench ARTIFACT --with-reference")
    kwargs = _with_profile(load_profile(profile) if profile else {}, target_opts, weights=weights, target=target,
                           variant=variant, img_size=img_size, batch=batch, precision=precision, output=output,
                           check=check, num_classes=num_classes, keep_fp32=keep_fp32, default_keeps=default_keeps,
                           calibration=calibration, calibration_size=calibration_size, accuracy_set=accuracy_set,
                           max_accuracy_drop=max_accuracy_drop, head=head, out_indices=out_indices, out_norm=out_norm)
    if show_progress() and not quiet():
        from rich.console import Console
        with Console(stderr=True).status("exporting and checking..."):
            result = export(**kwargs)
    else:
        result = export(**kwargs)
    _print_result(result, as_json)


def _check_all_request(profile: str | None, target_opts: dict) -> None:
    """--target all takes the generic options only: a profile or a target's own option names one target."""
    if profile:
        raise UsageError("--profile describes one target's export: it does not combine with --target all")
    given = sorted("--" + k.replace("_", "-") for k, v in target_opts.items() if v is not None)
    if given:
        raise UsageError(f"{', '.join(given)}: per-target options do not combine with --target all "
                         "(export that target alone to use them)")


def _with_profile(prof: dict, target_opts: dict, **given) -> dict:
    """export()'s arguments: what was given, else the profile's value, else export()'s default."""
    pick = lambda key, default: given[key] if given[key] is not None else prof.get(key, default)  # noqa: E731
    opts = {k: v if v is not None else prof.get("target_options", {}).get(k) for k, v in target_opts.items()}
    opts.update({k: v for k, v in prof.get("target_options", {}).items() if opts.get(k) is None})
    return dict(
        weights=given["weights"], target=pick("target", "onnx"), variant=given["variant"],
        img_size=pick("img_size", None), batch=pick("batch", 1), precision=pick("precision", "fp32"),
        output=given["output"], check=pick("check", None), num_classes=given["num_classes"],
        keep_fp32=tuple(given["keep_fp32"] or prof.get("keep_fp32", ())), default_keeps=pick("default_keeps", True),
        calibration=pick("calibration", None), calibration_size=pick("calibration_size", 300), target_options=opts,
        accuracy_set=given["accuracy_set"], max_accuracy_drop=given["max_accuracy_drop"],
        head=pick("head", "classifier"), out_indices=pick("out_indices", None),
        out_norm=bool(pick("out_norm", False)))


def _print_result(result, as_json: bool) -> None:
    """The parity report on stderr; on stdout the path (after the backend's follow-up lines) or the JSON."""
    if result.parity is not None and not as_json and not quiet():
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


def _export_all(as_json: bool, **given) -> None:
    """--target all (mixformer_deploy.export_all): one table on stdout, or the JSON alone; summary.md in the
    output directory, whose path is the last line; exit 1 if a built artifact failed its gate."""
    from contextlib import ExitStack

    from ..export_all import export_all
    from ..reports.export_table import print_table

    command = _command_line(target=ALL, **{**given, "variant": None if given["variant"] == "auto" else given["variant"]},
                            json=as_json)
    defaults = dict(batch=1, precision="fp32", default_keeps=True, calibration_size=300, head="classifier",
                    out_norm=False)
    args = {k: (defaults[k] if v is None and k in defaults else v) for k, v in given.items()}
    if args["head"] == "classifier" and given["out_indices"] is None and not args["out_norm"]:
        args = {k: v for k, v in args.items() if k not in ("head", "out_indices", "out_norm")}  # export's defaults
    args["precisions"] = args.pop("precision")
    with ExitStack() as stack:   # converters and runtimes are quiet already (quiet.captured, per export)
        progress = None
        if show_progress() and not quiet():
            from rich.console import Console
            status = stack.enter_context(Console(stderr=True).status("exporting every target..."))
            progress = lambda text: status.update(f"export --target all: {text}")  # noqa: E731
        result = export_all(**args, command=command, progress=progress)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_table(result, make_console())
        typer.echo(str(result.summary_path))
    error = result.error()
    if error is not None:
        raise error


def _command_line(**options) -> str:
    """The command as typed (for summary.md): the options that were given, in a fixed order."""
    import shlex

    args = ["mixformer-deploy", "export"]
    for key, value in options.items():
        if value is None or value is False and key not in ("check", "default_keeps", "out_norm") or value == ():
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):
            for v in value:
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    return " ".join(shlex.quote(a) for a in args)


def _with_target_options(func):
    """Replace ``**target_opts`` by one keyword parameter per target option, so Typer shows them."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    annotations = dict(func.__annotations__)
    annotations.pop("target_opts", None)
    for name, (opt, owners) in sorted(option_owners().items()):
        kind = bool if opt.type is bool else opt.type
        decl = (f"{opt.flag}/--no-{opt.flag[2:]}",) if kind is bool else (opt.flag,)
        texts: dict[str, list[str]] = {}   # one text per meaning: targets sharing a name may differ (defaults)
        for key in owners:
            texts.setdefault(next(o.help for o in get_spec(key).options if o.name == name), []).append(key)
        help_text = " ".join(f"{'/'.join(keys)}: {text}" for text, keys in texts.items())
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
