"""--keep-fp32 auto: the search's plumbing on the tiny fixture (no keeps already pass: two exports, the
record in the manifest, the equivalent flags), its refusals, and (slow) a real search on the shipped
weights where OpenVINO int8 without keeps fails --max-accuracy-drop 0."""

from __future__ import annotations

import pytest

from conftest import WEIGHTS, invoke_cli
from mixformer_deploy.export_api import export
from mixformer_deploy.keep_search import MAX_EXPORTS

EXAMPLES = "models/examples"


def test_auto_where_no_keeps_pass_costs_two_exports_and_is_recorded(tmp_path, caplog):
    caplog.set_level("INFO", logger="mixformer_deploy.keep_search")
    r = export(WEIGHTS, target="onnx", img_size=64, precision="int8", keep_fp32=("auto", "head"),
               calibration=EXAMPLES, output=tmp_path)
    keeps = r.manifest["precision_keeps"]
    assert r.passed and keeps["defaults"] is False
    assert keeps["patterns"] == ["head"] and keeps["modules"] == ["head"]   # a glob beside auto is always kept
    search = keeps["search"]
    assert search["method"] == "auto" and search["passed"] and search["found"] == []
    assert search["exports"] == 2 and len(search["steps"]) == 1
    assert search["flags"] == "--no-default-keeps --keep-fp32 head"
    assert "--no-default-keeps --keep-fp32 head" in caplog.text


@pytest.mark.parametrize("args, words", [
    (("--target", "onnx", "--precision", "fp16"), "computed in float32"),
    (("--target", "coreml", "--precision", "fp16"), "computed in float32"),
    (("--target", "onnx", "--precision", "int8", "--no-check"), "--no-check"),
    (("--target", "all", "--precision", "int8"), "one target at a time"),
    (("--target", "onnx", "--precision", "int8", "--keep-fp32", "nothing.matches"), "matches no module"),
])
def test_auto_refusals_are_usage_errors(args, words, tmp_path):
    r = invoke_cli("export", "-w", WEIGHTS, "--img-size", "64", "--keep-fp32", "auto", "-o", tmp_path, *args)
    assert r.code == 2, (r.code, r.stderr)
    assert words in r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.openvino
def test_auto_finds_a_small_set_where_no_keeps_fail(tmp_path):
    """Shipped weights, OpenVINO int8, not one more misclassified held-out digit than the reference: on the
    Intel Xeon (AMX) here no keeps fail it (and so do the default keeps) and the search finds 2 modules."""
    from mixformer_deploy.deploy import to_deploy
    from mixformer_deploy.deploy.precision import resolve_keeps
    from mixformer_deploy.source import load_source

    r = export(None, target="openvino", precision="int8", keep_fp32=("auto",), max_accuracy_drop="0",
               output=tmp_path)
    search = r.manifest["precision_keeps"]["search"]
    assert r.passed and search["passed"] and search["exports"] <= MAX_EXPORTS
    if search["steps"][0]["passed"]:   # int8 kernels differ by CPU: where no keeps pass, nothing is searched
        assert search["found"] == [] and search["exports"] == 2
        return
    defaults = resolve_keeps(to_deploy(load_source(None).model, (32, 32)))
    assert 0 < len(search["found"]) <= len(defaults) / 4, (search["found"], len(defaults))


def test_auto_for_tensorrt_int8_starts_from_the_layer_norms_it_needs_float(tmp_path):
    """TensorRT int8 never reads a LayerNorm's input as int8 (trt-lint): no keeps would fail the lint, so
    the search starts with every LayerNorm kept."""
    r = export(WEIGHTS, target="tensorrt", img_size=64, precision="int8", keep_fp32=("auto",),
               calibration=EXAMPLES, output=tmp_path, target_options={"onnx_only": True})
    keeps = r.manifest["precision_keeps"]
    assert r.passed and keeps["search"]["exports"] <= MAX_EXPORTS
    assert "patch_embed.norm" in keeps["modules"] and "stages.2.1.norm1" in keeps["modules"]
    assert not any(m.endswith("attention.logits") for m in keeps["modules"])   # not the default keeps
