"""OpenVINO target and runner: IR directories from the deploy form, parity at float32, the traps
(fp16-compressed "fp32" weights, bf16 execution by default), and bad IRs."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from conftest import DATA, rel_l2

pytest.importorskip("openvino", reason="the openvino extra is not installed")
pytest.importorskip("onnx", reason="the OpenVINO target converts the deploy form's ONNX (onnx extra)")
pytestmark = pytest.mark.openvino

from mixformer_deploy.artifact import read_manifest, sidecar_path  # noqa: E402
from mixformer_deploy.errors import ArtifactError, InputFileError, MissingBackendError, UsageError  # noqa: E402
from mixformer_deploy.export_api import export  # noqa: E402
from mixformer_deploy.backends import get_spec, open_runner  # noqa: E402

WEIGHTS = DATA / "tiny.pdparams"
SIZE = "96x64"  # tiny model, a size whose stage maps need padding


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """The official fixture weights exported to an fp32 IR and gated on parity by export itself."""
    out = tmp_path_factory.mktemp("ov")
    result = export(WEIGHTS, target="openvino", img_size=SIZE, output=out)
    assert result.passed, result.parity.failures
    return result


def test_the_irs_model_xml_stands_for_its_directory(fp32):
    """OpenVINO users know model.xml as "the IR": every command reads the artifact directory it is in."""
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, ["inspect", str(fp32.path / "model.xml"), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["artifact"] == str(fp32.path) and "reading the artifact" in r.stderr


@pytest.fixture(scope="module")
def ref_logits(fp32, photo_batches):
    import torch

    from mixformer_deploy.checkpoints import load_checkpoint
    from mixformer_deploy.data import photos

    x = photos(96, 64, names=("chelsea", "astronaut"))[0]
    with torch.no_grad():
        return x, load_checkpoint(WEIGHTS).model(torch.from_numpy(x)).numpy()


def test_directory_artifact_follows_the_contract(fp32):
    path = fp32.path
    assert path.name == "mixformer-custom-96x64-b1-fp32.openvino" and path.is_dir()
    assert sorted(p.name for p in path.iterdir()) == ["model.bin", "model.xml"]
    assert sidecar_path(path).is_file()
    assert json.loads(sidecar_path(path).read_text())["parity"]["passed"] is True
    assert fp32.manifest["size_bytes"] == sum(p.stat().st_size for p in path.iterdir())


def test_fp32_matches_pytorch_at_float32(fp32, ref_logits):
    x, want = ref_logits
    runner = open_runner(fp32.path, threads=1)
    assert runner.describe()["compiled"]["INFERENCE_PRECISION_HINT"] == "f32"  # never the CPU's bf16 default
    got = np.concatenate([runner.run(x[i:i + 1]) for i in range(len(x))])
    assert rel_l2(got, want) <= 1e-5


def test_stage_outputs_localize(fp32, ref_logits):
    import torch

    from mixformer_deploy.checkpoints import load_checkpoint

    x, _ = ref_logits
    stages = open_runner(fp32.path, threads=1).run_stages(x[:1])
    with torch.no_grad():
        ref = load_checkpoint(WEIGHTS).model.forward_stages(torch.from_numpy(x[:1]))
    assert {"stem", "stage0", "stage3", "features", "logits"} <= set(stages)
    for k in ("stem", "stage2", "features"):
        assert rel_l2(stages[k], ref[k].numpy()) <= 1e-5, k


def test_fp32_ir_is_not_fp16_compressed(fp32):
    """openvino.save_model compresses weights to fp16 by default: an fp32 IR must hold fp32 weights."""
    info = get_spec("openvino").inspect(fp32.path)
    assert "fp16" not in info["weight_bytes"] and info["weight_bytes"]["fp32"] > 0
    assert info["max_rank"] <= 5 and info["ops"]["MatMul"] > 0
    assert [o["name"] for o in info["outputs"]] == ["logits"]
    assert info["inputs"][0]["shape"] == [1, 3, 96, 64]


def test_manifest_is_embedded_and_survives_without_sidecar(fp32, tmp_path):
    copy = tmp_path / "renamed.openvino"
    shutil.copytree(fp32.path, copy)
    m = read_manifest(copy)
    assert m["target"] == "openvino" and m["input_size"] == [96, 64] and m["precision"] == "fp32"
    assert m["stage_outputs"]["tensors"]["stage0"] == "debug_stage0"


def test_fp16_compresses_weights_only(tmp_path, ref_logits, fp32):
    path = export(WEIGHTS, target="openvino", img_size=SIZE, precision="fp16", output=tmp_path, check=False).path
    info = get_spec("openvino").inspect(path)
    assert info["weight_bytes"].get("fp16", 0) > 10 * info["weight_bytes"].get("fp32", 0)
    x, want = ref_logits
    runner = open_runner(path, threads=1)
    assert runner.precision == "fp16" and runner.describe()["execution_precision"] == "fp32"
    err = rel_l2(runner.run(x[:1]), want[:1])
    assert 1e-6 < err < 1e-2  # fp16 weights are not free, nor far off


def test_bf16_execution_where_the_cpu_has_it(fp32, ref_logits):
    from mixformer_deploy.backends.openvino.runner import OpenVinoRunner

    x, want = ref_logits
    if not OpenVinoRunner.status(probe=True).get("bf16"):
        with pytest.raises(MissingBackendError, match="bf16"):
            open_runner(fp32.path, options={"precision": "bf16"})
        return
    runner = open_runner(fp32.path, threads=1, options={"precision": "bf16", "hint": "latency", "streams": "1"})
    assert runner.precision == "bf16" and runner.describe()["compiled"]["INFERENCE_PRECISION_HINT"] == "bf16"
    got = runner.run(x[:1])
    assert 1e-5 < rel_l2(got, want[:1]) < 5e-2
    tol = get_spec("openvino").tolerance("bf16")
    assert np.abs(got - want[:1]).max() <= tol.atol + tol.rtol * np.abs(want[:1]).max()


def test_bf16_on_a_cpu_without_it_is_exit_3(fp32, monkeypatch):
    from mixformer_deploy.backends.openvino import runner as openvino_runner

    monkeypatch.setattr(openvino_runner, "cpu_capabilities", lambda core: ["FP32", "INT8"])
    with pytest.raises(MissingBackendError, match="bf16"):
        open_runner(fp32.path, options={"precision": "bf16"})


@pytest.mark.parametrize("options", [{"precision": "int4"}, {"hint": "fast"}, {"streams": "-2"}, {"cache": "x"}])
def test_bad_runtime_options_are_usage_errors(fp32, options):
    with pytest.raises(UsageError):
        open_runner(fp32.path, options=options)


def test_missing_truncated_or_swapped_bin_is_an_artifact_error(fp32, tmp_path):
    missing = tmp_path / "missing.openvino"
    shutil.copytree(fp32.path, missing)
    (missing / "model.bin").unlink()
    with pytest.raises(ArtifactError, match="model.bin"):
        open_runner(missing)

    truncated = tmp_path / "truncated.openvino"
    shutil.copytree(fp32.path, truncated)
    data = (truncated / "model.bin").read_bytes()
    (truncated / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="model.bin"):
        open_runner(truncated)

    # another model's weights of exactly the same size: only the recorded sha256 can tell
    swapped = tmp_path / "swapped.openvino"
    shutil.copytree(fp32.path, swapped)
    w = np.frombuffer(data, dtype=np.uint8).copy()
    w[len(w) // 3] ^= 0x40
    (swapped / "model.bin").write_bytes(w.tobytes())
    with pytest.raises(ArtifactError, match="sha256"):
        open_runner(swapped)


@pytest.mark.parametrize("content", [b"<not xml", b"<html></html>", b""])
def test_not_an_ir_is_an_artifact_error(fp32, tmp_path, content):
    bad = tmp_path / "bad.openvino"
    shutil.copytree(fp32.path, bad)
    (bad / "model.xml").write_bytes(content)
    with pytest.raises(ArtifactError):
        open_runner(bad)
    with pytest.raises(ArtifactError):
        get_spec("openvino").read_embedded(bad)


def test_missing_openvino_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingBackendError, match=r"mixformer-deploy\[openvino\]"):
        export(WEIGHTS, target="openvino", img_size=64, output=tmp_path, check=False)
    assert not list(tmp_path.iterdir())


def test_int8_with_an_empty_calibration_folder_is_a_bad_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputFileError):
        export(WEIGHTS, target="openvino", img_size=64, precision="int8", calibration=empty,
               output=tmp_path / "out", check=False)
    with pytest.raises(InputFileError):
        export(WEIGHTS, target="openvino", img_size=64, precision="int8", calibration=tmp_path / "nowhere",
               output=tmp_path / "out", check=False)


def test_target_options_are_checked(tmp_path):
    with pytest.raises(UsageError):
        export(WEIGHTS, target="openvino", precision="int8", target_options={"nncf_preset": "fastest"},
               output=tmp_path, check=False)
    with pytest.raises(UsageError):
        export(WEIGHTS, target="openvino", precision="int8", target_options={"smooth_quant": "2"},
               output=tmp_path, check=False)


def test_runner_status_reports_devices_and_bf16():
    from mixformer_deploy.backends.openvino.runner import OpenVinoRunner

    s = OpenVinoRunner.status(probe=True)
    assert s["installed"] and s["can_run"] and "cpu" in s["devices"] and isinstance(s["bf16"], bool)


# ---------------------------------------------------------------- the shipped weights, reduced precisions

def _shipped():
    from mixformer_deploy.shipped import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("the shipped weights are not in this checkout")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_shipped_weights_pass_the_accuracy_gate(tmp_path, precision):
    _shipped()
    result = export(None, target="openvino", precision=precision, output=tmp_path)
    assert result.passed, result.parity.failures
    gate = {g["set"]: g for g in result.manifest["parity"]["accuracy_gate"]}["dataset"]
    assert gate["passed"] and gate["count"] == 360
    if precision == "int8":
        info = get_spec("openvino").inspect(result.path)
        assert info["ops"].get("FakeQuantize", 0) > 0 and info["precisions"].get("int8", 0) > 0


@pytest.mark.slow
def test_shipped_weights_bf16_execution_passes_the_accuracy_gate(tmp_path):
    from mixformer_deploy.parity import check_parity
    from mixformer_deploy.backends.openvino.runner import OpenVinoRunner

    _shipped()
    if not OpenVinoRunner.status(probe=True).get("bf16"):
        pytest.skip("this CPU has no bf16 execution in OpenVINO")
    path = export(None, target="openvino", output=tmp_path, check=False).path
    report = check_parity(path, runtime_options={"precision": "bf16"})
    assert report.runtime["precision"] == "bf16"
    assert report.passed, report.failures


# ---------------------------------------------------------------- full size

@pytest.mark.slow
@pytest.mark.parametrize("size", ["224", "256x192"])
def test_full_size_paddle_b1_through_openvino(tmp_path, size):
    """A full-size B1 in the official Paddle layout -> OpenVINO fp32 IR matches PyTorch within 1e-5."""
    import pickle

    import torch

    from mixformer_deploy import create_model
    from mixformer_deploy.data import photos

    model = create_model("B1", seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        a = v.numpy().T.copy() if k.endswith(".weight") and v.ndim == 2 else v.numpy()
        state[k.replace("running_mean", "_mean").replace("running_var", "_variance")] = a
    assert set(state) == {line.split("\t")[0] for line in (DATA / "keys_B1.txt").read_text().splitlines()}
    state["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(state)}
    path = tmp_path / "b1.pdparams"
    path.write_bytes(pickle.dumps(state, protocol=4))

    result = export(path, target="openvino", img_size=size, output=tmp_path)
    assert result.passed and result.manifest["variant"] == "B1"
    h, w = result.manifest["input_size"]
    x = photos(h, w)[0]
    runner = open_runner(result.path)
    got = np.concatenate([runner.run(x[i:i + 1]) for i in range(len(x))])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert rel_l2(got, want) <= 1e-5
