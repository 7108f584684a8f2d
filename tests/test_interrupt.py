"""Ctrl-C: `bench` with two artifacts (one worker process each) interrupted at start-up, while timing, and at
the end, and (slow) `export`, each as a real process group whose every process gets SIGINT, as from a
terminal (the parent last, see ``ctrl_c``): exit 130, one stderr line, no traceback from any process, every
worker gone, no partial file.

`bench` is held at a known point by its test-only hook (MIXFORMER_DEPLOY_TEST_HOLD, see bench.py): the process
that reaches the phase prints "test hold: <phase>" to stderr and waits there; the test sends SIGINT on that
line. start: each worker, before it has set anything up (the parent waits for its first reply); timing: the
parent at the first timed round of a 60 s measurement, which goes on (the workers run the model); end: each
worker as it closes after the run; write: `bench` between its output files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import WEIGHTS

HOLD = "MIXFORMER_DEPLOY_TEST_HOLD"
FAST = ["--threads", "1", "--no-floor", "--warmup-s", "0", "--min-iters", "3"]
# phase -> (the hook's setting, --duration-s)
PHASES = {"start": ("start:60", "0.1"), "timing": ("timing:0", "60"), "end": ("end:60", "0.1"),
          "write": ("write:60", "0.1")}
OUTPUTS = ("r.json", "r.md", "r.png")
ONNX_NAME = "mixformer-custom-64x64-b1-fp32.onnx"

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX) send Ctrl-C to all")


@pytest.fixture(scope="module")
def two_artifacts(tmp_path_factory) -> list[Path]:
    """The tiny fixture as ONNX (64x64, dynamic batch) under two names that share a long prefix: one
    export, and a copy (the manifest is embedded, so the copy is an artifact of its own)."""
    pytest.importorskip("onnxruntime")
    from mixformer_deploy.export_api import export

    out = tmp_path_factory.mktemp("interrupt")
    first = export(WEIGHTS, "onnx", img_size=64, batch="dynamic", output=out, check=False).path
    second = first.with_name(first.stem + "-copy.onnx")
    shutil.copyfile(first, second)
    return [first, second]


class _Reader(threading.Thread):
    """A stream read to its end in the background (a worker that outlives its parent holds it open)."""

    def __init__(self, stream, marker: str | None = None):
        super().__init__(daemon=True)
        self.stream, self.marker, self.lines = stream, marker, []
        self.seen = threading.Event()
        self.start()

    def run(self):
        for line in self.stream:
            self.lines.append(line.rstrip("\n"))
            if self.marker is not None and line.strip() == self.marker:
                self.seen.set()

    def text(self, timeout: float) -> str:
        self.join(timeout)
        assert not self.is_alive(), "a process kept the pipe open after its parent exited (a worker left behind?)"
        return "\n".join(self.lines)


def _alive_in_group(pgid: int) -> list[str]:
    """Processes of the group that still run (zombies excluded), as 'pid name' (Linux: /proc)."""
    found: list[str] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(rest[2]) == pgid and rest[0] != "Z":
            found.append(f"{stat.parent.name} {name}")
    return found


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> list[str]:
    if not Path("/proc/self/stat").exists():
        return []
    end = time.monotonic() + timeout
    while (alive := _alive_in_group(pgid)) and time.monotonic() < end:
        time.sleep(0.05)
    return alive


def ctrl_c(pgid: int) -> None:
    """SIGINT to every process of the group, as a terminal's Ctrl-C, but the parent last, 0.3 s after the
    others (Linux; elsewhere all at once): a terminal reaches them all together, and then the parent may
    reap a worker before it could print a traceback; this order shows what each worker does with it."""
    pids = [int(p.split()[0]) for p in _alive_in_group(pgid)] if Path("/proc/self/stat").exists() else []
    others = [pid for pid in pids if pid != pgid]
    if not others:
        os.killpg(pgid, signal.SIGINT)
        return
    for pid in others:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    time.sleep(0.3)
    os.kill(pgid, signal.SIGINT)


def _ctrl_c_reaches_it() -> None:
    """SIGINT back to its default in the child, as in a terminal: a test run started in the background
    (``cmd &`` in a script, as CI runners may) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(args: list[str], marker: str, env: dict | None = None, delay: float = 0.0,
              timeout: float = 120) -> tuple[int, str, str]:
    """``mixformer-deploy ARGS`` in a process group of its own, given Ctrl-C (``ctrl_c``) ``delay`` s after
    ``marker`` appears on stderr. Returns (exit code, stdout, stderr) once the process and every process
    of its group are gone."""
    proc = subprocess.Popen([sys.executable, "-m", "mixformer_deploy", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})}, preexec_fn=_ctrl_c_reaches_it)
    out, err = _Reader(proc.stdout), _Reader(proc.stderr, marker)
    try:
        end = time.monotonic() + timeout
        while not err.seen.wait(0.1):
            if proc.poll() is not None or time.monotonic() > end:
                err.join(5)
                pytest.fail(f"no {marker!r} on stderr (exit code {proc.poll()}): {err.lines[-5:]}")
        time.sleep(delay)
        ctrl_c(proc.pid)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 60 s after SIGINT; stderr ends: " + "\n".join(err.lines[-20:]))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = _wait_group_gone(proc.pid)
    assert not left, f"processes left behind after exit: {left}"
    return code, out.text(10), err.text(10)


