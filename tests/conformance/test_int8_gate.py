"""int8 of the shipped weights (B0 digits, 32x32), calibrated on the default set (the digits' training split),
passes the accuracy gate on the 360 held-out digits (at most 3 more misclassified than the float model) and
its artifact computes in int8. The costly backends' int8 belongs to the slow run."""

from __future__ import annotations

import pytest

from conftest import backends, needs_export, plan_of

CALIBRATION_SIZE = 64   # of the default 300: the gate holds at 64 and the default run stays fast


@pytest.fixture(scope="module")
def shipped():
    from mixformer_deploy.shipped import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.fail(f"the shipped weights are missing: {DEFAULT_WEIGHTS}")
    return DEFAULT_WEIGHTS


@pytest.mark.parametrize("spec", backends("int8", slow_if_costly=True))
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
    info = spec.inspect(result.path)
    assert (info["precisions"] or {}).get("int8", 0) > 0, info["precisions"]
