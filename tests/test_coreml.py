"""Core ML target (ML programs through torch.export) and runner.

coremltools converts and reads ML programs on Linux, but only macOS has the Core ML framework that runs
them: prediction tests skip elsewhere with "Core ML prediction needs macOS". What Linux can check is
checked: conversion (without the rank-reducing pass), the program's ops, ranks and precisions, the
kept-float32 ops, metadata, reproducible bytes, bad packages, and the program's function, evaluated op by
op in numpy from the package (``coreml_mil.mil_reference``: not Core ML's kernels, a check of the
conversion).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rel_l2

pytest.importorskip("coremltools", reason="the coreml extra is not installed")
pytestmark = pytest.mark.coreml

from mixformer_deploy.deploy import to_deploy  # noqa: E402
from mixformer_deploy.deploy.precision import resolve_keeps  # noqa: E402
from mixformer_deploy.errors import ArtifactError, MissingBackendError, UsageError  # noqa: E402
from mixformer_deploy.model import create_model  # noqa: E402
from mixformer_deploy.backends.coreml.runner import NEEDS_MACOS, CoreMlRunner  # noqa: E402
from mixformer_deploy.backends import get_spec  # noqa: E402
from mixformer_deploy.backends.exporter import ExportContext, ExportOptions  # noqa: E402
from mixformer_deploy.backends.coreml.export import RANK_PASS, pass_pipeline  # noqa: E402
from coreml_mil import MilReference, mil_reference  # noqa: E402

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
SIZE = 32
ON_MAC = sys.platform == "darwin"
needs_mac = pytest.mark.skipif(not ON_MAC, reason=NEEDS_MACOS)
LABELS = [f"digit {i}" for i in range(10)]


def _manifest(precision: str) -> dict:
    return {"schema": "mixformer-deploy/manifest/1", "target": "coreml", "runtime": "coreml", "variant": "custom",
            "input_size": [SIZE, SIZE], "num_classes": 10, "labels": LABELS, "precision": precision, "batch": 1,
            "preprocessing": {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.5]},
            "created": "2025-01-02T03:04:05+00:00", "versions": {"mixformer-deploy": "0.0-test"}}


def _export(deploy, out: Path, precision="fp32", keeps=(), **target_options) -> tuple[Path, dict]:
    spec = get_spec("coreml")
    options = ExportOptions(SIZE, SIZE, 1, precision, list(keeps), None, target=spec.parse_options(target_options))
    manifest = _manifest(precision)
    spec.exporter().export(deploy, ExportContext(final=out, tmp=out, options=options, manifest=manifest))
    return out, manifest


@pytest.fixture(scope="module")
def deploy():
    return to_deploy(create_model("custom", 10, seed=0, **TINY), (SIZE, SIZE))


@pytest.fixture(scope="module")
def artifacts(deploy, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml")
    keeps = resolve_keeps(deploy)
    return {
        "fp32": _export(deploy, out / "a-fp32.mlpackage"),
        "fp16": _export(deploy, out / "a-fp16.mlpackage", "fp16", keeps),
        # both app-facing forms at once, fp16 with one extra keep (a whole MLP)
        "app": _export(deploy, out / "a-app.mlpackage", "fp16", sorted([*keeps, "stages.0.0.mlp"]),
                       image_input=True, classifier=True),
    }


def _inspect(path):
    return get_spec("coreml").inspect(path)


def _count(deploy, kind) -> int:
    return sum(isinstance(m, kind) for m in deploy.modules())


# ---------------------------------------------------------------- the program, read back from the package

def test_fp32_program_facts(artifacts, deploy):
    info = _inspect(artifacts["fp32"][0])
    assert info["inputs"] == [{"name": "input", "kind": "multiArrayType", "dtype": "fp32",
                               "shape": [1, 3, SIZE, SIZE], "description": info["inputs"][0]["description"]}]
    assert [(o["name"], o["dtype"], o["shape"]) for o in info["outputs"]] == [("logits", "fp32", [1, 10])]
    ops = info["ops"]
    blocks = sum(TINY["depths"])
    assert ops["layer_norm"] == _count(deploy, torch.nn.LayerNorm)
    assert ops["softmax"] == blocks                      # one per window attention
    # 11 GEMMs per block (proj_attn, proj_cnn, 2 channel_interaction, projection, qkv, 2 spatial_interaction,
    # proj, fc1, fc2) + last_proj + head; convs: 3 stem + proj + a depth-wise per block + 3 merges
    assert ops["linear"] == 11 * blocks + 2
    assert ops["conv"] == 4 + blocks + 3
    assert info["max_rank"] <= 5
    assert set(info["precisions"]) == {"fp32"} and info["ops_fp16"] == {} and info["casts"] == 0
    assert info["kept_fp32"] == []
    assert info["specification_version"] == 7 and info["minimum_deployment_target"] == "iOS16/macOS13"


def test_fp16_keeps_layernorm_softmax_logits_and_head_in_fp32(artifacts, deploy):
    path, manifest = artifacts["fp16"]
    info = _inspect(path)
    assert info["inputs"][0]["dtype"] == "fp32" and info["outputs"][0]["dtype"] == "fp32"
    assert info["precisions"]["fp16"] > info["precisions"]["fp32"] > 0
    assert info["ops_fp32"]["layer_norm"] == info["ops"]["layer_norm"]          # every LayerNorm kept
    assert info["ops_fp32"]["softmax"] == info["ops"]["softmax"]                # and every softmax
    assert "layer_norm" not in info["ops_fp16"] and "softmax" not in info["ops_fp16"]
    assert info["ops_fp32"]["linear"] == 1                                      # the head, nothing else
    assert info["ops_fp32"]["reduce_mean"] == 1                                 # the pool
    assert info["ops_fp16"]["conv"] == info["ops"]["conv"]
    kept = set(info["kept_fp32"])
    assert {"stages.0.0.norm1", "stages.3.0.attention.logits", "pool", "head"} <= kept
    assert kept == set(resolve_keeps(deploy))     # every keep was honoured, as the program's dtypes show
    assert manifest["coreml"]["kept_fp32_unmatched"] == []
    assert "ops_without_module" not in manifest["coreml"] or \
        not {"layer_norm", "softmax"} & set(manifest["coreml"]["ops_without_module"])


def test_extra_keep_and_app_facing_forms(artifacts):
    path, manifest = artifacts["app"]
    info = _inspect(path)
    assert info["form"] == "classifier+image"
    assert info["inputs"] == [{"name": "image", "kind": "imageType", "width": SIZE, "height": SIZE,
                               "color_space": "RGB", "description": info["inputs"][0]["description"]}]
    assert [(o["name"], o["kind"]) for o in info["outputs"]] == [("classLabel", "stringType"),
                                                                ("classLabel_probs", "dictionaryType")]
    assert info["ops"]["classify"] == 1
    assert "stages.0.0.mlp" in info["kept_fp32"]
    assert info["ops_fp32"]["linear"] == 3                                      # fc1, fc2 of the MLP + head
    pre = manifest["coreml"]["image_preprocessing"]
    assert pre["scale"] == pytest.approx(1 / 255) and pre["bias"] == [-0.5, -0.4, -0.3]
    assert pre["in_graph_multiply"] == pytest.approx([4.0, 5.0, 2.0])
    assert manifest["coreml"]["classifier"]["labels"] == LABELS
    from mixformer_deploy.backends.coreml.spec import read_spec
    spec = read_spec(path)
    assert spec.description.input[0].name == "image"
    assert spec.description.predictedFeatureName == "classLabel"


def test_metadata_and_embedded_manifest(artifacts):
    path, manifest = artifacts["fp32"]
    info = _inspect(path)
    meta = info["metadata"]
    assert meta["author"] == "mixformer-deploy" and meta["license"] == "Apache-2.0" and meta["version"] == "0.0-test"
    assert "MixFormer custom" in meta["short_description"] and "fp32" in meta["short_description"]
    embedded = get_spec("coreml").read_embedded(path)
    assert embedded == json.loads(json.dumps(manifest))
    assert embedded["coreml"]["passes_removed"] == [RANK_PASS]
    assert not (path / "executorch_debug_handle_mapping.json").exists()
    assert set(info["files"]) == {"Manifest.json", "Data/com.apple.CoreML/model.mlmodel",
                                  "Data/com.apple.CoreML/weights/weight.bin"}


def test_the_rank_pass_is_removed_and_not_needed(artifacts):
    import coremltools as ct

    assert RANK_PASS in ct.PassPipeline.DEFAULT.passes
    assert RANK_PASS not in pass_pipeline().passes
    for key in artifacts:  # every conversion here ran without it, and no tensor exceeds rank 5
        assert _inspect(artifacts[key][0])["max_rank"] <= 5


# ---------------------------------------------------------------- the function, evaluated from the package

def test_numpy_evaluation_of_the_program_matches_pytorch(artifacts, deploy):
    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = deploy(torch.from_numpy(x)).numpy()
    assert rel_l2(mil_reference(artifacts["fp32"][0], x), ref) <= 1e-5
    err16 = rel_l2(mil_reference(artifacts["fp16"][0], x), ref)
    assert 1e-6 < err16 <= 2e-2           # fp16 rounding is really there, and small
    with pytest.raises(UsageError, match="plain form"):
        mil_reference(artifacts["app"][0], x)


def test_app_facing_forms_skip_the_gate_and_say_why(tmp_path):
    """On a Mac the runner could predict, but only the plain form is the contract's function: export skips
    parity for app-facing forms (and refuses --check) instead of failing after the conversion."""
    from mixformer_deploy.export_api import export

    spec = get_spec("coreml")
    plain = ExportOptions(SIZE, SIZE, 1, "fp16", [], None,
                          target=spec.parse_options({"image_input": False, "classifier": False}))
    assert spec.unjudged_form(plain) is None
    app = ExportOptions(SIZE, SIZE, 1, "fp16", [], None,
                        target=spec.parse_options({"image_input": True, "classifier": True}))
    assert "--image-input --classifier" in spec.unjudged_form(app)
    with pytest.raises(UsageError, match="plain form"):
        export(target="coreml", precision="fp16", output=tmp_path, check=True, target_options={"classifier": True})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the runner

def test_runner_says_prediction_needs_macos_or_predicts(artifacts):
    status = CoreMlRunner.status()
    assert status["installed"]
    if not ON_MAC:
        assert not status["can_run"] and NEEDS_MACOS in status["note"]
        with pytest.raises(MissingBackendError, match=NEEDS_MACOS):
            CoreMlRunner.load(artifacts["fp32"][0])
    with pytest.raises(UsageError, match="compute_units"):
        CoreMlRunner.load(artifacts["fp32"][0], options={"compute_units": "gpu"})
    with pytest.raises(UsageError, match="takes no option"):
        CoreMlRunner.check_options({"precision": "fp16"})
    with pytest.raises(UsageError, match="--device"):
        CoreMlRunner.load(artifacts["fp32"][0], device="cuda")
    with pytest.raises(UsageError, match="compute_units"):
        CoreMlRunner.load(artifacts["fp32"][0], device="coreml:tpu")


@needs_mac
@pytest.mark.parametrize("units", ["cpu_only", "all"])
def test_core_ml_predicts_like_pytorch(artifacts, deploy, units):
    x = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = deploy(torch.from_numpy(x)).numpy()
    runner = CoreMlRunner.load(artifacts["fp32"][0], options={"compute_units": units})
    assert rel_l2(runner.run(x), ref) <= 1e-4
    runner16 = CoreMlRunner.load(artifacts["fp16"][0], options={"compute_units": units})
    assert rel_l2(runner16.run(x), ref) <= 2e-2


@needs_mac
def test_core_ml_app_form_classifies_an_image(artifacts):
    from PIL import Image

    runner = CoreMlRunner.load(artifacts["app"][0], options={"compute_units": "cpu_only"})
    out = runner.predict({"image": Image.new("RGB", (SIZE, SIZE), (120, 80, 40))})
    assert out["classLabel"] in LABELS and sum(out["classLabel_probs"].values()) == pytest.approx(1, abs=1e-2)
    with pytest.raises(UsageError, match="app-facing"):
        runner.run(np.zeros((1, 3, SIZE, SIZE), np.float32))


# ---------------------------------------------------------------- bad inputs

@pytest.fixture
def broken(artifacts, tmp_path):
    def copy(kind: str) -> Path:
        dst = tmp_path / f"{kind}.mlpackage"
        shutil.copytree(artifacts["fp32"][0], dst)
        return dst
    return copy


def _loads_and_inspects_fail(path, match):
    with pytest.raises(ArtifactError, match=match):
        _inspect(path)
    with pytest.raises(ArtifactError, match=match):
        CoreMlRunner.load(path)


def test_missing_weights_is_a_bad_artifact(broken):
    p = broken("noweights")
    (p / "Data/com.apple.CoreML/weights/weight.bin").unlink()
    _loads_and_inspects_fail(p, "weights are missing")
    p = broken("truncated")
    (p / "Data/com.apple.CoreML/weights/weight.bin").write_bytes(b"\0" * 64)
    _loads_and_inspects_fail(p, "truncated")


def test_corrupt_spec_or_manifest_is_a_bad_artifact(broken, tmp_path):
    p = broken("corrupt")
    (p / "Data/com.apple.CoreML/model.mlmodel").write_bytes(b"\x0a\xff\xff\xff this is not a protobuf")
    _loads_and_inspects_fail(p, "corrupt model spec")
    with pytest.raises(ArtifactError, match="corrupt model spec"):
        get_spec("coreml").read_embedded(p)
    p = broken("nomanifest")
    (p / "Manifest.json").unlink()
    _loads_and_inspects_fail(p, "no Manifest.json")
    p = broken("nospec")
    (p / "Data/com.apple.CoreML/model.mlmodel").unlink()
    _loads_and_inspects_fail(p, "spec .* is missing")
    _loads_and_inspects_fail(tmp_path / "absent.mlpackage", "not found")


@pytest.mark.parametrize("value, match", [
    ("iOS14", "too old.*oldest that works for this model is iOS15"),
    ("macOS11", "too old.*oldest that works for this model is macOS12"),
    ("android12", "choose one of"),
])
def test_bad_deployment_targets_are_usage_errors(value, match):
    spec = get_spec("coreml")
    opts = spec.parse_options({"minimum_deployment_target": value})
    with pytest.raises(UsageError, match=match):
        spec.check(ExportOptions(SIZE, SIZE, 1, "fp32", target=opts))


def test_precision_it_does_not_make_is_a_usage_error():
    spec = get_spec("coreml")
    with pytest.raises(UsageError, match="fp32 or fp16"):
        spec.check(ExportOptions(SIZE, SIZE, 1, "int8", target=spec.parse_options({})))


def test_missing_coremltools_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import coremltools -> ImportError
    spec = get_spec("coreml")
    with pytest.raises(MissingBackendError, match=r"mixformer-deploy\[coreml\]"):
        spec.check(ExportOptions(SIZE, SIZE, 1, "fp32", target=spec.parse_options({})))


# ---------------------------------------------------------------- the CLI

def test_cli_inspect_and_prediction_commands(artifacts):
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app

    _load_commands()
    path = artifacts["fp16"][0]
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["ops_fp32"]["layer_norm"] == info["ops"]["layer_norm"] and info["max_rank"] <= 5
    from mixformer_deploy.parity import artifact_manifest
    assert artifact_manifest(path)["target"] == "coreml"
    result = CliRunner().invoke(app, ["parity", str(path), "--runtime-option", "compute_units=gpu"])
    assert result.exit_code == 2 and "compute_units" in result.stderr
    if not ON_MAC:
        result = CliRunner().invoke(app, ["parity", str(path)])
        assert result.exit_code == 3, result.output
        assert result.stderr.strip().splitlines()[-1] == f"error: {NEEDS_MACOS}"


# ---------------------------------------------------------------- end to end, shipped weights (slow)

@pytest.fixture(scope="module")
def shipped_fp16(tmp_path_factory):
    from mixformer_deploy.export_api import export

    out = tmp_path_factory.mktemp("coreml-shipped")
    return export(target="coreml", precision="fp16", output=out, check=False)


@pytest.mark.slow
def test_shipped_weights_export_keeps_the_digits(shipped_fp16):
    from mixformer_deploy.data import Preprocessing, heldout_digits
    from mixformer_deploy.source import load_source

    path = shipped_fp16.path
    assert path.name == "mixformer-b0-32x32-b1-fp16.mlpackage" and path.is_dir()
    assert shipped_fp16.manifest["coreml"]["minimum_deployment_target"] == "iOS16"
    info = get_spec("coreml").inspect(path)
    assert info["ops_fp32"]["layer_norm"] == info["ops"]["layer_norm"] and info["max_rank"] <= 5
    source = load_source(None)
    x, _, y = heldout_digits(32, 32, Preprocessing.from_dict(shipped_fp16.manifest["preprocessing"]))
    with torch.no_grad():
        ref = source.model(torch.from_numpy(x)).numpy()
    got = MilReference(path).run(x)
    assert rel_l2(got, ref) <= 2e-2
    assert (got.argmax(-1) == y).mean() >= (ref.argmax(-1) == y).mean() - 0.005   # at most 0.5 points lost


# ---------------------------------------------------------------- full sizes (slow)

@pytest.mark.slow
@pytest.mark.parametrize("variant, size", [("B0", (224, 224)), ("B1", (224, 224)), ("B2", (224, 224)),
                                           ("B3", (224, 224)), ("B4", (224, 224)), ("B1", (256, 192))])
def test_full_size_conversion_without_the_rank_pass(variant, size, tmp_path):
    deploy = to_deploy(create_model(variant, seed=0), size)
    spec = get_spec("coreml")
    keeps = resolve_keeps(deploy)
    out = tmp_path / "m.mlpackage"
    options = ExportOptions(*size, 1, "fp16", keeps, None, target=spec.parse_options({}))
    manifest = {**_manifest("fp16"), "input_size": list(size), "num_classes": 1000, "labels": None}
    spec.exporter().export(deploy, ExportContext(final=out, tmp=out, options=options, manifest=manifest))
    info = spec.inspect(out)
    assert info["max_rank"] <= 5
    assert info["ops"]["layer_norm"] == _count(deploy, torch.nn.LayerNorm) == info["ops_fp32"]["layer_norm"]
    blocks = sum(len(s) for s in deploy.stages)
    assert info["ops"]["softmax"] == blocks
    assert info["ops"]["linear"] == 11 * blocks + 2 and info["ops"]["conv"] == 4 + blocks + 3   # as for tiny
    assert set(info["kept_fp32"]) == set(keeps)
    assert ("pad" in info["ops"]) == (size == (256, 192))   # 224: 56/28/14/7 fit 7x7 windows; 192/32=6 does not
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    with torch.no_grad():
        ref = deploy(torch.from_numpy(x)).numpy()
    assert rel_l2(mil_reference(out, x), ref) <= 2e-2


# ---------------------------------------------------------------- the export profile and the Mac script

def test_profile_names_this_target():
    from mixformer_deploy.profiles import load_profile

    p = load_profile("coreml-fp16")
    assert p["target"] == "coreml" and p["precision"] == "fp16"
    assert p["target_options"] == {"minimum_deployment_target": "iOS16", "image_input": False, "classifier": False}


@pytest.mark.skipif(ON_MAC, reason="checks the refusal off macOS")
def test_mac_check_exits_3_off_macos(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "mac_check.sh"
    r = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert r.returncode == 3
    expected = f"error: {NEEDS_MACOS} (this is Linux): run benchmarks/mac_check.sh on a Mac"
    assert r.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dynamic_batch_and_the_oldest_deployment_target(deploy, tmp_path):
    spec = get_spec("coreml")
    out = tmp_path / "dyn.mlpackage"
    options = ExportOptions(SIZE, SIZE, None, "fp16", resolve_keeps(deploy), None,
                            target=spec.parse_options({"minimum_deployment_target": "iOS15"}))
    manifest = {**_manifest("fp16"), "batch": "dynamic"}
    spec.exporter().export(deploy, ExportContext(final=out, tmp=out, options=options, manifest=manifest))
    info = spec.inspect(out)
    assert info["specification_version"] == 6 and info["inputs"][0]["shape_range"][0] == [1, 1024]
    x = np.random.default_rng(3).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = deploy(torch.from_numpy(x)).numpy()
    assert rel_l2(mil_reference(out, x), ref) <= 2e-2
