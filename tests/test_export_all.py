"""`export --target all`: every target of the table from one load of the weights, one table, summary.md.

Real converters and runtimes on the official fixture weights at 64x64. The fast runs use fp16 with a dynamic
batch: four targets build (ONNX, OpenVINO, the TensorRT-ready ONNX, Core ML), and the others are the rows a
user meets (a precision not offered, a fixed-batch-only target, a target that needs CUDA), in ~40 s each.
Every target at fp32 with the benchmark is the slow test (AOTInductor, ExecuTorch and LiteRT take minutes).
"""

from __future__ import annotations

import json
import os
import re
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
STATUSES = ("passed", "FAILED", "exported", "missing extra", "not available here", "error", "reference")
NOT_OFFERED = "not offered: "


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


def not_offered(text: str) -> dict[str, list[str]]:
    """The one not-offered line (terminal or summary.md): precision -> targets."""
    line = next((x for x in text.splitlines() if x.lower().startswith(NOT_OFFERED)), None)
    if line is None:
        return {}
    groups = (g.split(" by ") for g in line[len(NOT_OFFERED):].rstrip(".").split("; "))
    return {p: targets.split(", ") for p, targets in groups}


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

@pytest.mark.slow  # every target exported (~25 s); the table's layout is unit-tested in test_export_table.py
def test_table_row_per_target_and_summary_path_last(tmp_path):
    out = tmp_path / "out"
    r = cli(*FAST, "-o", out)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    summary = Path(lines[-1])
    assert summary == out / "summary.md" and summary.is_file()
    table = [line.split() for line in lines if line.split() and line.split()[0] in keys()]
    folded = not_offered(r.stdout).get("fp16", [])
    assert sorted({t[0] for t in table} | set(folded)) == sorted(keys())  # every target: a row, or not offered

    rows = summary_rows(summary)
    text = summary.read_text()
    skipped = not_offered(text).get("fp16", [])
    assert sorted([k for k, _ in rows] + skipped) == sorted(keys()) and not set(skipped) & {k for k, _ in rows}
    assert "mixformer-deploy export --target all" in text and "Machine:" in text and "Batch dynamic." in text
    assert " exports fp32" not in text and "not offered |" not in text  # one line, no per-row notes
    for key in keys():
        target = get_spec(key)
        if "fp16" not in target.precisions:
            assert key in skipped
        if key in skipped:
            continue
        status = rows[(key, "fp16")][2]
        assert status.startswith(STATUSES), status
        if status.startswith(("passed", "exported")):  # built: the artifact and its sidecar are there
            built = list(out.glob(f"mixformer-custom-64x64-dyn-fp16{target.suffix}"))
            assert built and Path(str(built[0]) + ".json").is_file(), key
            assert built[0].name not in re.sub(r"`[^`]*`", "", text.split("Notes:")[-1]), key  # only in commands
        assert not status.startswith(("FAILED", "error")), (key, status)
    # each built row that could run its check passed it, with its numbers in the table
    assert rows[("onnx", "fp16")][2] == "passed"
    assert float(rows[("onnx", "fp16")][4]) < 2e-2 and float(rows[("onnx", "fp16")][5]) > 0.999
    assert rows[("onnx", "fp16")][6] == "100.0%"
    for key in ("executorch", "litert"):  # fp32/int8-only or fixed-batch-only: not attempted
        if key in keys():
            assert key in skipped
    if "tensorrt" in keys():  # the TensorRT-ready ONNX is verified here on onnxruntime; the engine elsewhere
        trt = rows[("tensorrt", "fp16")]
        assert trt[2] == "passed on onnxruntime" and trt[-2:] == ["", ""]  # never an onnxruntime time
        for note in (n for n in text.splitlines() if n.startswith("- tensorrt fp16: ")):
            assert "printed above" not in note and "`trtexec " in note, note
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
        if row["kind"] in ("passed", "exported") and row["runtime"] and not row["deploy_runtime"]:
            assert row["p50_ms"] > 0 and row["speedup"] > 0, row  # runs here: timed against PyTorch eager
        elif row["deploy_runtime"]:  # the TensorRT-ready ONNX on onnxruntime: that time is not TensorRT's
            assert row["p50_ms"] is None and row["speedup"] is None, row
    assert doc["summary"]["bench"]["machine"] and doc["summary"]["cpu"]
    assert (out / "summary.md").is_file()


# ---------------------------------------------------------------- a runtime precision: OpenVINO's bf16

def test_openvino_bf16_is_the_fp32_ir_run_at_bf16_not_an_export(tmp_path, monkeypatch):
    """OpenVINO alone (the others are the table test's), fp32 and bf16: no bf16 IR is written; the bf16 row
    is the fp32 IR checked with the runtime's bf16 setting where this CPU has bf16, and says it is not
    available here where it does not (OpenVINO's own answer)."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    import mixformer_deploy.backends as backends
    from mixformer_deploy.backends.openvino import runner
    from mixformer_deploy.export_all import export_all

    only, every = [get_spec("openvino")], backends.all_specs
    monkeypatch.setattr(backends, "all_specs", lambda exporting=False: only if exporting else every())
    has_bf16 = "BF16" in runner.cpu_capabilities(runner._ov().Core())
    result = export_all(weights=WEIGHTS, img_size="64", precisions="fp32,bf16", output=tmp_path)
    rows = {r.label: r for r in result.rows}
    assert list(rows) == ["openvino fp32", "openvino bf16 (runtime)"] and result.exit_code == 0
    row = rows["openvino bf16 (runtime)"]
    assert row.artifact == rows["openvino fp32"].artifact and not list(tmp_path.glob("*bf16*"))
    assert row.runtime_options == {"precision": "bf16"}
    if has_bf16:
        assert row.kind == "passed" and 0 < row.max_abs < 0.1 and row.cosine > 0.998
    else:
        assert row.status == "not available here" and "bf16" in row.note
    md = (tmp_path / "summary.md").read_text()
    assert "| openvino | bf16 (runtime) | " + ("passed" if has_bf16 else "not available here") in md
    assert "bf16 (runtime): no bf16 export; the fp32 artifact run by its runtime at bf16" in md

    # a CPU without bf16, as OpenVINO would say: the same row, not available here, with the runtime's reason
    monkeypatch.setattr(runner, "cpu_capabilities", lambda core: ["FP32", "INT8"])
    from mixformer_deploy.export_all import PENDING, Row, _Commands, _runtime_row
    pending = Row("openvino", "bf16", PENDING, PENDING, runtime_options={"precision": "bf16"})
    base = Row("openvino", "fp32", "passed", "passed", artifact=row.artifact, runtime="openvino")
    result.rows = [base]
    elsewhere = _Commands(WEIGHTS, None, "64", 1, None, tmp_path)
    out = _runtime_row(None, result, only[0], pending, elsewhere, False, {"check": True, "source": None})
    assert out.label == "openvino bf16 (runtime)" and out.status == "not available here"
    assert out.note.startswith("this CPU cannot execute bf16") and out.p50_ms is None
    assert out.command.startswith("mixformer-deploy parity ")
    assert f"-O precision=bf16 --weights {WEIGHTS}" in out.command
