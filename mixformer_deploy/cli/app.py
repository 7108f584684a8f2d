"""The Typer app and the one place where library errors become one stderr line and an exit code."""

from __future__ import annotations

import logging
import os
import sys

import typer

from .. import __version__
from ..errors import MixformerDeployError

app = typer.Typer(
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


def show_progress() -> bool:
    """Progress bars on an interactive terminal only; CI logs stay quiet."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def fail(message: str, code: int) -> "typer.Exit":
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _load_commands() -> None:
    # each module registers its commands on `app`; imported here so that `--help` lists them all
    from . import bench_cmd, export_cmd, info_cmd, parity_cmd, report_cmd  # noqa: F401


def main() -> None:
    _load_commands()
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except MixformerDeployError as e:
        if debug:
            raise
        typer.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors come here in non-standalone mode
        import click
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if debug:
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {' '.join(str(e).split())[:300]} (rerun with --debug)",
                   err=True)
        sys.exit(1)
