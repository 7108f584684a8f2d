"""Keeping other people's output off ours: stdout carries the result alone and stderr our log lines, so
converters' and runtimes' prints, progress bars, warnings and C++ log lines are captured here and shown
only in the debug log (or in an error that needs them). A captured line that matters to a user (a
converter's own error or accuracy warning: the backend's ``notable`` patterns) becomes one warning of ours.

One place for every backend: ``held_back`` for a logger's info lines, ``captured`` for a tool's output,
``log_stream`` for the stream our own log lines use (a private copy of stderr, so that capturing file
descriptor 2 around a converter never swallows them).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Iterator, Sequence

log = logging.getLogger(__name__)


def log_stream():
    """A line-buffered stream on a duplicate of file descriptor 2: what ``captured`` redirects is fd 2,
    never this. Falls back to ``sys.stderr`` where it has no descriptor (CliRunner's in-memory streams)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stderr
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                     errors="replace")


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
def captured(tool: str, fds: bool = True, notable: Sequence[str] = ()) -> Iterator[list[str]]:
    """Run a converter or runtime with its output captured: Python's stdout and stderr, its warnings, every
    other package's log records and (``fds``) what C/C++ code writes to file descriptors 1 and 2.
    Yields a list that holds the captured text once the block ends (for an error message). The text goes
    to the debug log; lines matching a ``notable`` pattern become warnings, once each. Exceptions
    propagate unchanged. Never around a timed run: redirecting costs nothing, but printing does."""
    text: list[str] = []
    sink = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(_others_records_into(text))
        if fds:
            stack.enter_context(_fd_sink(text))
        stack.enter_context(contextlib.redirect_stdout(sink))
        stack.enter_context(contextlib.redirect_stderr(sink))
        stack.callback(lambda: text.insert(0, sink.getvalue()))
        yield text
    said = "".join(text).strip()
    if said:
        log.debug("%s said:\n%s", tool, said[-20000:])
        for line in notable_lines(said, notable):
            log.warning("%s: %s", tool, line)


def notable_lines(text: str, patterns: Sequence[str], limit: int = 5) -> list[str]:
    """The distinct lines of ``text`` that match one of ``patterns``, at most ``limit`` (each cut to 200
    characters): what a user must see of a converter's output, without its flood."""
    found: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and line[:200] not in found and any(re.search(p, line) for p in patterns):
            found.append(line[:200])
            if len(found) == limit:
                break
    return found


class _Divert(logging.Filter):
    """On our handlers while capturing: another package's record goes into the captured text instead."""

    def __init__(self, text: list[str]):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "mixformer_deploy" or record.name.startswith("mixformer_deploy."):
            return True
        self.text.append(f"{record.name}: {record.getMessage()}\n")
        return False


@contextlib.contextmanager
def _others_records_into(text: list[str]) -> Iterator[None]:
    """Third-party loggers that propagate to the root reach our stderr handler: divert them (their own
    handlers write to the captured streams)."""
    divert, handlers = _Divert(text), list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(divert)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(divert)


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
            _flush_native()
            for fd, keep in zip((1, 2), saved):
                os.dup2(keep, fd)
                os.close(keep)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def _flush_native() -> None:
    """C stdio buffers what native code printed to a redirected descriptor: flush it into the sink now,
    or it would reach the terminal later, outside the capture."""
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
