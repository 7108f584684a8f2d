"""Nothing lost: exports killed or run twice at once, hostile ONNX files, temporaries of killed writers, errors
as a user meets them. Real subprocesses where the fault is a process's. (Reproducible bytes and the broken
artifacts every backend must refuse: tests/conformance/.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WEIGHTS

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytestmark = pytest.mark.onnx

from typer.testing import CliRunner  # noqa: E402

from mixformer_deploy.cli.app import _load_commands, app  # noqa: E402
from mixformer_deploy.export_api import export  # noqa: E402

_load_commands()
NAME = "mixformer-custom-64x64-b1-fp32.onnx"


def _export_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "mixformer_deploy", "-q", "export", "--weights", str(WEIGHTS), "--img-size", "64",
            "--no-check", "--output", str(out)]


def _partial_in(folder: Path) -> bool:
    return any(".partial" in e.name for e in os.scandir(folder))


def _kill_export(folder: Path, when, fresh: bool = False) -> bool:
    """Start an export into ``folder`` and SIGKILL it after ``when`` seconds, or ("writing") the moment a
    temporary of its artifact appears. That window is milliseconds long, so a "writing" kill retries (up
    to 5 exports) until one lands in it; ``fresh``: an export that finished first is cleared before the
    next try. Returns whether a temporary existed at the kill."""
    for _ in range(5 if when == "writing" else 1):
        proc = subprocess.Popen(_export_cmd(folder), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if when == "writing":
            while proc.poll() is None and not _partial_in(folder):
                pass
        else:
            time.sleep(when)
        caught = _partial_in(folder)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if caught or when != "writing":
            return caught
        if fresh:
            for f in (folder / NAME, folder / (NAME + ".json")):
                f.unlink(missing_ok=True)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("when", [0.5, "writing", 4.0])
def test_killed_export_leaves_no_partial_artifact_and_keeps_the_earlier_one(tmp_path, when, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")   # a finished export then writes the same bytes
    good = export(WEIGHTS, img_size=64, output=tmp_path, check=False).path
    side = tmp_path / (NAME + ".json")
    before, side_before = good.read_bytes(), side.read_bytes()
    caught = _kill_export(tmp_path, when)
    if when == "writing":
        assert caught, "no kill landed while the artifact was being written"
    # either the earlier artifact untouched, or (the export won the race) a whole new one: the same bytes
    assert good.read_bytes() == before, "the earlier artifact was damaged"
    assert side.read_bytes() == side_before, "the earlier sidecar was damaged"
    # the next export of that name completes and removes the dead writer's temporaries
    subprocess.run(_export_cmd(tmp_path), check=True, stdout=subprocess.DEVNULL)
    leftovers = [p.name for p in tmp_path.iterdir() if ".partial" in p.name]
    assert leftovers == []


@pytest.mark.slow
def test_an_export_killed_while_writing_leaves_nothing_under_the_final_name(tmp_path):
    assert _kill_export(tmp_path, "writing", fresh=True), "no kill landed while the artifact was being written"
    assert not (tmp_path / NAME).exists() and not (tmp_path / (NAME + ".json")).exists()


@pytest.mark.slow
def test_two_exports_to_the_same_output_at_once_both_finish(tmp_path):
    procs = [subprocess.Popen(_export_cmd(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-300:] for r in results]
    final = tmp_path / NAME
    assert onnx.load(str(final)).graph.node and (tmp_path / (NAME + ".json")).is_file()
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []


# ---------------------------------------------------------------- hostile artifacts
# Not an artifact, zero-length and truncated files of every backend: tests/conformance/test_hostile.py. Here the
# ONNX-only ones: bytes flipped all over the protobuf, a tensor declaring 2**62 elements, external data that
# points outside the model's folder.

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good = export(WEIGHTS, img_size=64, output=root / "good", check=False).path
    data = good.read_bytes()
    corpus = {}

    def put(name, content: bytes):
        d = root / name
        d.mkdir()
        (d / "m.onnx").write_bytes(content)
        corpus[name] = d / "m.onnx"

    flipped = bytearray(data)
    for i in range(100, len(flipped), max(1, len(flipped) // 50)):
        flipped[i] ^= 0xFF
    put("bit-flipped", bytes(flipped))
    model = onnx.load(str(good))
    big = model.graph.initializer[0]
    big.dims[:] = [2**31, 2**31]
    put("huge-declared-tensor", model.SerializeToString())
    ext = onnx.load(str(good))
    onnx.save(ext, str(root / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    outside = onnx.load(str(root / "ext.onnx"), load_external_data=False)
    for t in outside.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    put("external-data-outside", outside.SerializeToString())
    return corpus


@pytest.mark.parametrize("command", ["parity", "predict", "inspect", "bench"])
def test_hostile_onnx_files_are_one_line_and_exit_4(hostile, command, tmp_path):
    from skimage import data as skdata
    from skimage.io import imsave

    image = tmp_path / "cat.png"
    imsave(image, skdata.chelsea())
    for name, path in hostile.items():
        args = {"parity": ["parity", path, "--weights", WEIGHTS], "predict": ["predict", image, "--artifact", path],
                "inspect": ["inspect", path], "bench": ["bench", path, "--duration-s", "0.1", "--no-floor"]}[command]
        start = time.perf_counter()
        r = CliRunner().invoke(app, [str(a) for a in args])
        lines = r.stderr.strip().splitlines()
        if command == "inspect" and name == "bit-flipped" and r.exit_code == 0:
            continue  # flipped weight bytes still parse: inspect reports the structure, which is intact
        assert r.exit_code == 4, (name, r.exit_code, r.stderr[-400:])
        assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, (name, r.stderr[-400:])
        assert time.perf_counter() - start < 60, name


# ---------------------------------------------------------------- temporaries of killed writers

def test_a_killed_writers_json_temporaries_are_cleaned_and_a_live_writers_kept(tmp_path):
    """A writer killed mid-sidecar (a real process, dying at the rename) leaves temporaries that carry its
    pid: the cleanup before the next export removes them, and keeps those of a writer still alive."""
    from mixformer_deploy.artifact import remove_stale_temporaries, sidecar_path, temp_path, write_json

    final = tmp_path / NAME
    child = ("import os, sys; from pathlib import Path; from mixformer_deploy import artifact as a; "
             "final = Path(sys.argv[1]); a.write_json(a.sidecar_path(a.temp_path(final)), {}); "
             "os.replace = lambda *_: os._exit(9); a.write_json_atomic(a.sidecar_path(final), {})")
    assert subprocess.run([sys.executable, "-c", child, str(final)]).returncode == 9
    dead = sorted(tmp_path.iterdir())
    assert len(dead) == 2 and all(".partial" in p.name for p in dead), dead
    live = [write_json(temp_path(sidecar_path(final)), {}), write_json(sidecar_path(temp_path(final)), {})]
    assert sorted(remove_stale_temporaries(final)) == dead
    assert sorted(tmp_path.iterdir()) == sorted(live)


# ---------------------------------------------------------------- as a user meets it

def _one_line(r, code: int) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), (r.exit_code, r.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """An artifact of seeded random weights (predict warns about it) and an image to predict on."""
    from skimage import data as skdata
    from skimage.io import imsave

    root = tmp_path_factory.mktemp("seeded")
    imsave(root / "cat.png", skdata.chelsea())
    return export(variant="B0", num_classes=10, img_size=32, output=root, check=False).path, root / "cat.png"


def test_options_are_checked_before_anything_is_printed(tmp_path, seeded):
    """Each bad option is the only stderr line: no 'inferred B0 ...' or seeded-weights warning first."""
    artifact, image = seeded
    _one_line(CliRunner().invoke(app, ["export", "--output", str(tmp_path / "foo.txt")]), 2)
    unknown = _one_line(CliRunner().invoke(app, ["export", "--target", "foo"]), 2)
    assert "trt (= tensorrt)" in unknown and "or all" in unknown and "onnx" in unknown  # every spelling named
    _one_line(CliRunner().invoke(app, ["export", "--weights", str(WEIGHTS), "--accuracy-set",
                                       str(tmp_path / "missing")]), 4)
    _one_line(CliRunner().invoke(app, ["predict", str(tmp_path / "nope.png")]), 4)
    assert "tpu" in _one_line(CliRunner().invoke(app, ["predict", str(image), "--artifact", str(artifact),
                                                       "--device", "tpu"]), 2)
    from mixformer_deploy.errors import InputFileError
    with pytest.raises(InputFileError, match="inputs 'nope'"):  # before the (missing) weights are looked at
        export(tmp_path / "missing.pt", inputs=("nope",), output=tmp_path)


@pytest.mark.parametrize("args, code", [(["--weights", "/nonexistent/m.pt"], 4), (["--img-size", "225"], 2)])
def test_debug_and_quiet_never_change_exit_codes_before_or_after_the_subcommand(args, code):
    for before, after in (([], []), (["--debug"], []), ([], ["--debug"]), ([], ["--quiet"]), (["-q"], [])):
        r = CliRunner().invoke(app, [*before, "export", *args, *after])
        assert r.exit_code == code, (before, after, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith("error: ")
        assert ("Traceback" in r.stderr) == ("--debug" in before + after), r.stderr  # --debug took effect


def test_quiet_export_leaves_only_warnings_and_errors(tmp_path):
    loud = CliRunner().invoke(app, ["export", "--weights", str(WEIGHTS), "--img-size", "64", "-o", str(tmp_path)])
    assert loud.exit_code == 0 and "PASS" in loud.stderr, loud.stderr
    r = CliRunner().invoke(app, ["export", "--weights", str(WEIGHTS), "--img-size", "64", "-o", str(tmp_path), "-q"])
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / NAME)
    assert [line for line in r.stderr.splitlines() if "warning" not in line.lower()] == [], r.stderr
