"""Benchmarks: statistics, the regression gate, the JSON schema, `bench` and `report` end to end (tiny model,
short durations)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mixformer_deploy.bench import Policy, Subject, benchmark_subjects, latency_stats, plan, throughput
from mixformer_deploy.cli.app import _load_commands, app
from mixformer_deploy.errors import UsageError
from mixformer_deploy.errors import InputFileError, InternalError
from mixformer_deploy.regression import bootstrap_ratio, compare, parse_threshold
from mixformer_deploy.reports.bench_json import SCHEMA, fingerprint, validate

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(num_classes=10, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), seed=0)
FAST = ["--threads", "1", "--warmup-s", "0.05", "--duration-s", "0.2", "--min-iters", "3"]

_load_commands()
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- statistics

def test_latency_stats_match_numpy():
    x = np.random.default_rng(1).lognormal(1.0, 0.3, 997)
    s = latency_stats(x)
    for key, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert s[key] == pytest.approx(np.percentile(x, q), rel=1e-12)
    assert s["mean"] == pytest.approx(x.mean()) and s["std"] == pytest.approx(x.std(ddof=1))
    assert s["min"] == x.min() and s["max"] == x.max()
    assert s["cv"] == pytest.approx(x.std(ddof=1) / x.mean())
    assert throughput(8, s["mean"]) == pytest.approx(8000 / x.mean())
    assert latency_stats([2.0])["std"] == 0.0


@pytest.mark.parametrize("text, value", [("10%", 0.10), ("10", 0.10), ("0.1", 0.10), (" 2.5 % ", 0.025),
                                         ("1", 1.0), ("0", 0.0), ("150", 1.5)])
def test_parse_max_regression(text, value):
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "-5%", "nan", "", "%"])
def test_parse_max_regression_rejects(text):
    with pytest.raises(UsageError):
        parse_threshold(text)


# ---------------------------------------------------------------- the regression gate

def doc_with(samples, slug="test-machine-2c-2t") -> dict:
    """A minimal result document holding one row with these raw samples."""
    row = {"artifact": "m.onnx", "role": "artifact", "runtime": "onnxruntime", "device": "cpu", "precision": "fp32",
           "form": None, "variant": "B1", "input_size": [224, 224], "batch": 1,
           "latency_ms": latency_stats(samples), "samples_ms": list(map(float, samples))}
    return {"machine": {"slug": slug}, "created": "now", "results": [row]}


def draw(seed: int, scale: float = 1.0, n: int = 300) -> np.ndarray:
    """Latency-like samples: a floor plus a long right tail."""
    rng = np.random.default_rng(seed)
    return scale * (10.0 + rng.gamma(2.0, 0.5, n))


def test_gate_fires_on_2x_slowdown():
    reg = compare(doc_with(draw(1, scale=2.0)), doc_with(draw(2)), threshold=0.10)
    assert reg["verdict"] == "regressed" and reg["rows"][0]["status"] == "regressed"
    assert reg["rows"][0]["low"] > 1.8 and reg["rows"][0]["ratio"] == pytest.approx(2.0, rel=0.05)
    assert re.search(r"\+\d+%", reg["messages"][0]) and "beyond the allowed +10%" in reg["messages"][0]


@pytest.mark.parametrize("seed", range(5))
def test_gate_quiet_on_same_distribution(seed):
    reg = compare(doc_with(draw(100 + seed)), doc_with(draw(200 + seed)), threshold=0.10)
    assert reg["verdict"] == "ok", reg["rows"]


def test_gate_is_seeded_and_other_machine_gives_no_verdict():
    a, b = draw(3, scale=2.0), draw(4)
    assert bootstrap_ratio(a, b, seed=7) == bootstrap_ratio(a, b, seed=7)
    reg = compare(doc_with(a), doc_with(b, slug="another-box-8c-8t"), threshold=0.10)
    assert reg["verdict"] == "no verdict" and reg["warnings"] and reg["rows"][0]["status"] == "other machine"


def test_rounds_are_resampled_whole_and_a_baseline_that_does_not_fit_is_exit_4():
    # 20 rounds of 15 back-to-back samples, each round shifted as a whole: the block interval is wider
    rng = np.random.default_rng(5)
    shifts = np.repeat(rng.normal(0, 1.0, 20), 15)
    a, b = draw(6) + shifts, draw(7) + np.repeat(rng.normal(0, 1.0, 20), 15)
    plain = bootstrap_ratio(a, b)
    blocks = bootstrap_ratio(a, b, new_rounds=[15] * 20, old_rounds=[15] * 20)
    assert blocks["blocks"] == "rounds" and plain["blocks"] == "samples"
    assert blocks["high"] - blocks["low"] > 1.5 * (plain["high"] - plain["low"])
    other = doc_with(draw(8))
    other["results"][0]["variant"] = "B4"
    with pytest.raises(InputFileError, match="B1.*B4|does not fit"):
        compare(doc_with(draw(9)), other, threshold=0.1)


def test_rows_without_a_baseline_row_are_named_in_a_warning():
    current, base = doc_with(draw(10)), doc_with(draw(11))
    extra = {**current["results"][0], "artifact": "b4.onnx", "variant": "B4"}
    current["results"].append(extra)
    reg = compare(current, base, threshold=0.1)
    assert [r["status"] for r in reg["rows"]] == ["ok", "no baseline"]
    assert any("b4.onnx batch 1" in w and "not judged" in w for w in reg["warnings"]), reg["warnings"]
    assert not any("m.onnx" in w for w in reg["warnings"])


def test_a_worker_that_dies_without_answering_is_an_internal_error_exit_70():
    """A real worker process, killed (as a crash or the OOM killer would): exit 70 in one line, never 1."""
    import multiprocessing
    import signal

    from mixformer_deploy.bench import _Worker

    worker = _Worker(multiprocessing.get_context("spawn"),
                     Subject("m.onnx", "artifact", "onnxruntime", "cpu", 1, {"input_size": [64, 64]}))
    worker.proc.kill()
    worker.proc.join(30)
    with pytest.raises(InternalError) as e:
        worker.call("load", 0)
    worker.close()
    assert e.value.exit_code == 70 and len(str(e.value).splitlines()) == 1
    assert f"code {-signal.SIGKILL}" in str(e.value) and "rerun with --debug" in str(e.value)


def test_a_worker_error_of_no_known_type_is_exit_70():
    from mixformer_deploy.bench import worker_error

    assert type(worker_error("ArtifactError", "m.onnx: bad")).__name__ == "ArtifactError"
    for name in ("NoSuchError", "one_line", "MixformerDeployError", "Exception"):
        assert worker_error(name, "m.onnx: boom").exit_code == 70, name


def test_plan_skips_fixed_batch_and_nothing_runnable_is_usage_error():
    fixed = Subject("b1.onnx", "artifact", "onnxruntime", "cpu", 1, {"batch": 1, "input_size": [64, 64]})
    dyn = Subject("dyn.onnx", "artifact", "onnxruntime", "cpu", 1, {"batch": "dynamic", "input_size": [64, 64]})
    groups, skipped = plan([fixed, dyn], [1, 8])
    assert groups == [(1, [0, 1]), (8, [1])]
    assert skipped == [{"artifact": "b1.onnx", "batch": 8, "reason": skipped[0]["reason"]}]
    with pytest.raises(UsageError, match="nothing is runnable"):
        benchmark_subjects([fixed], batches=[8], policy=Policy())


def test_machine_slug():
    env = {"cpu_model": "AMD EPYC 7B13 64-Core Processor", "cores": 2, "threads": 2, "gpu": None}
    assert fingerprint(env)["slug"] == "amd-epyc-7b13-2c-2t"
    env.update(cpu_model="Intel(R) Xeon(R) CPU @ 2.20GHz", gpu={"model": "NVIDIA H100 80GB HBM3"})
    assert fingerprint(env)["slug"] == "intel-xeon-2c-2t-h100-80gb-hbm3"


# ---------------------------------------------------------------- the CLI, end to end

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from mixformer_deploy import create_model
    from mixformer_deploy.checkpoints import save_safetensors
    path = tmp_path_factory.mktemp("bench") / "tiny.safetensors"
    return save_safetensors(create_model("custom", **TINY), path, extra={"input_size": "64x64"})


@pytest.fixture(scope="module")
def bench_run(tiny):
    out = tiny.parent
    r = invoke("bench", tiny, "--with-reference", "--batch", "1,2", *FAST, "--json", out / "r.json",
               "--markdown", out / "r.md", "--plot", out / "r.png")
    return r, out


def test_bench_cli_end_to_end(bench_run):
    r, out = bench_run
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    doc = json.loads((out / "r.json").read_text())
    assert doc["schema"] == SCHEMA and validate(doc) == []
    assert re.fullmatch(r"[a-z0-9-]+-\d+c-1t", doc["machine"]["slug"])
    assert doc["environment"]["threads"] == 1 and doc["environment"]["backends"]["torch"]
    assert [(x["artifact"], x["batch"]) for x in doc["results"]] == [
        ("tiny.safetensors", 1), ("torch eager reference (custom)", 1),
        ("tiny.safetensors", 2), ("torch eager reference (custom)", 2)]
    for row in doc["results"]:
        samples = np.array(row["samples_ms"])
        assert row["iterations"] == samples.size >= 3
        assert row["latency_ms"]["p50"] == pytest.approx(np.percentile(samples, 50))
        assert row["throughput_ips"] > 0 and row["first_inference_ms"] > 0 and row["peak_rss_bytes"] > 0
        assert 0 < row["floor_fraction"] and row["floor_ms"] > 0
    assert doc["results"][0]["ratio_to_first"] == 1.0 and doc["results"][1]["ratio_to_reference"] == 1.0
    a, ref = doc["artifacts"]
    assert a["size_bytes"] == ref["size_bytes"] == (out / "tiny.safetensors").stat().st_size
    assert a["manifest"]["weights_sha256"] == ref["manifest"]["weights_sha256"]
    assert a["manifest"]["input_size"] == [64, 64] and a["load_ms"] > 0
    assert doc["floor"]["matmul"]["gflops"] > 0 and doc["floor"]["matmul"]["threads"] == 1
    assert "| p50 ms |" in (out / "r.md").read_text()
    assert (out / "r.png").stat().st_size > 0
    assert "tiny.safetensors" in r.stdout


def test_report_markdown_and_html(bench_run):
    _, out = bench_run
    other = json.loads((out / "r.json").read_text())
    other["machine"]["slug"] = "another-box-8c-8t"
    (out / "other.json").write_text(json.dumps(other))
    for folder, name in (("rep", "report.md"), ("rep-html", "report.html")):
        r = invoke("report", out / "r.json", out / "r.json", out / "other.json", "--output", out / folder / name)
        assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
        assert r.stdout.strip().splitlines()[-1] == str(out / folder / name)
    text = (out / "rep" / "report.md").read_text()
    for png in ("latency", "batch", "speedup"):
        p = out / "rep" / f"report-{png}.png"
        assert p.stat().st_size > 0 and p.name in text
    assert [p.name for p in (out / "rep-html").iterdir()] == ["report.html"], "HTML is one self-contained file"
    html = (out / "rep-html" / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 3 and "<em>speed-up</em>" in html and "*speed-up*" not in html
    md = (out / "rep" / "report.md").read_text()
    assert md.count("\n## ") == 2 and "## another-box-8c-8t" in md and "| p50 ms |" in md


def test_bench_gate_exits_1_on_planted_regression(bench_run, tiny):
    _, out = bench_run
    doc = json.loads((out / "r.json").read_text())
    for row in doc["results"]:  # a baseline 10x faster than anything this machine does
        row["samples_ms"] = [s / 10 for s in row["samples_ms"]]
        row["latency_ms"] = latency_stats(row["samples_ms"])
    (out / "fast.json").write_text(json.dumps(doc))
    r = invoke("bench", tiny, *FAST, "--no-floor", "--baseline", out / "fast.json", "--max-regression", "10%")
    assert r.exit_code == 1, (r.stdout, r.stderr, r.exception)
    assert "regression gate: regressed" in r.stdout
    assert re.search(r"error: latency regression: tiny\.safetensors batch 1: p50 .* \(\+\d+%", r.stderr)


def test_a_baseline_that_does_not_fit_is_exit_4_and_keeps_the_run(bench_run, tiny, tmp_path):
    _, out = bench_run
    doc = json.loads((out / "r.json").read_text())
    for row in doc["results"]:
        row["variant"] = "B4"
    (tmp_path / "other.json").write_text(json.dumps(doc))
    r = invoke("bench", tiny, *FAST, "--no-floor", "--baseline", tmp_path / "other.json", "--json", tmp_path / "new.json")
    assert r.exit_code == 4, (r.stdout, r.stderr, r.exception)
    assert json.loads((tmp_path / "new.json").read_text())["results"]


def test_bench_usage_and_input_errors(tmp_path, tiny):
    r = invoke("bench", tiny, "--max-regression", "lots")
    assert r.exit_code == 2 and "max-regression" in r.stderr
    r = invoke("bench", tiny, "--batch", "1,x")
    assert r.exit_code == 2
    r = invoke("bench", tiny, "--baseline", tmp_path / "missing.json")
    assert r.exit_code == 4 and "missing.json" in r.stderr
    (tmp_path / "junk.json").write_text('{"schema": "other"}')
    r = invoke("report", tmp_path / "junk.json")
    assert r.exit_code == 4 and "not a mixformer-deploy/bench/1" in r.stderr
    r = invoke("report", tmp_path / "missing.json")
    assert r.exit_code == 4


def test_missing_artifact_is_exit_4_as_a_real_process(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mixformer_deploy", "bench", str(tmp_path / "nope.onnx")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 4 and p.stderr.strip().splitlines() == [f"error: artifact not found: {tmp_path / 'nope.onnx'}"]


@pytest.mark.slow
@pytest.mark.onnx
def test_bench_onnx_fixed_and_dynamic_batch_with_reference(tiny):
    """onnxruntime artifacts of both batch kinds beside the reference: the fixed one is skipped at batch 2."""
    pytest.importorskip("onnxruntime")
    from mixformer_deploy.bench import benchmark
    from mixformer_deploy.export_api import export

    out = tiny.parent / "onnx"
    paths = [export(tiny, "onnx", batch=b, output=out, check=False).path for b in ("dynamic", 1)]
    doc = benchmark(paths, batches=[1, 2], threads=1, with_reference=True, weights=tiny,
                    policy=Policy(warmup_s=0.05, duration_s=0.2, min_iters=3))
    assert validate(doc) == []
    assert [(r["artifact"], r["batch"]) for r in doc["results"]] == [
        (paths[0].name, 1), (paths[1].name, 1), ("torch eager reference (custom)", 1),
        (paths[0].name, 2), ("torch eager reference (custom)", 2)]
    assert doc["skipped"][0]["artifact"] == paths[1].name and doc["skipped"][0]["batch"] == 2
    assert {r["runtime"] for r in doc["results"]} == {"onnxruntime", "torch"}
