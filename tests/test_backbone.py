"""MixFormer as a backbone (--head none): the deploy form's feature maps at dense-task sizes, ONNX at fixed
and dynamic batch, every target's parity per output, detection and backbone-only checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DATA

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytestmark = pytest.mark.onnx

from typer.testing import CliRunner  # noqa: E402

from mixformer_deploy.checkpoints import load_checkpoint  # noqa: E402
from mixformer_deploy.cli.app import _load_commands, app  # noqa: E402
from mixformer_deploy.deploy import to_deploy  # noqa: E402
from mixformer_deploy.export_api import export  # noqa: E402
from mixformer_deploy.model.backbone import MixFormerBackbone  # noqa: E402
from mixformer_deploy.numerics import rel_l2  # noqa: E402
from mixformer_deploy.parity import check_parity  # noqa: E402

_load_commands()
WEIGHTS = DATA / "tiny.pdparams"
SIZES = [(224, 224), (512, 512), (800, 1216), (640, 480)]


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(WEIGHTS).model


def _cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r, r.exit_code


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_deploy_backbone_is_the_reference_function(tiny, size):
    h, w = size
    ref = MixFormerBackbone(tiny).eval()
    dep = to_deploy(ref, size)
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        r, d = ref(x), dep(x)
    assert [tuple(t.shape) for t in d] == [(2, 16 * 2 ** i, h // 2 ** (i + 2), w // 2 ** (i + 2)) for i in range(4)]
    for a, b in zip(d, r):
        assert rel_l2(a, b) <= 1e-6


def test_out_indices_drop_the_unused_stages_and_the_classifier(tiny):
    dep = to_deploy(MixFormerBackbone(tiny, (1, 2)), 64)
    assert len(dep.stages) == 3 and dep.head is None and dep.pool is None
    assert dep.output_names == ["features_1", "features_2"]
    assert not any(k.startswith(("head.", "last_proj.")) for k in dep.state_dict())


LARGE = pytest.mark.slow  # the two largest sizes take ~15 s each on 2 cores: in the slow suite


@pytest.mark.parametrize("size", [SIZES[0], SIZES[3], pytest.param(SIZES[1], marks=LARGE),
                                  pytest.param(SIZES[2], marks=LARGE)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", [1, "dynamic"])
def test_onnx_backbone_reproduces_the_reference(tiny, size, batch, tmp_path):
    h, w = size
    path = export(WEIGHTS, img_size=f"{h}x{w}", batch=batch, head="none", output=tmp_path, check=False).path
    assert path.name == f"mixformer-custom-{h}x{w}-{'b1' if batch == 1 else 'dyn'}-fp32-backbone.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == [f"features_{i}" for i in range(4)]
    n = 1 if batch == 1 else 2
    x = np.random.default_rng(0).standard_normal((n, 3, h, w)).astype(np.float32)
    with torch.no_grad():
        ref = MixFormerBackbone(tiny)(torch.from_numpy(x))
    for a, r in zip(sess.run(None, {"input": x}), ref):
        assert a.shape == tuple(r.shape) and rel_l2(a, r.numpy()) <= 1e-5


def test_backbone_manifest_names_channels_and_strides(tmp_path):
    r = export(WEIGHTS, img_size="64x96", head="none", out_indices="1,3", output=tmp_path)
    m = json.loads((tmp_path / (r.path.name + ".json")).read_text())
    assert m["head"] == "none" and m["out_indices"] == [1, 3] and m["out_norm"] is False
    assert m["outputs"] == [
        {"name": "features_1", "channels": 32, "stride": 8, "shape": [1, 32, 8, 12], "layout": "NCHW"},
        {"name": "features_3", "channels": 128, "stride": 32, "shape": [1, 128, 2, 3], "layout": "NCHW"}]
    assert r.passed and set(r.parity.outputs) == {"features_1", "features_3"}
    assert m["parity"]["outputs"]["features_3"]["passed"] is True


@pytest.mark.parametrize("target,precision", [("onnx", "fp16"), ("openvino", "fp32"),
                                              pytest.param("litert", "fp32", marks=pytest.mark.slow),
                                              ("tensorrt", "fp16")])
def test_every_target_passes_parity_per_output(target, precision, tmp_path):
    pytest.importorskip({"onnx": "onnx", "openvino": "openvino", "litert": "ai_edge_litert",
                         "tensorrt": "modelopt"}[target])
    opts = {"onnx_only": True} if target == "tensorrt" else None
    r = export(WEIGHTS, target=target, precision=precision, img_size="64x96", head="none", output=tmp_path,
               target_options=opts)
    assert r.passed and r.path.name.startswith("mixformer-custom-64x96-b1-") and "-backbone." in r.path.name
    assert set(r.parity.outputs) == {f"features_{i}" for i in range(4)}
    assert all(m.passed and m.min_sample_cosine > 0.999 for m in r.parity.outputs.values())


def test_coreml_backbone_program_computes_the_feature_maps(tiny, tmp_path):
    pytest.importorskip("coremltools")
    from coreml_mil import mil_reference

    r = export(WEIGHTS, target="coreml", img_size="64x96", head="none", output=tmp_path)
    assert r.manifest["parity"]["status"] == "not run"
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 96)).astype(np.float32)
    with torch.no_grad():
        ref = MixFormerBackbone(tiny)(torch.from_numpy(x))
    outs = mil_reference(r.path, x)
    assert len(outs) == 4
    for a, b in zip(outs, ref):
        assert rel_l2(a, b.numpy()) <= 1e-5


def test_a_tampered_backbone_fails_and_names_the_stage(tmp_path):
    from onnx import numpy_helper

    path = export(WEIGHTS, img_size=64, head="none", output=tmp_path, check=False).path
    model = onnx.load(str(path))
    t = next(i for i in model.graph.initializer if "stages.2." in i.name and numpy_helper.to_array(i).size > 1)
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    onnx.save(model, str(path))
    report = check_parity(path, weights=WEIGHTS, inputs=("random",))
    assert not report.passed and report.outputs["features_1"].passed and not report.outputs["features_2"].passed
    assert any(f.startswith("features_2:") for f in report.failures)
    assert report.first_failing_stage == "stage2"


# ---------------------------------------------------------------- checkpoints of dense-task models

@pytest.fixture(scope="module")
def detection_ckpt(tiny, tmp_path_factory):
    """What a detection training run saves: backbone.* (with norm0..3), neck.*, roi_head.*."""
    root = tmp_path_factory.mktemp("det")
    sd = {f"backbone.{k}": v for k, v in tiny.state_dict().items() if not k.startswith(("head.", "last_proj.", "norm."))}
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        sd[f"backbone.norm{i}.weight"] = 1 + 0.1 * torch.randn(16 * 2 ** i, generator=g)
        sd[f"backbone.norm{i}.bias"] = 0.1 * torch.randn(16 * 2 ** i, generator=g)
    sd["neck.lateral_convs.0.conv.weight"] = torch.zeros(8, 16, 1, 1)
    sd["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(3, 8)
    path = root / "mask_rcnn_mixformer.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": sd}, path)
    no_norms = root / "no_norms.pth"
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("backbone.norm")}}, no_norms)
    return path, no_norms


def test_detection_checkpoint_exports_with_its_out_norms(detection_ckpt, tiny, tmp_path):
    path, _ = detection_ckpt
    ck = load_checkpoint(path)
    assert not ck.has_classifier and sorted(ck.out_norms) == sorted(
        f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    r = export(path, img_size=64, head="none", out_norm=True, output=tmp_path)
    assert r.passed and r.manifest["out_norm"] is True
    # the norms are applied: without them the outputs differ
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        plain = MixFormerBackbone(tiny)(x)
    sess = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
    assert rel_l2(sess.run(None, {"input": x.numpy()})[0], plain[0].numpy()) > 1e-2
    # and parity from the CLI finds the norms in the same checkpoint
    res, code = _cli("parity", r.path, "--weights", path, "--inputs", "random")
    assert code == 0, res.stderr[-400:]


def test_out_norm_without_norm_weights_is_exit_4_naming_them(detection_ckpt, tmp_path):
    _, no_norms = detection_ckpt
    r, code = _cli("export", "--weights", no_norms, "--img-size", "64", "--head", "none", "--out-norm",
                   "--output", tmp_path)
    assert code == 4 and "norm0.weight" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_backbone_only_checkpoint_is_not_a_classifier(detection_ckpt, tmp_path):
    path, _ = detection_ckpt
    r, code = _cli("export", "--weights", path, "--img-size", "64", "--output", tmp_path)
    assert code == 4 and "--head none" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args", [["--out-indices", "0,1"], ["--out-norm"], ["--head", "none", "--out-indices", "4"],
                                  ["--head", "fpn"], ["--head", "none", "--out-indices", "a"]])
def test_bad_backbone_options_are_usage_errors(args, tmp_path):
    r, code = _cli("export", "--weights", WEIGHTS, *args, "--output", tmp_path)
    assert code == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_predict_refuses_a_backbone(tmp_path):
    from skimage import data as skdata
    from skimage.io import imsave

    path = export(WEIGHTS, img_size=64, head="none", output=tmp_path, check=False).path
    imsave(tmp_path / "cat.png", skdata.chelsea())
    r, code = _cli("predict", tmp_path / "cat.png", "--artifact", path)
    assert code == 2 and "backbone" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "openvino", "executorch", "litert"])
def test_int8_backbone_of_the_shipped_weights_passes_the_per_tensor_int8_rule(target, tmp_path):
    pytest.importorskip({"litert": "ai_edge_litert"}.get(target, target))
    r = export(None, target=target, precision="int8", head="none", output=tmp_path)
    assert r.passed, r.parity.failures
    assert r.parity.tolerance["min_cosine"] == 0.4 and r.parity.accuracy == []
    # in-distribution images (the held-out digits) keep every feature map close
    assert all(m.cosine > 0.95 for k, m in r.parity.sets.items() if k.startswith("dataset"))
