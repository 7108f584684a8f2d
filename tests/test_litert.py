"""LiteRT target (litert-torch) and runner (ai-edge-litert interpreter, XNNPACK delegate).

The default run exports the official fixture weights at a small padded size in fp32; fp16, int8 of the
shipped weights (accuracy gate) and the 224x224 fixture check are `slow`.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import DATA, rel_l2

pytest.importorskip("litert_torch", reason="the litert extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")
pytestmark = pytest.mark.litert

from mixformer_deploy.artifact import read_manifest, sidecar_path  # noqa: E402
from mixformer_deploy.errors import UsageError  # noqa: E402
from mixformer_deploy.export_api import export  # noqa: E402
from mixformer_deploy.backends import open_runner  # noqa: E402
from mixformer_deploy.backends import get_spec  # noqa: E402

WEIGHTS = DATA / "tiny.pdparams"
SIZE = "64x64"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """``artifacts[precision]``: each exported (and gated) on first use; fp16's tests are slow (a second
    conversion of ~12 s on 2 cores)."""
    out = tmp_path_factory.mktemp("litert")

    class Made(dict):
        def __missing__(self, precision):
            result = export(WEIGHTS, target="litert", img_size=SIZE, precision=precision, output=out)
            assert result.passed, result.parity.failures
            self[precision] = result
            return result

    return Made()


@pytest.fixture(scope="module")
def photos64():
    from mixformer_deploy.checkpoints import load_checkpoint
    from mixformer_deploy.data import photos

    x = photos(64, 64, names=("chelsea", "astronaut", "coffee"))[0]
    with torch.no_grad():
        return x, load_checkpoint(WEIGHTS).model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("precision", ["fp32", pytest.param("fp16", marks=pytest.mark.slow)])
def test_artifacts_follow_the_contract(artifacts, precision):
    assert artifacts[precision].path.name == f"mixformer-custom-64x64-b1-{precision}.tflite"
    assert json.loads(sidecar_path(artifacts[precision].path).read_text())["parity"]["passed"] is True


def test_fp32_matches_pytorch_with_and_without_xnnpack(artifacts, photos64):
    x, want = photos64
    fast = open_runner(artifacts["fp32"].path, threads=2)
    plain = open_runner(artifacts["fp32"].path, options={"xnnpack": "false"})
    assert fast.describe()["delegate"] == "XNNPACK" and plain.describe()["delegate"] is None
    for runner in (fast, plain):
        got = runner.run(x)  # a b1 model, three images
        assert got.dtype == np.float32 and rel_l2(got, want) <= 1e-5


@pytest.mark.slow
def test_fp16_has_half_weights_float_edges_and_stays_close(artifacts, photos64):
    x, want = photos64
    info = get_spec("litert").inspect(artifacts["fp16"].path)
    assert info["tensor_types"].get("float16", 0) > 0 and info["ops"]["DEQUANTIZE"] > 0
    assert info["inputs"][0]["dtype"] == "float32" and info["outputs"][0]["dtype"] == "float32"
    assert artifacts["fp16"].path.stat().st_size < 0.7 * artifacts["fp32"].path.stat().st_size
    assert rel_l2(open_runner(artifacts["fp16"].path).run(x), want) < 1e-2


def test_inspect_reads_the_flatbuffer(artifacts):
    info = get_spec("litert").inspect(artifacts["fp32"].path)
    assert info["inputs"][0]["shape"] == [1, 3, 64, 64] and info["outputs"][0]["shape"] == [1, 10]
    assert info["ops"]["FULLY_CONNECTED"] > 0 and info["ops"]["BATCH_MATMUL"] > 0
    assert "SQUARED_DIFFERENCE" not in info["ops"]  # the XNNPACK form's LayerNorm
    assert info["tensor_types"].get("float16") is None and info["graph_form"] == "xnnpack"


@pytest.mark.slow
def test_manifest_is_embedded_in_the_flatbuffer(artifacts, tmp_path):
    copy = tmp_path / "renamed.tflite"
    shutil.copyfile(artifacts["fp16"].path, copy)
    manifest = read_manifest(copy)
    assert manifest["target"] == "litert" and manifest["precision"] == "fp16" and manifest["input_size"] == [64, 64]
    assert open_runner(copy).precision == "fp16"


def test_bad_options_are_usage_errors(artifacts, tmp_path):
    with pytest.raises(UsageError):
        open_runner(artifacts["fp32"].path, options={"xnnpack": "maybe"})
    with pytest.raises(UsageError):
        open_runner(artifacts["fp32"].path, options={"precision": "bf16"})
    with pytest.raises(UsageError, match="fixed batch"):
        export(WEIGHTS, target="litert", img_size=SIZE, batch="dynamic", output=tmp_path, check=False)
    with pytest.raises(UsageError):
        export(WEIGHTS, target="litert", precision="bf16", output=tmp_path, check=False)


# ---------------------------------------------------------------- slow

@pytest.mark.slow
def test_official_fixture_at_224_within_1e4(tmp_path):
    ref = np.load(DATA / "tiny.npz")
    for form in ("xnnpack", "deploy"):
        result = export(WEIGHTS, target="litert", img_size=224, output=tmp_path / form, check=False,
                        target_options={"graph_form": form})
        assert rel_l2(open_runner(result.path).run(ref["input"]), ref["logits"]) <= 1e-4

