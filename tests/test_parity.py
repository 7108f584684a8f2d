"""Parity: metrics against numpy, the pass rule, localization by stage, JUnit XML, and the CLI."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from typer.testing import CliRunner

from mixformer_deploy import create_model
from mixformer_deploy.checkpoints import save_safetensors
from mixformer_deploy.cli import parity_cmd  # noqa: F401  (registers parity and predict on the app)
from mixformer_deploy.cli.app import app
from mixformer_deploy.errors import ArtifactError, MixformerDeployError
from mixformer_deploy.data import run_batched
from mixformer_deploy.parity import check_parity, compare_outputs
from mixformer_deploy.reports.junit import write_junit
from mixformer_deploy.backends.spec import Tolerance

TINY = dict(num_classes=10, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
LABELS = [f"class-{i}" for i in range(10)]


def _tiny(path, seed=0, **overrides):
    model = create_model("custom", seed=seed, **{**TINY, **overrides})
    return save_safetensors(model, path, extra={"input_size": "64x64", "labels": LABELS})


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("good") / "tiny.safetensors")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, good):
    """The good weights with one tensor of stage 2 scaled: everything before stage 2 is still exact."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(good))
    key = "layers.2.blocks.0.mlp.fc1.weight"
    sd[key] = sd[key] * 1.5
    out = tmp_path_factory.mktemp("bad") / "tampered.safetensors"
    save_file(sd, str(out), metadata=meta)
    return out


@pytest.fixture(scope="module")
def bad_report(bad, good):
    return check_parity(bad, weights=good, inputs=["random"])


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from skimage import data
    from skimage.io import imsave

    folder = tmp_path_factory.mktemp("photos")
    imsave(folder / "chelsea.png", data.chelsea())
    return folder / "chelsea.png"


# ---------------------------------------------------------------- metrics

