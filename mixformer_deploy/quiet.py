"""Keeping other people's output off ours: stdout carries the result alone and stderr our log lines, so
converters' and runtimes' prints, progress bars, warnings and C++ log lines are captured here and shown
only in the debug log (or in an error that needs them).

One place for every backend: ``held_back`` for a logger's info lines, ``captured`` for a tool's output.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def held_back(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """These loggers' lines below ``level`` held back for a while (by default info; warnings pass)."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, level))
    try:
        yield
    finally:
        for lg, level in zip(loggers, old):
            lg.setLevel(level)


@contextlib.contextmanager
def captured(tool: str, loggers: tuple[str, ...] = (), fds: bool = False) -> Iterator[list[str]]:
    """Run a converter or runtime with its output captured: Python's stdout and stderr, its warnings, the
    lines of ``loggers`` below errors and, with ``fds``, what C/C++ code writes to file descriptors 1 and 2.
    Yields a list that holds the captured text once the block ends (for an error message); the text goes
    to the debug log. Exceptions propagate unchanged."""
    text: list[str] = []
    sink = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(held_back(*loggers, level=logging.ERROR))
        if fds:
            stack.enter_context(_fd_sink(text))
        stack.enter_context(contextlib.redirect_stdout(sink))
        stack.enter_context(contextlib.redirect_stderr(sink))
        stack.callback(lambda: text.insert(0, sink.getvalue()))
        yield text
    said = "".join(text).strip()
    if said:
        log.debug("%s said: %s", tool, said[-2000:])


@contextlib.contextmanager
def _fd_sink(text: list[str]) -> Iterator[None]:
    """File descriptors 1 and 2 into a temporary file whose content is appended to ``text``."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for fd, keep in zip((1, 2), saved):
                os.dup2(keep, fd)
                os.close(keep)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))
