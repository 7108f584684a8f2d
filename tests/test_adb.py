"""On-device benchmarks over adb: the tools' output parsers on samples in their documented formats, and
the adb path up to and through the subprocess calls, with a stand-in `adb` script (no phone here)."""

from __future__ import annotations

import json
import stat

import pytest

from conftest import DATA

from mixformer_deploy.adb import (DeviceToolError, bench_on_device, parse_benchmark_model,
                                  parse_executor_runner)
from mixformer_deploy.errors import InputFileError, MissingBackendError, UsageError
from mixformer_deploy.reports.bench_json import validate

SAMPLES = DATA / "adb"


def test_executor_runner_output_is_parsed():
    got = parse_executor_runner((SAMPLES / "executor_runner.txt").read_text())
    assert got == {"runs": 10, "total_ms": 452.75, "mean_ms": pytest.approx(45.275)}


def test_executor_runner_failure_names_the_reason():
    with pytest.raises(DeviceToolError, match="Loading of method forward failed"):
        parse_executor_runner((SAMPLES / "executor_runner_failed.txt").read_text())
    with pytest.raises(DeviceToolError):
        parse_executor_runner("")


def test_benchmark_model_plain_output_is_parsed():
    got = parse_benchmark_model((SAMPLES / "benchmark_model.txt").read_text())
    assert got["count"] == 50 and got["warmup_count"] == 12
    assert got["mean_ms"] == pytest.approx(41.3987) and got["std_ms"] == pytest.approx(0.612)
    assert got["min_ms"] == pytest.approx(40.731) and got["max_ms"] == pytest.approx(44.205)
    assert got["first_ms"] == pytest.approx(41.420) and got["init_ms"] == pytest.approx(61.538)
    assert got["median_ms"] is None and got["memory_mb"] == {"init": 41.7227, "overall": 63.1055}


def test_benchmark_model_info_output_with_percentiles_is_parsed():
    got = parse_benchmark_model((SAMPLES / "benchmark_model_info.txt").read_text())
    assert got["count"] == 50 and got["median_ms"] == pytest.approx(23.066) and got["p95_ms"] == pytest.approx(24.118)
    assert got["delegate"] == {"name": "TfLiteXNNPackDelegate", "nodes": 1163, "of": 1163}


def test_benchmark_model_without_a_summary_is_a_tool_error():
    with pytest.raises(DeviceToolError, match="no timing summary"):
        parse_benchmark_model("ERROR: Could not open 'model.tflite'.\nFailed to initialize the interpreter\n")


# ---------------------------------------------------------------- the adb path

FAKE_ADB = """#!/bin/sh
# stand-in for the adb client: one device "phone1"
[ "$1" = "-s" ] || exit 2
serial="$2"; shift 2
if [ "$serial" != "phone1" ]; then echo "error: device '$serial' not found" >&2; exit 1; fi
echo "$@" >> "{log}"
case "$1" in
  get-state) echo device ;;
  push) [ -f "$2" ] || exit 1; echo "$2: 1 file pushed." ;;
  shell)
    case "$2" in
      *benchmark_model*) cat "{samples}/benchmark_model_info.txt" ;;
      *executor_runner*) cat "{samples}/executor_runner.txt" ;;
      "getprop ro.soc.model") echo SM8550 ;;
      "getprop ro.product.model") echo "Test Phone" ;;
      "getprop ro.product.cpu.abi") echo arm64-v8a ;;
      "getprop ro.build.version.release") echo 15 ;;
      "cat /sys/devices/system/cpu/present") echo 0-7 ;;
      *) ;;
    esac ;;
esac
"""


@pytest.fixture
def fake_adb(tmp_path):
    log = tmp_path / "adb.log"
    exe = tmp_path / "bin" / "adb"
    exe.parent.mkdir()
    exe.write_text(FAKE_ADB.format(log=log, samples=SAMPLES))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe, log


