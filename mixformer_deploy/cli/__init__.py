"""The `mixformer-deploy` command line: thin wrappers over the library.

``main`` is the console entry point. It is defined here, before the app and its dependencies are
imported, so that a Ctrl-C during those first imports is the same one line and exit 130 as later."""

from __future__ import annotations

import signal
import sys

INTERRUPTED_EXIT = 130


def _interrupted_while_starting(signum, frame):
    sys.stderr.write("interrupted\n")
    raise SystemExit(INTERRUPTED_EXIT)


def main() -> None:
    previous = signal.signal(signal.SIGINT, _interrupted_while_starting)
    from .app import main as run_app

    signal.signal(signal.SIGINT, previous)   # from here on a Ctrl-C is a KeyboardInterrupt the app maps
    try:
        run_app()
    finally:
        # the result is out: a Ctrl-C while the interpreter tears its libraries down must not turn the exit
        # code into a death by signal (Python restores SIGINT's default at shutdown, but leaves an ignore)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def __getattr__(name: str):
    if name == "app":
        from .app import app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main"]
