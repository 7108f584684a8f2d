"""The Typer app and the one place where library errors become one stderr line and an exit code."""

from __future__ import annotations

import logging
from contextlib import contextmanager
import os
import sys

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import MixformerDeployError

class _ErrorMappingGroup(TyperGroup):
    """The one place where the library's typed errors become one stderr line and the contract's exit
    code, for the console script and for CliRunner alike."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MixformerDeployError as e:
            if _state["debug"]:
                raise
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_ErrorMappingGroup,
    name="mixformer-deploy",
    help="Ship trained MixFormer weights to edge runtimes, verified for parity and benchmarked.\n\n"
         "Exit codes: 0 ok; 1 a gate failed; 2 usage error; 3 backend/hardware not available; "
         "4 bad input file; 5 converter failed.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}


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
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("onnxscript", "onnx_ir", "torch", "onnxslim", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def quiet_logger(name: str):
    """Hold back a library logger's info lines while a command works (it prints its own summary, and an
    error stays the only stderr line)."""
    lg = logging.getLogger(name)
    old = lg.level
    lg.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        lg.setLevel(old)


def show_progress() -> bool:
    """Progress bars on an interactive terminal only; CI logs stay quiet."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def _load_commands() -> None:
    # each module registers its commands on `app`; imported here so that `--help` lists them all.
    # A command module that does not exist (yet) is skipped; any other import failure surfaces.
    import importlib
    for name in ("bench_cmd", "export_cmd", "info_cmd", "inspect_cmd", "parity_cmd", "report_cmd", "trt_cmd"):
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{name}":
                raise


def main() -> None:
    """Console entry point. Typed errors are mapped inside the app (see _ErrorMappingGroup); what
    remains here is the last guard: no traceback for anything unexpected unless --debug."""
    _load_commands()
    try:
        app()
    except Exception as e:
        if _state["debug"] or "--debug" in sys.argv:
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {' '.join(str(e).split())[:300]} (rerun with --debug)",
                   err=True)
        sys.exit(1)
