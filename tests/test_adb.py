"""On-device benchmarks over adb: the tools' output parsers on samples in their documented formats, and
the adb path up to and through the subprocess calls, with a stand-in `adb` script (no phone here)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import DATA

from mixformer_deploy.adb import bench_on_device
from mixformer_deploy.errors import DeviceToolError
from mixformer_deploy.backends.executorch.phone import parse_phone_output as parse_executor_runner
from mixformer_deploy.backends.litert.phone import parse_phone_output as parse_benchmark_model
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
    # first inference is the summary's (the cold run), not the first of the timed runs
    assert got["first_ms"] == pytest.approx(58.432) and got["timed_first_ms"] == pytest.approx(41.420)
    assert got["init_ms"] == pytest.approx(61.538)
    assert got["median_ms"] is None and got["memory_mb"] == {"init": 41.7227, "overall": 63.1055}


def test_benchmark_model_info_output_with_percentiles_is_parsed():
    got = parse_benchmark_model((SAMPLES / "benchmark_model_info.txt").read_text())
    assert got["count"] == 50 and got["median_ms"] == pytest.approx(23.066) and got["p95_ms"] == pytest.approx(24.118)
    assert got["delegate"] == {"name": "TfLiteXNNPackDelegate", "nodes": 1163, "of": 1163}


def test_release_executor_runner_prints_nothing_to_parse_and_says_why():
    """A Release build compiles ET_LOG out: only the outputs reach stdout."""
    text = "".join(line for line in (SAMPLES / "executor_runner.txt").read_text().splitlines(keepends=True)
                   if " executorch:" not in line)
    assert text.startswith("Output 0: tensor(")
    with pytest.raises(DeviceToolError, match="EXECUTORCH_ENABLE_LOGGING=ON") as e:
        parse_executor_runner(text)
    assert e.value.exit_code == 5


def test_phone_backends_declare_their_tool_and_module():
    """adb.py names no backend: each phone backend declares its binary and offers the same functions."""
    from mixformer_deploy.backends import all_specs

    phones = {s.key: s for s in all_specs() if "phone_bench" in s.capabilities}
    assert {k: s.phone_bench for k, s in phones.items()} == {"executorch": "executor_runner",
                                                             "litert": "benchmark_model"}
    for spec in phones.values():
        module = spec.phone()
        assert all(callable(getattr(module, f)) for f in ("phone_command", "parse_phone_output", "phone_bench"))
        assert module.RUNTIME_DIST in spec.versions  # the manifest records its version
        command = module.phone_command("/t/tool", "/t/m odel", threads=3, runs=7, warmup=2)
        assert command.startswith("/t/tool ") and "'/t/m odel'" in command and "=3" in command


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
      *executor_runner*--num_executions=1)  # one execution: the documented line with its own count and time
        sed 's/10 time(s) in 452.750000 ms/1 time(s) in 61.250000 ms/' "{samples}/executor_runner.txt" | $ET_FILTER ;;
      *executor_runner*) $ET_FILTER "{samples}/executor_runner.txt" ;;
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
def fake_adb(tmp_path, monkeypatch):
    monkeypatch.setenv("ET_FILTER", "cat")  # "grep -v executorch:" replays a Release executor_runner
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


# ---------------------------------------------------------------- the CLI, with the stand-in adb on PATH

def _cli(*args):
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app

    _load_commands()
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def phone_docs(tmp_path, fake_adb, monkeypatch):
    """`bench --adb` on a .pte and on a .tflite through the CLI: (CLI results, written documents)."""
    exe, _ = fake_adb
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    out = {}
    for target, suffix, tool in (("executorch", ".pte", "executor_runner"), ("litert", ".tflite", "benchmark_model")):
        (tmp_path / target).mkdir()
        binary = tmp_path / target / tool
        binary.write_bytes(b"\x7fELF stand-in")
        doc = tmp_path / f"phone-{target}.json"
        r = _cli("bench", _artifact(tmp_path / target, target, suffix), "--adb", "phone1", "--benchmark-binary",
                 binary, "--min-iters", 20, "--json", doc)
        out[target] = (r, doc)
    return out


def test_bench_cli_on_a_phone_writes_a_bench_document(phone_docs):
    from mixformer_deploy.reports.bench_json import read_results

    for target, first, load in (("executorch", "61.2 ms", "–"), ("litert", "31.9 ms", "48 ms")):
        r, path = phone_docs[target]
        assert r.exit_code == 0, (r.output, r.exception)
        assert f"load {load}, first inference b1 {first}" in r.stdout and f"wrote {path}" in r.stdout
        row = read_results(path)["results"][0]  # read_results validates the schema
        assert row["runtime"] == target and row["device"] == "adb:phone1"
    et = read_results(phone_docs["executorch"][1])
    assert et["results"][0]["first_inference_ms"] == pytest.approx(61.25)  # its own 1-execution run
    assert et["results"][0]["latency_ms"]["p50"] == pytest.approx(45.275) and et["artifacts"][0]["load_ms"] is None
    lite = read_results(phone_docs["litert"][1])
    assert lite["results"][0]["first_inference_ms"] == pytest.approx(31.877)  # "First inference", not the timed first=


def test_bench_cli_on_a_release_executor_runner_is_exit_5(tmp_path, fake_adb, monkeypatch):
    exe, _ = fake_adb
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ET_FILTER", "grep -v executorch:")
    runner = tmp_path / "executor_runner"
    runner.write_bytes(b"\x7fELF stand-in")
    r = _cli("bench", _artifact(tmp_path, "executorch", ".pte"), "--adb", "phone1", "--benchmark-binary", runner)
    assert r.exit_code == 5 and "EXECUTORCH_ENABLE_LOGGING=ON" in r.stderr


def test_report_shows_phones_beside_a_cpu(tmp_path, phone_docs):
    """Phone documents lack the CPU run's policy and (LiteRT) raw samples; report shows what they have."""
    pytest.importorskip("matplotlib")
    from mixformer_deploy import create_model
    from mixformer_deploy.checkpoints import save_safetensors

    weights = save_safetensors(create_model("custom", 10, seed=0, embed_dim=16, depths=(1, 1, 2, 1),
                                            num_heads=(1, 2, 4, 8)), tmp_path / "tiny.safetensors",
                               extra={"input_size": "64x64"})
    cpu = tmp_path / "cpu.json"
    r = _cli("bench", weights, "--threads", 1, "--warmup-s", 0.05, "--duration-s", 0.2, "--min-iters", 3,
             "--no-floor", "--json", cpu)
    assert r.exit_code == 0, (r.output, r.exception)
    docs = [phone_docs["executorch"][1], phone_docs["litert"][1], cpu]
    for name in ("report.md", "report.html"):
        r = _cli("report", *docs, "--output", tmp_path / "rep" / name)
        assert r.exit_code == 0, (r.output, r.exception)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("\n## ") == 2 and "## sm8550-test-phone-8c-2t" in md  # one section per machine
    assert "timed by executor_runner on the device: 20 runs after 5 warm-up" in md
    assert "timed by benchmark_model on the device" in md and "tiny.safetensors" in md
    for line in (ln for ln in md.splitlines() if ln.startswith("| mixformer-b1")):
        assert "| 23.1 |" in line or "| 45.3 |" in line  # p50 of each phone row
    assert (tmp_path / "rep" / "report-latency.png").stat().st_size > 0  # from the rows with samples
    assert "sm8550-test-phone-8c-2t" in (tmp_path / "rep" / "report.html").read_text()
