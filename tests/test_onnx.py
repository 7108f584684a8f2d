"""ONNX target and onnxruntime runner on the official fixture weights."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from conftest import DATA, rel_l2

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytestmark = pytest.mark.onnx

from mixformer_deploy.errors import UsageError  # noqa: E402
from mixformer_deploy.export_api import export  # noqa: E402
from mixformer_deploy.artifact import read_manifest, sidecar_path  # noqa: E402
from mixformer_deploy.backends import open_runner  # noqa: E402

WEIGHTS = DATA / "tiny.pdparams"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {
        "224": export(WEIGHTS, img_size=224, output=out, check=False).path,
        "256x192": export(WEIGHTS, img_size="256x192", output=out, check=False).path,
        "dyn": export(WEIGHTS, img_size=224, batch="dynamic", output=out, check=False).path,
        "fp16": export(WEIGHTS, img_size=224, precision="fp16", output=out, check=False).path,
    }


def test_file_names_follow_the_contract(artifacts):
    assert artifacts["224"].name == "mixformer-custom-224x224-b1-fp32.onnx"
    assert artifacts["256x192"].name == "mixformer-custom-256x192-b1-fp32.onnx"
    assert artifacts["dyn"].name == "mixformer-custom-224x224-dyn-fp32.onnx"
    assert artifacts["fp16"].name == "mixformer-custom-224x224-b1-fp16.onnx"
    assert all(sidecar_path(p).is_file() for p in artifacts.values())


def test_matches_the_official_outputs(artifacts):
    ref = np.load(DATA / "tiny.npz")
    runner = open_runner(artifacts["224"], threads=1)
    assert rel_l2(runner.run(ref["input"]), ref["logits"]) <= 1e-4
    stages = runner.run_stages(ref["input"])
    assert rel_l2(stages["stem"], ref["patch_embed"]) <= 1e-4
    for i in range(4):
        assert rel_l2(stages[f"stage{i}"], ref[f"stage{i}"]) <= 1e-4
    assert rel_l2(stages["features"], ref["features"]) <= 1e-4


def test_graph_is_static_rank5_and_pads_only_when_needed(artifacts):
    for key, expect_pad in (("224", False), ("256x192", True)):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(artifacts[key])))
        ops = Counter(n.op_type for n in model.graph.node)
        assert ("Pad" in ops) == expect_pad, key
        assert not {"Shape", "Gather", "NonZero", "Loop", "If"} & set(ops), ops
        ranks = [len(v.type.tensor_type.shape.dim) for v in model.graph.value_info]
        assert ranks and max(ranks) <= 5
        assert [o.name for o in model.graph.output] == ["logits"]
        assert model.opset_import[0].version >= 17


def test_dynamic_batch_items_match_single_runs(artifacts, photo_batches):
    x = photo_batches[(224, 224)].numpy()
    runner = open_runner(artifacts["dyn"])
    together = runner.run(x)
    alone = np.concatenate([runner.run(x[i:i + 1]) for i in range(len(x))])
    assert np.abs(together - alone).max() <= 1e-5


def test_fp16_keeps_float32_edges_and_stays_close(artifacts, photo_batches):
    model = onnx.load(str(artifacts["fp16"]))
    f32 = onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == f32
    assert model.graph.output[0].type.tensor_type.elem_type == f32
    x = photo_batches[(224, 224)].numpy()[:1]
    a, r = open_runner(artifacts["fp16"]).run(x), open_runner(artifacts["224"]).run(x)
    assert a.dtype == np.float32 and rel_l2(a, r) < 5e-2


def test_manifest_is_embedded_and_survives_without_sidecar(artifacts, tmp_path):
    copy = tmp_path / "renamed.onnx"
    copy.write_bytes(artifacts["256x192"].read_bytes())
    manifest = read_manifest(copy)
    assert manifest["input_size"] == [256, 192] and manifest["num_classes"] == 10
    assert manifest["weights"]["sha256"] == json.loads(sidecar_path(artifacts["256x192"]).read_text())["weights"]["sha256"]
    assert manifest["stage_outputs"]["layout"] == "tokens"


def test_bad_sizes_and_options_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="multiple of 32"):
        export(WEIGHTS, img_size="250x192", output=tmp_path, check=False)
    with pytest.raises(UsageError):
        export(WEIGHTS, batch="zero", output=tmp_path, check=False)
    with pytest.raises(UsageError):
        export(WEIGHTS, precision="int3", output=tmp_path, check=False)
    assert not list(tmp_path.iterdir()), "a failed export left files behind"


# ---------------------------------------------------------------- the export and parity commands

from typer.testing import CliRunner  # noqa: E402

from mixformer_deploy.cli.app import _load_commands, app  # noqa: E402

_load_commands()


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, result.exit_code


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    return lines[-1]


def test_tampered_onnx_fails_parity_and_names_the_stage(artifacts, tmp_path):
    from onnx import numpy_helper

    model = onnx.load(str(artifacts["224"]))
    target = next(i for i in model.graph.initializer if "stages.2." in i.name and numpy_helper.to_array(i).size > 1)
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 1.5, target.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    result, code = _cli("parity", tampered, "--weights", WEIGHTS, "--inputs", "random",
                        "--junit", tmp_path / "p.xml", "--json", tmp_path / "p.json")
    assert code == 1
    assert "stage2" in _one_error_line(result)
    assert json.loads((tmp_path / "p.json").read_text())["first_failing_stage"] == "stage2"
    assert 'failures="0"' not in (tmp_path / "p.xml").read_text()


def test_good_onnx_passes_parity_from_the_file_alone(artifacts, tmp_path):
    lone = tmp_path / "copied.onnx"
    lone.write_bytes(artifacts["256x192"].read_bytes())
    result, code = _cli("parity", lone, "--weights", WEIGHTS, "--inputs", "photos", "--inputs", "random")
    assert code == 0, result.stderr


def test_onnx_that_does_not_fit_the_weights_is_exit_4(artifacts, tmp_path):
    from mixformer_deploy import create_model
    from mixformer_deploy.checkpoints import save_safetensors

    other = save_safetensors(create_model("custom", num_classes=7, embed_dim=16, depths=(1, 1, 2, 1),
                                          num_heads=(1, 2, 4, 8), seed=1), tmp_path / "seven.safetensors")
    result, code = _cli("parity", artifacts["224"], "--weights", other)
    assert code == 4 and "classes" in _one_error_line(result)
    bad = tmp_path / "bad.onnx"
    bad.write_text("not onnx")
    result, code = _cli("parity", bad, "--weights", WEIGHTS)
    assert code == 4
    _one_error_line(result)


def test_export_cli_contract(tmp_path):
    out = tmp_path / "out"
    result, code = _cli("export", "--weights", WEIGHTS, "--img-size", "256x192", "--output", out)
    assert code == 0, result.stderr
    path = out / "mixformer-custom-256x192-b1-fp32.onnx"
    assert result.stdout.strip().splitlines()[-1] == str(path) and path.is_file()
    assert json.loads(sidecar_path(path).read_text())["parity"]["passed"] is True
    result, code = _cli("export", "--weights", WEIGHTS, "--img-size", "250", "--output", out)
    assert code == 2 and "multiple of 32" in _one_error_line(result)
    result, code = _cli("export", "--weights", tmp_path / "missing.pt", "--output", out)
    assert code == 4 and "not found" in _one_error_line(result)
    assert sorted(p.name for p in out.iterdir()) == [path.name, path.name + ".json"]


def test_failing_export_is_kept_aside_and_exits_1(tmp_path, monkeypatch):
    from mixformer_deploy.backends.onnx.spec import OnnxSpec
    from mixformer_deploy.backends.spec import Tolerance

    monkeypatch.setattr(OnnxSpec, "tolerances", {"fp32": Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0)})
    result, code = _cli("export", "--weights", WEIGHTS, "--img-size", "224", "--output", tmp_path, "--json")
    assert code == 1
    failed = tmp_path / "mixformer-custom-224x224-b1-fp32.onnx.failed"
    assert failed.is_file() and not (tmp_path / "mixformer-custom-224x224-b1-fp32.onnx").exists()
    assert json.loads(sidecar_path(failed).read_text())["parity"]["passed"] is False
    assert json.loads(result.stdout)["passed"] is False
    monkeypatch.undo()  # a later export of that name that passes removes the stale failure
    result, code = _cli("export", "--weights", WEIGHTS, "--img-size", "224", "--output", tmp_path)
    assert code == 0 and (tmp_path / "mixformer-custom-224x224-b1-fp32.onnx").is_file()
    assert not failed.exists() and not sidecar_path(failed).exists()


def test_export_with_no_arguments_uses_the_shipped_weights(tmp_path, monkeypatch):
    from mixformer_deploy.shipped import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("the shipped weights are not in this checkout")
    monkeypatch.chdir(tmp_path)
    result, code = _cli("export")
    assert code == 0, result.stderr
    path = tmp_path / "artifacts" / "mixformer-b0-32x32-b1-fp32.onnx"
    assert result.stdout.strip().splitlines()[-1] == "artifacts/mixformer-b0-32x32-b1-fp32.onnx" and path.is_file()
    parity = json.loads(sidecar_path(path).read_text())["parity"]
    assert parity["passed"] is True


@pytest.mark.slow
@pytest.mark.parametrize("size", ["224", "256x192"])
def test_full_size_paddle_b1_through_onnx(tmp_path, size):
    """A full-size B1 in the official Paddle layout (key names of keys_B1.txt, Linear weights [in, out],
    BatchNorm _mean/_variance, the Paddle-internal name map) -> ONNX -> onnxruntime matches PyTorch."""
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
    official = {line.split("\t")[0] for line in (DATA / "keys_B1.txt").read_text().splitlines()}
    assert set(state) == official
    state["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(state)}
    path = tmp_path / "b1.pdparams"
    path.write_bytes(pickle.dumps(state, protocol=4))

    result = export(path, img_size=size, output=tmp_path)
    assert result.passed and result.manifest["variant"] == "B1" and result.manifest["num_classes"] == 1000
    h, w = result.manifest["input_size"]
    x = photos(h, w)[0]
    runner = open_runner(result.path)
    got = np.concatenate([runner.run(x[i:i + 1]) for i in range(len(x))])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert rel_l2(got, want) <= 1e-4


def test_a_device_that_is_not_here_is_exit_3(artifacts):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    result, code = _cli("parity", artifacts["224"], "--weights", WEIGHTS, "--device", "cuda")
    assert code == 3 and "CUDA" in _one_error_line(result)
