"""`info`, `convert-weights`, the root options, and the environment facts they print."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mixformer_deploy import __version__, environment, shipped
from mixformer_deploy.checkpoints import load_checkpoint, sha256_file
from mixformer_deploy.cli.app import _load_commands, app

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "tiny.pdparams"
ROOT = Path(__file__).resolve().parent.parent

_load_commands()
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0]


# ---------------------------------------------------------------- root options

def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    assert "info" in r.stdout and "convert-weights" in r.stdout
    r = invoke("info", "--help")
    assert r.exit_code == 0 and "--img-size" in r.stdout and "--weights" in r.stdout


def test_export_help_names_each_targets_own_meaning_of_a_shared_option(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    r = invoke("export", "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    assert "tensorrt: Largest batch of the engine's profile (dynamic batch; default 32" in text
    assert "aoti: Largest batch of a --batch dynamic package (default 64)" in text


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"mixformer-deploy {__version__}"


@pytest.mark.parametrize("args", [["--bogus"], ["-q", "--bogus"], ["--quiet=yes"], ["no-such-command"]])
def test_root_option_errors_are_one_line_with_a_help_hint(args):
    """Errors in the root's own options (parsed before any subcommand) are the contract's one line too."""
    r = invoke(*args)
    assert r.exit_code == 2
    assert "--help" in one_error_line(r) and "╭" not in r.stdout + r.stderr


def test_debug_is_accepted_after_the_subcommand_and_keeps_the_exit_code():
    plain, late, early = invoke("info", "--variant", "B9"), invoke("info", "--variant", "B9", "--debug"), \
        invoke("--debug", "info", "--variant", "B9")
    assert plain.exit_code == late.exit_code == early.exit_code == 2
    one_error_line(plain)
    assert "Traceback" in late.stderr and "Traceback" in early.stderr
    assert late.stderr.strip().splitlines()[-1] == plain.stderr.strip()


# ---------------------------------------------------------------- info

def test_info_random_b1_counts():
    r = invoke("info", "--variant", "B1", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    m = data["model"]
    assert m["variant"] == "B1" and m["inferred"] is False and m["num_classes"] == 1000
    assert round(m["parameters"] / 1e6, 2) == 7.89
    assert round(m["macs"] / 1e9, 2) == 0.70 and m["flops"] == 2 * m["macs"]
    assert m["input_size"] == [224, 224] and m["input_size_from"] == "default"
    assert data["weights"] == {"source": "seeded random", "seed": 0}
    assert "seeded random" in r.stderr and "not for accuracy" in r.stderr
    from mixformer_deploy.backends import keys, runtime_keys
    assert set(data["backends"]) == {*keys(), *runtime_keys()}
    assert all((e["can_export"] is not None) == (k in keys()) for k, e in data["backends"].items())
    assert data["hardware"]["logical_cores"] == os.cpu_count()


def test_info_fixture_json():
    r = invoke("info", "--weights", FIXTURE, "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    m, w = data["model"], data["weights"]
    assert m["variant"] == "custom" and m["inferred"] is True and m["num_classes"] == 10
    assert m["config"]["depths"] == [1, 1, 2, 1] and m["config"]["num_heads"] == [1, 2, 4, 8]
    assert m["parameters"] == 545_936 and m["input_size"] == [224, 224]
    assert w["format"] == "paddle" and w["sha256"] == sha256_file(FIXTURE) and w["shipped"] is False


def test_info_fixture_human():
    r = invoke("info", "--weights", FIXTURE, "--img-size", "64x96")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0] == "inferred: custom (embed_dim 16, depths [1,1,2,1], heads [1,2,4,8], 10 classes)"
    for word in ("Model", "Backends", "Hardware", "onnxruntime", "64x96", "GMACs", "545,936"):
        assert word in r.stdout


@pytest.mark.parametrize("size, why", [("100", "multiple of 32"), ("224x100", "multiple of 32"),
                                       ("big", "not a size"), ("0", "multiple of 32")])
def test_info_bad_size_is_usage_error(size, why):
    r = invoke("info", "--weights", FIXTURE, "--img-size", size)
    assert r.exit_code == 2
    assert why in one_error_line(r)


def test_info_variant_rules():
    r = invoke("info", "--variant", "auto")
    assert r.exit_code == 2 and "--weights" in one_error_line(r)
    r = invoke("info", "--variant", "B9")
    assert r.exit_code == 2
    r = invoke("info", "--weights", FIXTURE, "--num-classes", "3")
    assert r.exit_code == 4 and "10 classes, not 3" in one_error_line(r)


def test_info_default_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "DEFAULT_WEIGHTS", tmp_path / "absent.safetensors")
    r = invoke("info")
    assert r.exit_code == 4 and "--variant" in one_error_line(r)

    # the default input size is the one the weights record
    out = tmp_path / "shipped.safetensors"
    assert invoke("convert-weights", FIXTURE, out, "--img-size", "64x32").exit_code == 0
    monkeypatch.setattr(shipped, "DEFAULT_WEIGHTS", out)
    r = invoke("info", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"]["input_size"] == [64, 32] and data["model"]["input_size_from"] == "weights"
    assert data["weights"]["shipped"] is True and data["weights"]["metadata"]["source_format"] == "paddle"


# ---------------------------------------------------------------- convert-weights

def test_convert_weights_round_trip(tmp_path):
    out = tmp_path / "sub" / "tiny.safetensors"
    r = invoke("convert-weights", FIXTURE, out)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == str(out)
    assert "inferred: custom (embed_dim 16" in r.stderr, "informational lines go to stderr"
    summary = json.loads("\n".join(lines[:-1]))
    assert summary["source_sha256"] == sha256_file(FIXTURE) and summary["source_format"] == "paddle"
    assert summary["sha256"] == sha256_file(out) and summary["variant"] == "custom"

    ck = load_checkpoint(out)
    assert ck.format == "safetensors"
    assert ck.metadata["source_sha256"] == sha256_file(FIXTURE) and ck.metadata["source_format"] == "paddle"
    assert json.loads(ck.metadata["config"])["embed_dim"] == 16 and ck.metadata["num_classes"] == "10"
    ref = np.load(DATA / "tiny.npz")
    with torch.no_grad():
        logits = ck.model(torch.from_numpy(ref["input"])).numpy()
    assert np.linalg.norm(logits - ref["logits"]) / np.linalg.norm(ref["logits"]) < 1e-5

    again = tmp_path / "again.safetensors"  # safetensors -> safetensors keeps the weights bit-exact
    assert invoke("convert-weights", out, again, "--variant", "auto", "--num-classes", "10").exit_code == 0
    twice = load_checkpoint(again)
    assert all(torch.equal(a, b) for a, b in zip(twice.model.state_dict().values(), ck.model.state_dict().values()))


def test_convert_weights_bad_arguments(tmp_path):
    r = invoke("convert-weights", FIXTURE, tmp_path / "out.pt")
    assert r.exit_code == 2 and ".safetensors" in one_error_line(r)
    r = invoke("convert-weights", tmp_path / "missing.pt", tmp_path / "out.safetensors")
    assert r.exit_code == 4 and "not found" in one_error_line(r)
    r = invoke("convert-weights", FIXTURE, tmp_path / "out.safetensors", "--variant", "B1")
    assert r.exit_code == 4 and "does not fit" in one_error_line(r)
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------- environment facts

def test_environment_is_plain_and_quick():
    t = time.perf_counter()
    hw, be = environment.hardware(), environment.backends_status()
    assert time.perf_counter() - t < 2.0  # < 0.5 s on a quiet machine
    json.dumps({"hardware": hw, "backends": be})
    assert hw["logical_cores"] == os.cpu_count() and hw["memory_bytes"] > 0 and hw["cpu"]
    assert be["torch"]["installed"] and torch.__version__.startswith(be["torch"]["version"]) and "cpu" in be["torch"]["devices"]
    for key, e in be.items():
        assert e["key"] == key and e["installed"] == (e["version"] is not None)
        assert {"package", "can_export", "can_run", "devices", "note"} <= set(e)
        if not e["installed"]:
            assert "pip install" in e["note"]
    if sys.platform != "darwin":
        assert be["coreml"]["can_run"] is False
    if not environment.cuda_available():
        assert be["tensorrt"]["can_run"] is False


def test_subprocess_info_json():
    r = subprocess.run([sys.executable, "-m", "mixformer_deploy", "info", "--variant", "B0", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"]["variant"] == "B0" and round(data["model"]["gmacs"], 2) == 0.40
    assert "Traceback" not in r.stderr