def test_metrics_match_numpy():
    rng = np.random.default_rng(1)
    r = rng.standard_normal((8, 10)).astype(np.float32)
    a = (r + 1e-3 * rng.standard_normal((8, 10))).astype(np.float32)
    tol = Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.9)
    m = compare_outputs(a, r, tol)
    d, a64, r64 = (a - r).astype(np.float64), a.astype(np.float64), r.astype(np.float64)
    assert m.max_abs == pytest.approx(np.abs(d).max())
    assert m.mean_abs == pytest.approx(np.abs(d).mean())
    assert m.rel_l2 == pytest.approx(np.linalg.norm(d) / np.linalg.norm(r64))
    assert m.cosine == pytest.approx(a64.ravel() @ r64.ravel() / np.linalg.norm(a64) / np.linalg.norm(r64))
    per_input = (a64 * r64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(r64, axis=1)
    assert m.min_sample_cosine == pytest.approx(per_input.min())
    assert m.top1_agreement == pytest.approx((a.argmax(1) == r.argmax(1)).mean())
    per_diff, scale = np.abs(d).max(1), np.abs(r64).max(1)
    worst = int(np.argmax(per_diff / (1e-4 + 1e-4 * scale)))
    assert m.worst_input == worst and m.bound == pytest.approx(1e-4 + 1e-4 * scale[worst])
    assert m.implied_rtol == pytest.approx((per_diff / scale).max())
    assert not m.passed and not m.max_abs_ok and m.cosine_ok


def test_rule_is_per_input_a_large_logit_elsewhere_does_not_widen_the_bound():
    tol = Tolerance(atol=0.0, rtol=1e-3, min_cosine=0.0)
    r = np.array([[1000.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    a = r + np.array([[0.5, 0.0, 0.0], [0.01, 0.0, 0.0]])  # 0.01 on a max|r| of 1 is 1e-2 relative
    m = compare_outputs(a, r, tol, ids=["big", "small"])
    assert not m.max_abs_ok and m.worst_input_name == "small"
    assert m.bound == pytest.approx(1e-3) and m.max_abs < 1e-3 * 1000  # a pooled bound would have passed
    assert "small" in m.failures(tol)[0]
    m = compare_outputs(a[:1], r[:1], tol)
    assert m.max_abs_ok


def test_smallest_passing_tolerance_is_tight():
    rng = np.random.default_rng(2)
    r = rng.standard_normal((4, 10))
    a = r + 1e-3 * rng.standard_normal((4, 10))
    m = compare_outputs(a, r, Tolerance(atol=0.0, rtol=1e-4, min_cosine=0.0))
    assert m.smallest_atol == pytest.approx(max(0.0, (np.abs(a - r).max(1) - 1e-4 * np.abs(r).max(1)).max()))
    assert compare_outputs(a, r, Tolerance(atol=m.smallest_atol * 1.0001, rtol=1e-4, min_cosine=0)).max_abs_ok
    assert not compare_outputs(a, r, Tolerance(atol=m.smallest_atol * 0.999, rtol=1e-4, min_cosine=0)).max_abs_ok
    assert compare_outputs(a, r, Tolerance(1.0, 0.0, min_cosine=m.largest_min_cosine)).cosine_ok


def test_top1_is_gated_on_the_reference_margin():
    tol = Tolerance(atol=0.1, rtol=0.0, min_cosine=0.0)
    r = np.array([[1.00, 0.99, 0.0],    # margin 0.01 < tolerance: a flip here is noise
                  [2.00, 0.00, 0.0]])   # margin 2 > tolerance: must agree
    flip_close = np.array([[0.99, 1.00, 0.0], [2.00, 0.00, 0.0]])
    m = compare_outputs(flip_close, r, tol)
    assert m.top1_agreement == 0.5 and m.gated == 1 and m.gated_disagreements == 0 and m.top1_ok
    flip_clear = np.array([[1.00, 0.99, 0.0], [0.00, 2.00, 0.0]])
    m = compare_outputs(flip_clear, r, Tolerance(atol=10.0, rtol=0.0, min_cosine=-1.0))
    assert m.gated == 0  # with a loose tolerance nothing is gated
    m = compare_outputs(flip_clear, r, tol)
    assert m.gated_disagreements == 1 and not m.top1_ok and not m.passed


def test_non_finite_outputs_fail():
    r = np.ones((2, 3))
    a = r.copy()
    a[0, 0] = np.nan
    m = compare_outputs(a, r, Tolerance())
    assert m.nonfinite == 1 and not m.passed
    assert json.dumps(m.to_dict(), allow_nan=False)


def test_fixed_batch_is_fed_in_padded_chunks():
    class FixedFour:
        def run(self, batch):
            assert batch.shape[0] == 4
            return batch.reshape(4, -1)[:, :3] * 2

    x = np.arange(6 * 3 * 2 * 2, dtype=np.float32).reshape(6, 3, 2, 2)
    np.testing.assert_array_equal(run_batched(FixedFour(), x, batch=4), x.reshape(6, -1)[:, :3] * 2)


# ---------------------------------------------------------------- artifacts

def test_good_artifact_passes(good):
    report = check_parity(good)
    assert report.passed and report.failures == [] and report.first_failing_stage is None
    assert [s["name"] for s in report.inputs] == ["photos", "random"]
    assert report.overall.max_abs == 0.0 and report.overall.top1_agreement == 1.0
    d = report.to_dict()
    assert d["tolerance"] == {"atol": 1e-4, "rtol": 1e-4, "min_cosine": 0.99999, "gate_top1": True}
    assert d["runtime"]["runtime"] == "torch" and d["manifest"]["input_size"] == [64, 64]
    json.dumps(d, allow_nan=False)


def test_tampered_artifact_fails_at_stage2(bad_report):
    r = bad_report
    assert not r.passed and r.failures
    assert r.first_failing_stage == "stage2"
    by_name = {s.name: s for s in r.stages}
    assert list(by_name)[:4] == ["stem", "stage0", "stage1", "stage2"]
    assert by_name["stage1"].rel_l2 < 1e-6 and not by_name["stage1"].diverged
    assert any("not the weights the artifact was exported from" in w for w in r.warnings)


def test_seeded_reference_is_rebuilt_from_the_manifest():
    from pathlib import Path

    import torch

    from mixformer_deploy.errors import UsageError
    from mixformer_deploy.parity import resolve_reference

    model = create_model("custom", seed=3, **TINY)
    manifest = {"num_classes": 10, "config": model.cfg.to_dict(), "seed": 3, "weights": {"sha256": None}}
    ref = resolve_reference(Path("m.onnx"), manifest, None, [])
    assert ref.source == "seeded"
    assert all(torch.equal(v, ref.model.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="--weights"):
        resolve_reference(Path("m.onnx"), {**manifest, "seed": None, "weights": {"sha256": "ab" * 32}}, None, [])


def test_weights_that_do_not_fit_are_refused(tmp_path, good):
    other = _tiny(tmp_path / "five.safetensors", num_classes=5)
    with pytest.raises(ArtifactError, match="artifact has 10 classes, weights have 5"):
        check_parity(good, weights=other, inputs=["random"])


def test_junit_counts_failures(tmp_path, bad_report, good):
    def parse(path):
        suite = ET.parse(path).getroot().find("testsuite")
        return suite, suite.findall("testcase")

    suite, cases = parse(write_junit(bad_report, tmp_path / "bad.xml"))
    o = bad_report.overall
    expected = sum(not m.max_abs_ok for m in bad_report.sets.values()) + (not o.cosine_ok) + (not o.top1_ok)
    assert suite.get("name") == "parity" and expected >= 2
    assert int(suite.get("failures")) == expected == sum(c.find("failure") is not None for c in cases)
    assert int(suite.get("tests")) == len(cases) == len(bad_report.sets) + 2
    assert "stage2" in cases[0].find("failure").get("message")

    ok = check_parity(good, inputs=["random"])
    suite, cases = parse(write_junit(ok, tmp_path / "ok.xml"))
    assert suite.get("failures") == "0" and all(c.find("failure") is None for c in cases)


def test_junit_failure_quotes_the_worst_inputs_own_error_and_bound_and_the_observed_figures():
    from mixformer_deploy.reports.junit import build_junit

    tol = Tolerance(atol=0.0, rtol=1e-3, min_cosine=0.0)
    r = np.array([[1000.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    m = compare_outputs(r + np.array([[0.5, 0.0, 0.0], [0.01, 0.0, 0.0]]), r, tol, ids=["big", "small"]).to_dict()
    d = {"artifact": "m.onnx", "tolerance": {"atol": 0.0, "rtol": 1e-3, "min_cosine": 0.0}, "overall": m,
         "sets": {"photos": m}}
    case = build_junit(d).getroot().find("testsuite").find("testcase")
    message = case.find("failure").get("message")
    assert message.startswith("max|a-r| 0.01 > 0.001 on small"), message  # not the pooled 0.5 of "big"
    assert "observed: max|a-r| 0.5, implying rtol 0.01 at atol 0" in message and "smallest" not in message


# ---------------------------------------------------------------- CLI

def _invoke(*args):
    """Run the CLI as users do: typed errors come back as the contract's exit codes."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert not isinstance(result.exception, MixformerDeployError), "a typed error escaped the CLI"
    return result, result.exit_code


def test_cli_parity_pass_writes_reports(tmp_path, good, photo):
    result, code = _invoke("parity", good, "--inputs", "random", "--inputs", photo.parent, "--threads", "1",
                           "--json", tmp_path / "p.json", "--junit", tmp_path / "p.xml")
    assert code == 0, result.output
    assert "PASS" in result.stdout and "cosine" in result.stdout
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["passed"] is True and report["runtime"]["threads"] == 1
    assert ET.parse(tmp_path / "p.xml").getroot().find("testsuite").get("failures") == "0"


def test_cli_parity_fail_names_stage(bad, good):
    result, code = _invoke("parity", bad, "--weights", good, "--inputs", "random")
    assert code == 1
    assert "FAIL" in result.stdout and "first diverging stage: stage2" in result.stdout
    assert "error: " in result.stderr and "stage2" in result.stderr.strip().splitlines()[-1]


def test_cli_parity_missing_artifact(tmp_path):
    result, code = _invoke("parity", tmp_path / "nope.onnx")
    assert code == 4 and "not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_predict_prints_top_k(good, photo):
    result, code = _invoke("predict", photo, "--weights", good, "--top", "3")
    assert code == 0, result.output
    assert "chelsea.png" in result.stdout and "class-" in result.stdout
    resized = [line for line in result.stderr.splitlines() if "resized" in line]  # 300x451 is not the model's
    assert len(resized) == 1 and "chelsea.png 300x451" in resized[0] and "(height x width)" in resized[0], result.stderr
    result, code = _invoke("predict", photo, "--artifact", good, "--top", "3", "--json", "--threads", "1")
    out = json.loads(result.stdout)
    assert code == 0 and len(out[0]["top"]) == 3
    probs = [t["probability"] for t in out[0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_cli_predict_missing_image(tmp_path, good):
    _, code = _invoke("predict", tmp_path / "nope.png", "--weights", good)
    assert code == 4


def test_predict_copy_of_weights_as_artifact(tmp_path, good, photo):
    shutil.copy(good, tmp_path / "copy.safetensors")
    result, code = _invoke("predict", photo, "--artifact", tmp_path / "copy.safetensors", "--weights", good)
    assert code == 2  # one source, not two


# ---------------------------------------------------------------- the report's table at 100 columns (CI logs)

def test_report_table_keeps_whole_headers_and_numbers_at_100_columns(tmp_path, good, photo):
    """Two image folders with long paths: their columns are "set 1", "set 2" with the paths named under the
    table, no header or number is cut, and at 60 columns the sets go to a second table instead."""
    import io

    from rich.console import Console

    from mixformer_deploy.cli.parity_cmd import print_report

    folders = []
    for name in ("a_rather_long_folder_name_of_validation_images", "another_long_folder_of_more_images"):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(photo, folder / photo.name)
        folders.append(str(folder))
    report = check_parity(good, inputs=["random", *folders])
    for width in (100, 60):
        buf = io.StringIO()
        print_report(report, Console(file=buf, width=width, highlight=False, color_system=None))
        text = buf.getvalue()
        assert "…" not in text and "..." not in text
        assert f"set 1: {folders[0]}" in text and f"set 2: {folders[1]}" in text
        headers = [line.split("┃")[1:-1] for line in text.splitlines() if line.startswith("┃")]
        labels = [h.strip() for row in headers for h in row]
        assert {"metric", "random", "set 1", "set 2", "all inputs"} <= set(labels)
        assert labels.count("set 1") == 1 and labels.count("random") == 1  # each set in one column, once
        cosine = [line for line in text.splitlines() if line.startswith("│ min per-input cosine")]
        assert cosine and all(len(cell.strip()) == 10 for line in cosine for cell in line.split("│")[2:-1])
        assert all(len(line) <= width for line in text.splitlines() if line[:1] in "┏┃┡│└")
    assert len(headers) == 2  # at 60 columns: two tables, the metric column repeated
