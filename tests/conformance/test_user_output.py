"""What a user sees, in a real process (native libraries write straight to file descriptors 1 and 2, which
only a subprocess shows): ``export --json`` prints exactly one JSON document on stdout, and stderr holds our
own few lines, none of the converters' and runtimes' chatter; a truncated artifact through ``parity`` is
exactly one stderr line. The loudest converters and the int8 exports are slow; the rest run by default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import backends, copy_artifact, needs_export, plan_of, run_cli

MAX_STDERR_LINES = 25
# Third-party lines users met on stderr or stdout: converter logs, progress bars, library probes, glog lines.
CHATTER = re.compile("|".join((
    r"Converting op", r"Removing op", r"INFO:nncf", r"Statistics collection", r"Failed to load .*\.so",
    r"Detected no triton", r"cpuinfo_utils", r"Unable to initialize backend", r"NVML", r"absl::",
    r"Use JAX lowering", r"\[START\]", r"^[IWEF]\d{4} ", r"FutureWarning", r"DeprecationWarning",
    r"Traceback", r"XNNPACK delegate for CPU")), re.M)
# The default run covers the loudest converter (coremltools: 2,288 lines before, log records and native
# output alike) and the runtimes whose import prints; every other target runs in the slow run.
DEFAULT_EXPORTS = ("coreml",)
DEFAULT_READS = ("executorch", "litert", "tensorrt")


def _export_args(spec, weights_of, output: Path, precision: str = "fp32", as_json: bool = True) -> list:
    plan = plan_of(spec)
    args = ["export", "--target", spec.key, "--weights", weights_of(spec), "--img-size", plan.size,
            "--precision", precision, "--output", output] + (["--json"] if as_json else [])
    if plan.target_options.get("onnx_only"):
        args.append("--onnx-only")
    if precision in spec.calibrated:
        from mixformer_deploy.shipped import EXAMPLES_DIR
        args += ["--calibration", EXAMPLES_DIR]
    return args


def _assert_clean(result, what: str) -> dict:
    """rc 0, stdout one JSON document, stderr short and ours."""
    assert result.code == 0, f"{what}: exit {result.code}: {result.stderr[-800:]}"
    try:
        document = json.loads(result.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{what}: stdout is not one JSON document ({e}): {result.stdout[:300]!r}") from e
    _assert_stderr_ours(result, what)
    return document


def _assert_stderr_ours(result, what: str) -> None:
    lines = result.stderr.splitlines()
    assert len(lines) <= MAX_STDERR_LINES, f"{what}: {len(lines)} stderr lines:\n{result.stderr[-1500:]}"
    chatter = CHATTER.findall(result.stderr + result.stdout)
    assert not chatter, f"{what}: third-party output {sorted(set(chatter))}:\n{result.stderr[-1500:]}"


@pytest.mark.parametrize("spec", backends(slow=lambda s: s.key not in DEFAULT_EXPORTS))
def test_export_json_is_the_only_stdout_and_stderr_is_ours(spec, weights_of, tmp_path):
    needs_export(spec)
    result = run_cli(*_export_args(spec, weights_of, tmp_path))
    document = _assert_clean(result, f"export --target {spec.key}")
    assert Path(document["artifact"]).exists() and Path(document["artifact"]).parent == tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("spec", backends())
def test_plain_export_prints_the_path_last_and_the_report_on_stderr(spec, weights_of, tmp_path):
    """Without --json: stdout ends with the artifact's path; stderr is our lines and the parity report."""
    needs_export(spec)
    result = run_cli(*_export_args(spec, weights_of, tmp_path, as_json=False))
    assert result.code == 0, result.stderr[-800:]
    assert Path(result.stdout.splitlines()[-1]).parent == tmp_path, result.stdout
    _assert_stderr_ours(result, f"export --target {spec.key}")


@pytest.mark.slow
@pytest.mark.parametrize("spec", backends("int8"))
def test_int8_export_json_is_the_only_stdout(spec, weights_of, tmp_path):
    """int8 runs a calibrator (NNCF, ModelOpt, PT2E): their progress bars and INFO lines stay off both streams."""
    needs_export(spec)
    _assert_clean(run_cli(*_export_args(spec, weights_of, tmp_path, "int8")), f"export --target {spec.key} int8")


@pytest.mark.parametrize("spec", backends(slow=lambda s: s.key not in DEFAULT_READS))
def test_a_truncated_artifact_is_one_stderr_line(spec, exported, weights_of, tmp_path):
    """Reading a broken artifact imports its runtime, whose import prints; the user sees our line alone."""
    good = exported(spec).path
    bad = copy_artifact(good, tmp_path / good.name)
    target = bad if bad.is_file() else max((f for f in bad.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    result = run_cli("parity", bad, "--weights", weights_of(spec))
    assert result.code == 4, result.stderr[-800:]
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