def _artifact(tmp_path, target, suffix):
    path = tmp_path / f"mixformer-b1-224x224-b1-int8{suffix}"
    path.write_bytes(b"stand-in artifact bytes")
    manifest = {"schema": "mixformer-deploy/manifest/1", "target": target, "runtime": target, "variant": "B1",
                "input_size": [224, 224], "batch": 1, "precision": "int8", "num_classes": 1000,
                "weights": {"sha256": None}}
    (tmp_path / (path.name + ".json")).write_text(json.dumps(manifest))
    return path


@pytest.fixture
def binary(tmp_path):
    b = tmp_path / "benchmark_model"
    b.write_bytes(b"\x7fELF stand-in")
    return b


def test_litert_on_a_phone_gives_a_bench_document(tmp_path, fake_adb, binary):
    exe, log = fake_adb
    doc = bench_on_device(_artifact(tmp_path, "litert", ".tflite"), "phone1", binary, runs=50, threads=2,
                          adb=str(exe))
    assert validate(doc) == []
    row = doc["results"][0]
    assert row["runtime"] == "litert" and row["device"] == "adb:phone1" and row["threads"] == 2
    assert row["latency_ms"]["p50"] == pytest.approx(23.066) and row["iterations"] == 50
    assert doc["machine"]["cpu_model"] == "SM8550 (Test Phone)" and doc["machine"]["slug"] == "sm8550-test-phone-8c-2t"
    calls = log.read_text()
    assert "push" in calls and "--num_threads=2" in calls and "--num_runs=50" in calls and "--use_xnnpack=true" in calls


def test_executorch_on_a_phone_runs_rounds(tmp_path, fake_adb):
    exe, log = fake_adb
    runner = tmp_path / "executor_runner"
    runner.write_bytes(b"\x7fELF stand-in")
    doc = bench_on_device(_artifact(tmp_path, "executorch", ".pte"), "phone1", runner, runs=20, threads=2,
                          rounds=4, adb=str(exe))
    assert validate(doc) == []
    row = doc["results"][0]
    assert row["runtime"] == "executorch" and len(row["samples_ms"]) == 4 and row["iterations"] == 20
    assert row["latency_ms"]["p50"] == pytest.approx(45.275)
    assert "--num_executions=5" in log.read_text() and "--cpu_threads=2" in log.read_text()


def test_missing_adb_is_exit_3(tmp_path, binary, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(MissingBackendError, match="adb") as e:
        bench_on_device(_artifact(tmp_path, "litert", ".tflite"), "phone1", binary)
    assert e.value.exit_code == 3


def test_missing_device_is_exit_3(tmp_path, fake_adb, binary):
    exe, _ = fake_adb
    with pytest.raises(MissingBackendError, match="no Android device 'other'") as e:
        bench_on_device(_artifact(tmp_path, "litert", ".tflite"), "other", binary, adb=str(exe))
    assert e.value.exit_code == 3


def test_bad_inputs_are_refused_before_adb_is_called(tmp_path, fake_adb, binary):
    exe, log = fake_adb
    with pytest.raises(InputFileError, match="benchmark binary not found"):
        bench_on_device(_artifact(tmp_path, "litert", ".tflite"), "phone1", tmp_path / "nope", adb=str(exe))
    with pytest.raises(UsageError, match="executorch|litert"):
        bench_on_device(_artifact(tmp_path, "onnx", ".onnx"), "phone1", binary, adb=str(exe))
    with pytest.raises(UsageError):
        bench_on_device(_artifact(tmp_path, "litert", ".tflite"), "phone1", binary, runs=0, adb=str(exe))
    assert not log.exists()


def test_bench_cli_adb_options_are_checked(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "m.pte"), "--adb", "emulator-5554"])
    assert r.exit_code == 2 and "go together" in r.stderr
    monkeypatch.setenv("PATH", str(tmp_path))  # no adb anywhere
    tool = tmp_path / "executor_runner"
    tool.write_bytes(b"\x7fELF")
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "m.pte"), "--adb", "emulator-5554", "--benchmark-binary", str(tool)])
    assert r.exit_code == 4 and r.stderr.strip().splitlines()[-1] == f"error: artifact not found: {tmp_path / 'm.pte'}"