def assert_one_interrupted_line(code: int, stdout: str, stderr: str, marker: str) -> None:
    """Exit 130; after the marker (each worker may print it) exactly one stderr line, ours; no traceback
    from any process."""
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr, stderr[-3000:]
    assert code == 130, (code, stderr[-2000:])
    lines = stderr.splitlines()
    assert [x for x in lines[lines.index(marker) + 1:] if x != marker] == ["interrupted"], stderr[-2000:]


def assert_no_partial_outputs(folder: Path, whole: tuple[str, ...] = ()) -> None:
    """The outputs named in ``whole`` are there and whole; every other is absent; no temporary remains."""
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if "partial" in n], names
    assert [n for n in names if n in OUTPUTS] == sorted(whole), names
    if "r.json" in whole:
        assert json.loads((folder / "r.json").read_text())["results"]


def bench_interrupted(artifacts: list[Path], phase: str, out: Path) -> None:
    """One SIGINT of `bench A B --json --markdown --plot` held at ``phase``, with every check."""
    hold, duration = PHASES[phase]
    out.mkdir(parents=True, exist_ok=True)
    marker = f"test hold: {phase}"
    code, stdout, stderr = interrupt(
        ["bench", *artifacts, *FAST, "--duration-s", duration, "--json", out / "r.json", "--markdown",
         out / "r.md", "--plot", out / "r.png"], marker, env={HOLD: hold})
    assert_one_interrupted_line(code, stdout, stderr, marker)
    assert stdout == "", stdout
    assert_no_partial_outputs(out, ("r.json",) if phase == "write" else ())


@pytest.mark.onnx
def test_ctrl_c_in_bench_exits_130_in_one_line(two_artifacts, tmp_path):
    """Once per point, the three runs side by side (each waits for its own marker; the slow run repeats
    each point 10 times, one after the other): workers still starting, the model running, workers closing
    after the run."""
    from concurrent.futures import ThreadPoolExecutor

    phases = ("start", "timing", "end")
    with ThreadPoolExecutor(len(phases)) as pool:
        runs = {p: pool.submit(bench_interrupted, two_artifacts, p, tmp_path / p) for p in phases}
    failed = {p: f"{type(r.exception()).__name__}: {r.exception()}" for p, r in runs.items() if r.exception()}
    assert not failed, "\n\n".join(f"[{p}] {e}" for p, e in failed.items())


@pytest.mark.slow
@pytest.mark.onnx
@pytest.mark.parametrize("phase", list(PHASES))
def test_ctrl_c_in_bench_10_of_10(two_artifacts, phase, tmp_path):
    """10 of 10 at each point, and between the output files (the JSON whole, nothing else written)."""
    for i in range(10):
        bench_interrupted(two_artifacts, phase, tmp_path / str(i))


@pytest.mark.slow
@pytest.mark.onnx
@pytest.mark.parametrize("delay", [0.0, 1.0, 2.5, 4.0])
def test_ctrl_c_in_export_exits_130_and_leaves_no_artifact(delay, tmp_path):
    """SIGINT at several moments of an ONNX export (after the weights were read): exit 130, one line, no
    traceback, and in the output folder no temporary and no artifact but a whole one with its sidecar."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    marker = "inferred custom (embed_dim 16, depths [1, 1, 2, 1], heads [1, 2, 4, 8], 10 classes) from tiny.pdparams"
    code, stdout, stderr = interrupt(["export", "-w", WEIGHTS, "--target", "onnx", "--img-size", "64",
                                      "--output", out], marker, delay=delay)
    if code == 0:
        pytest.skip(f"the export finished within {delay} s of reading the weights: nothing to interrupt")
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr, stderr[-3000:]
    lines = stderr.splitlines()   # the export's own progress lines may come between the marker and ours
    assert code == 130 and lines[-1] == "interrupted" and lines.count("interrupted") == 1, (code, stderr[-2000:])
    assert not [line for line in lines if line.startswith("error")], stderr[-2000:]
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert names in ([], [ONNX_NAME, ONNX_NAME + ".json"]), names   # published whole, or not at all
    if names:
        assert json.loads((out / names[1]).read_text())["target"] == "onnx"


@pytest.mark.onnx
def test_ctrl_c_after_the_result_is_out_changes_nothing(tmp_path):
    """SIGINT the moment the artifact's path is on stdout, while the interpreter tears its libraries down:
    exit 0 and no KeyboardInterrupt traceback (Python restores SIGINT's default at shutdown; the CLI leaves
    it ignored once the command has returned)."""
    pytest.importorskip("onnxruntime")
    proc = subprocess.Popen([sys.executable, "-m", "mixformer_deploy", "export", "-w", str(WEIGHTS), "--img-size",
                             "64", "--no-check", "--output", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_reaches_it)
    path = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert path.endswith(ONNX_NAME) and Path(path).is_file(), (path, err[-1000:])
    assert proc.returncode == 0 and "KeyboardInterrupt" not in err and "Traceback" not in err, err[-2000:]
