"""The Typer app and the one place where library errors become one stderr line and an exit code."""

from __future__ import annotations

import logging
import os
import sys

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import MixformerDeployError, one_line
from ..quiet import log_stream

GLOBAL_FLAGS = ("--debug", "--quiet", "-q")
INTERNAL_EXIT = 70


class _ErrorMappingGroup(TyperGroup):
    """The one place where errors become one stderr line and the contract's exit code, for the console
    script and for CliRunner alike. Exit codes never depend on --debug (it only adds the traceback)."""

    def parse_args(self, ctx, args):
        # --debug / --quiet are global: accept them after the subcommand too
        flags = [a for a in args if a in GLOBAL_FLAGS]
        rest = [a for a in args if a not in GLOBAL_FLAGS]
        # known before parsing, so that an error in the root's own options honours --debug too
        _state["debug"], _state["quiet"] = "--debug" in flags, bool({"--quiet", "-q"} & set(flags))
        return super().parse_args(ctx, flags + rest)

    def make_context(self, info_name, args, parent=None, **extra):
        # the root's own options are parsed here, outside invoke: without this Typer prints a boxed panel
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except Exception as e:
            if _is(e, "UsageError") and not _is(e, "NoArgsIsHelpError"):  # no arguments: the help, as before
                _usage_error(e, None, info_name)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MixformerDeployError as e:
            _fail(e, e.exit_code, str(e).splitlines()[0] if str(e) else type(e).__name__)
        except (typer.Exit, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # a bug: never 1, which CI reads as "the artifact is wrong"
            if _is(e, "UsageError"):  # the (vendored) Click's own parsing: a bad option or value
                _usage_error(e, ctx)
            if _is(e, "Abort") or _is(e, "Exit"):
                raise
            _fail(e, INTERNAL_EXIT, f"internal error: {one_line(e, 200)} "
                                    "(rerun with --debug for the traceback)")


def _is(e: BaseException, name: str) -> bool:
    """Click's exceptions by name: Typer vendors its own copy of Click, so there is no class to import."""
    return any(c.__name__ == name for c in type(e).__mro__)


def _usage_error(e: BaseException, group_ctx, prog: str | None = None) -> None:
    """Click's parse errors as the contract's one line (exit 2), with the --help of the command concerned:
    the error's own context, else the subcommand being invoked (a missing option value carries none)."""
    where = getattr(e, "ctx", None)
    path = where.command_path if where else group_ctx.command_path if group_ctx else prog
    if not where and group_ctx is not None and group_ctx.invoked_subcommand:
        path = f"{path} {group_ctx.invoked_subcommand}"
    _fail(e, 2, e.format_message().splitlines()[0] + (f" (see {path} --help)" if path else " (see --help)"))


def _fail(e: BaseException, code: int, message: str):
    if _state["debug"]:
        import traceback
        traceback.print_exception(e, file=sys.stderr)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code) from None


app = typer.Typer(
    cls=_ErrorMappingGroup,
    name="mixformer-deploy",
    help="Ship trained MixFormer weights to edge runtimes, verified for parity and benchmarked.\n\n"
         "Exit codes: 0 ok; 1 a gate failed; 2 usage error; 3 backend/hardware not available; "
         "4 bad input file; 5 converter failed; 70 internal error.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False, "quiet": False}


def _version(value: bool):
    if value:
        typer.echo(f"mixformer-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
):
    _state["debug"], _state["quiet"] = debug, quiet
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=log_stream(), force=True)
    for noisy in ("onnxscript", "onnx_ir", "torch", "onnxslim", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet() -> bool:
    """--quiet: only warnings and errors on stderr (summaries a command prints there are held back)."""
    return bool(_state["quiet"])


PIPED_WIDTH = 100


def console(stderr: bool = False):
    """The one rich Console of the CLI: the terminal's width, or 100 columns when piped (CI logs)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(highlight=False, stderr=stderr, width=None if stream.isatty() else PIPED_WIDTH)


def show_progress() -> bool:
    """Progress bars on an interactive terminal only; CI logs stay quiet."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def _load_commands() -> None:
    """Each module registers its commands on ``app``; imported here so that ``--help`` lists them all,
    with a backend's own commands (its spec's ``cli_module``, e.g. TensorRT's trt-lint)."""
    import importlib

    from ..backends import all_specs

    for name in ("bench_cmd", "debug_cmd", "export_cmd", "info_cmd", "inspect_cmd", "parity_cmd", "report_cmd"):
        importlib.import_module(f"{__package__}.{name}")
    for spec in all_specs():
        if spec.cli_module:
            importlib.import_module(f"{spec.package}.{spec.cli_module}")


def main() -> None:
    """Console entry point. Errors are mapped inside the app (see _ErrorMappingGroup); what remains here
    is the last guard for anything raised outside a command (exit 70, one line)."""
    try:
        _load_commands()
        app()
    except KeyboardInterrupt:  # outside a command (loading them, Click's own parsing): the same one line
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if _state["debug"]:
            import traceback
            traceback.print_exception(e, file=sys.stderr)
        typer.echo(f"error: internal error: {one_line(e, 200)} "
                   "(rerun with --debug for the traceback)", err=True)
        sys.exit(INTERNAL_EXIT)
