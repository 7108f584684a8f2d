"""int8 of the shipped weights (B0 digits, 32x32), calibrated on the default set (the digits' training split),
passes the accuracy gate on the 360 held-out digits (at most 3 more misclassified than the float model) and
its artifact computes in int8."""

from __future__ import annotations

import pytest

from conftest import backends, needs_export, plan_of

CALIBRATION_SIZE = 64   # of the default 300: the gate holds at 64 and the default run stays fast
# Every int8 gate is slow: ONNX's costs ~20 s on 2 cores (most of it onnxslim and onnxruntime's quantizer),
# the others 20 s (OpenVINO, TensorRT) to 3 minutes (ExecuTorch) each. The default run keeps the int8
# contracts that cost less: tests/conformance/test_precision_keeps.py and the per-backend int8 tests.
DEFAULT_RUN = ()
FLOAT32 = {"float32": "fp32"}   # inspect's spellings


@pytest.fixture(scope="module")
def shipped():
    from mixformer_deploy.shipped import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.fail(f"the shipped weights are missing: {DEFAULT_WEIGHTS}")
    return DEFAULT_WEIGHTS


@pytest.mark.parametrize("spec", backends("int8", slow=lambda spec: spec.key not in DEFAULT_RUN))
def test_int8_of_the_shipped_weights_passes_the_accuracy_gate(spec, shipped, tmp_path):
    from mixformer_deploy.export_api import export

    assert "int8" in spec.precisions and "int8" in spec.calibrated, "int8 is calibrated"
    needs_export(spec)
    result = export(shipped, target=spec.key, precision="int8", calibration_size=CALIBRATION_SIZE, output=tmp_path,
                    target_options=dict(plan_of(spec).target_options) or None)
    cal = result.manifest["calibration"]
    assert cal["source"].startswith("digits-train") and cal["count"] == CALIBRATION_SIZE and len(cal["sha256"]) == 64
    gates = {g.set: g for g in result.parity.accuracy}
    gate = gates["dataset"]
    assert gate.count == 360 and gate.allowed_extra == 3
    assert gate.passed and result.passed, result.parity.failures
    assert result.path.name == f"mixformer-b0-32x32-b1-int8{spec.suffix}"
    from mixformer_deploy.cli.inspect_cmd import inspect_artifact

    info = inspect_artifact(result.path)   # the backend's reader, with what the CLI adds to it
    assert (info["precisions"] or {}).get("int8", 0) > 0, info["precisions"]
    assert "int8 (FakeQuantize)" not in info["precisions"]   # "int8" names one thing: the ops computing in it
    # the default keeps stay float32; the quantizers leave other ops float32 too, which inspect tells apart
    keeps = result.manifest["precision_keeps"]["modules"]
    assert "head" in keeps and "head" in (info["kept_fp32"] or []), info["kept_fp32"]
    by_rule, other = info.get("fp32_kept_by_rule") or [], info.get("fp32_other") or []
    assert "head" in by_rule and sorted(by_rule + other) == sorted(info["kept_fp32"]), (by_rule, other)
    assert all(any(m == k or m.startswith(k + ".") for k in keeps) for m in by_rule), by_rule
    # and it takes float32 images, as every artifact does (quantization is inside)
    dtypes = [i.get("dtype") for i in (info["inputs"] or []) if isinstance(i, dict) and i.get("dtype")]
    assert all(FLOAT32.get(d, d) == "fp32" for d in dtypes), info["inputs"]
