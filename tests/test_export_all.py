"""`export --target all`: every target of the table from one load of the weights, one table, summary.md.

Real converters and runtimes on the official fixture weights at 64x64. The fast runs use fp16 with a dynamic
batch: four targets build (ONNX, OpenVINO, the TensorRT-ready ONNX, Core ML), and the others are the rows a
user meets (a precision not offered, a fixed-batch-only target, a target that needs CUDA), in ~40 s each.
Every target at fp32 with the benchmark is the slow test (AOTInductor, ExecuTorch and LiteRT take minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import DATA

pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytestmark = pytest.mark.onnx

from mixformer_deploy.cli.app import _load_commands, app  # noqa: E402
from mixformer_deploy.backends import get_spec, keys  # noqa: E402
from mixformer_deploy.backends.spec import Tolerance  # noqa: E402

_load_commands()
WEIGHTS = DATA / "tiny.pdparams"
FAST = ["--weights", str(WEIGHTS), "--img-size", "64", "--precision", "fp16", "--batch", "dynamic"]
ENV = {**os.environ, "CI": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
STATUSES = ("passed", "FAILED", "exported", "not offered", "missing extra", "not available here", "error:",
            "reference")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixformer_deploy", "export", "--target", "all", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=1200)


def summary_rows(path: Path) -> dict[tuple[str, str], list[str]]:
    """summary.md's table: (target, precision) -> cells."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| target |"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[(cells[0], cells[1])] = cells
    return rows


# ---------------------------------------------------------------- usage errors: exit 2, before any weights

@pytest.mark.parametrize("args, message", [
    (["--opset", "18"], "--opset: per-target options do not combine with --target all"),
    (["--onnx-only"], "--onnx-only: per-target options"),
    (["--precision", "fp32,fp33"], "bad --precision"),
    (["--precision", "fp32", "--keep-fp32", "stages.3.*"], "apply to reduced precisions"),
    (["--profile", "onnx-fp16"], "--profile"),
])
def test_usage_errors_exit_2_before_the_weights_are_read(args, message, tmp_path):
    # the weights do not exist: a usage error must win (exit 2, not 4), so nothing was read
    r = CliRunner().invoke(app, ["export", "--target", "all", "--weights", str(tmp_path / "nope.safetensors"),
                                 "-o", str(tmp_path / "out"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "out").exists()


def test_bench_is_for_every_target_only(tmp_path):
    r = CliRunner().invoke(app, ["export", "--bench", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--bench goes with --target all" in r.output


# ---------------------------------------------------------------- the table, summary.md, the rows

def test_table_row_per_target_and_summary_path_last(tmp_path):
    out = tmp_path / "out"
    r = cli(*FAST, "-o", out)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    summary = Path(lines[-1])
    assert summary == out / "summary.md" and summary.is_file()
    table = [line.split() for line in lines if line.split() and line.split()[0] in keys()]
    assert sorted({t[0] for t in table}) == sorted(keys())  # one row per target of the table, on stdout

    rows = summary_rows(summary)
    assert sorted(rows) == sorted((k, "fp16") for k in keys())
    text = summary.read_text()
    assert "mixformer-deploy export --target all" in text and "Machine:" in text
    for key in keys():
        target = get_spec(key)
        status = rows[(key, "fp16")][2]
        assert status.startswith(STATUSES), status
        if "fp16" not in target.precisions:
            assert status == "not offered"
        if status.startswith(("passed", "exported")):  # built: the artifact and its sidecar are there
            built = list(out.glob(f"mixformer-custom-64x64-dyn-fp16{target.suffix}"))
            assert built and Path(str(built[0]) + ".json").is_file(), key
        assert not status.startswith(("FAILED", "error")), (key, status)
    # each built row that could run its check passed it, with its numbers in the table
    assert rows[("onnx", "fp16")][2] == "passed"
    assert float(rows[("onnx", "fp16")][4]) < 2e-2 and float(rows[("onnx", "fp16")][5]) > 0.999
    assert rows[("onnx", "fp16")][6] == "100.0%"
    for key in ("executorch", "litert"):  # fp32/int8-only or fixed-batch-only: not attempted
        if key in keys():
            assert rows[(key, "fp16")][2] == "not offered"
    if "tensorrt" in keys():  # the TensorRT-ready ONNX is verified here; the engine needs TensorRT + a GPU
        assert rows[("tensorrt", "fp16")][2].startswith("passed")
    assert not list(out.glob("*.failed"))


@pytest.mark.slow  # every target again (~22 s on 2 cores); the table test above covers the default run
def test_json_alone_on_stdout_and_exit_1_when_a_gate_fails(tmp_path, monkeypatch):
    """A tolerance no artifact can meet (atol = rtol = 0, cosine 1) for ONNX fp16: that row fails its gate and
    the command exits 1 after the others are exported; stdout is the JSON document alone."""
    from mixformer_deploy.backends.onnx.spec import OnnxSpec

    monkeypatch.setattr(OnnxSpec, "tolerances", {**OnnxSpec.tolerances, "fp16": Tolerance(0.0, 0.0, 1.0)})
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["export", "--target", "all", *FAST, "-o", str(out), "--json"])
    assert r.exit_code == 1, r.output[-3000:]
    doc = json.loads(r.stdout)  # nothing but the JSON
    rows = {(row["target"], row["precision"]): row for row in doc["rows"]}
    assert sorted(rows) == sorted((k, "fp16") for k in keys())
    onnx_row = rows[("onnx", "fp16")]
    assert onnx_row["kind"] == "failed" and onnx_row["artifact"].endswith(".onnx.failed")
    assert Path(onnx_row["artifact"]).is_file()
    assert [row["target"] for row in doc["rows"] if row["kind"] == "failed"] == ["onnx"]
    assert rows[("openvino", "fp16")]["kind"] == "passed"
    assert doc["summary"]["exit_code"] == 1 and doc["summary"]["counts"]["failed"] == 1
    assert Path(doc["summary"]["summary_md"]) == out / "summary.md"
    assert "FAILED" in (out / "summary.md").read_text()
    assert "failed their gate" in r.stderr


# ---------------------------------------------------------------- every target at fp32, timed

@pytest.mark.slow
def test_every_target_fp32_with_bench(tmp_path):
    out = tmp_path / "out"
    r = cli("--weights", WEIGHTS, "--img-size", "64", "-o", out, "--bench", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    rows = {row["target"]: row for row in doc["rows"]}
    assert set(keys()) <= set(rows) and rows["pytorch"]["kind"] == "reference"
    for key in keys():
        row = rows[key]
        assert row["kind"] not in ("failed", "error"), row
        if row["kind"] == "passed":
            assert row["max_abs"] <= 1e-3 and row["cosine"] >= 0.9999 and row["top1_agreement"] == 1.0
        if row["kind"] in ("passed", "exported") and row["runtime"]:  # runs here: timed against PyTorch eager
            assert row["p50_ms"] > 0 and row["speedup"] > 0, row
    assert doc["summary"]["bench"]["machine"] and doc["summary"]["cpu"]
    assert (out / "summary.md").is_file()
