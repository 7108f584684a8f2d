"""The GPU path: the torch runtime's CUDA graphs and CUDA-event GPU time, and benchmarks/gpu_check.py.

Tests that need CUDA are marked `gpu` (deselected by default: `pytest -m gpu` on a GPU machine). The
GPU check's plan and its CPU-side code are tested here, so that a lent GPU's few minutes are not spent
finding out that the script does not import or does not fit its budget."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rel_l2

ROOT = Path(__file__).resolve().parent.parent
no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch here")


def _gpu_check():
    """benchmarks/gpu_check.py as a module (it is a script, not part of the package)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        sys.modules["gpu_check"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_gpu_check_dry_run_fits_the_five_minutes_and_says_what_was_cut(tmp_path, capsys):
    gc = _gpu_check()
    assert gc.main([str(tmp_path / "out"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["estimate_s"] == sum(s["estimate_s"] for s in plan["plan"]) <= plan["budget_s"]
    cap = int(re.search(r"timeout --kill-after=\d+ (\d+) ", (ROOT / "benchmarks" / "gpu_check.sh").read_text())[1])
    assert plan["budget_s"] < cap <= 300   # the limit: 5 minutes on an H100/H200
    ids = [s["id"] for s in plan["plan"]]
    assert {"digits_torch", "aoti_digits", "aoti_b1", "latency_torch", "latency_aoti"} <= set(ids)
    assert ids.index("digits_torch") < ids.index("latency_torch")   # the verdict first
    assert plan["cut"] and any("AOTInductor fp32" in c for c in plan["cut"])   # a compile that did not fit
    assert "onnxruntime CUDA: not run: no onnxruntime-gpu on the GPU machines" in plan["not_run"]
    assert not (tmp_path / "out").exists()
    assert gc.main([str(tmp_path / "out"), "--dry-run", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"]


def test_gpu_check_times_the_naive_path_without_cuda_graphs():
    gc = _gpu_check()
    rows = gc.torch_subjects("cuda", ["fp32", "fp16"])
    assert {(form, graphs) for _, form, _, graphs in rows} == {("reference", False), ("deploy", True)}
    assert all(graphs for _, form, _, graphs in gc.digits_subjects("cuda", ["fp32", "fp16"]) if form == "deploy")


def test_gpu_check_bench_document_is_what_report_reads():
    """The latency rows become a bench/1 document whose reference is the naive path (eager fp32)."""
    from mixformer_deploy.bench import latency_stats
    from mixformer_deploy.reports.bench_json import validate
    from mixformer_deploy.reports.markdown import bench_markdown

    gc = _gpu_check()

    def row(name, form, precision, ms):
        return {"path": name, "runtime": "torch", "form": form, "precision": precision, "batch": 32, "first_ms": 9.0,
                "iterations": 3, "wall_ms": latency_stats(ms), "samples_ms": ms, "gpu_ms": latency_stats(ms),
                "roofline_fraction": 0.1}

    subjects = [gc.Timed("B1 torch reference eager fp32", "reference", "torch", "reference", "fp32", None, 1.0),
                gc.Timed("B1 torch deploy CUDA graphs fp16", "model", "torch", "deploy", "fp16", None, 1.0)]
    for s in subjects:
        s.info = {"runtime": "torch"}
    report = {"latency": [row(subjects[0].name, "reference", "fp32", [8.0, 8.2, 8.1]),
                          row(subjects[1].name, "deploy", "fp16", [2.0, 2.1, 2.0])],
              "matmul": {"fp32": {"gflops": 5e4, "n": 8192, "dtype": "float32", "device": "cuda", "repeats": 10}},
              "matrix": gc.MATRIX["cuda"], "bench_skipped": []}
    doc = gc.bench_document(report, subjects, "cpu", 2, 10 ** 9)
    assert validate(doc) == []
    fast = doc["results"][1]
    assert fast["ratio_to_reference"] == pytest.approx(2.0 / 8.1) and fast["gpu_ms"]["p50"] == 2.0
    assert "× vs ref" in bench_markdown([doc])


def test_torch_runtime_options_and_no_gpu_time_on_the_cpu():
    from mixformer_deploy import create_model
    from mixformer_deploy.backends.torch.runner import TorchRunner

    model = create_model("B0", num_classes=10, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    runner = TorchRunner(model, cuda_graphs=False)
    assert runner.describe()["cuda_graphs"] is False
    y = runner.run(x)
    assert np.array_equal(runner.run_tensor(torch.from_numpy(x)).numpy(), y)
    assert runner.take_gpu_times() == [] and runner.gpu_time_ms() is None   # bench's gpu_ms stays null
    runner.close()
    assert np.array_equal(runner.run(x), y)   # close drops converted copies, not the caller's model


@pytest.mark.slow
def test_gpu_check_cpu_rehearsal_writes_what_report_reads(tmp_path):
    """The whole script on the CPU (no AOTInductor): parity of the shipped weights, latency, bench/1."""
    from mixformer_deploy.reports import write_bench_report
    from mixformer_deploy.reports.bench_json import read_results

    gc = _gpu_check()
    assert gc.main([str(tmp_path), "--device", "cpu", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and report["complete"] and report["digits_parity"][0]["accuracy_gate"]["passed"]
    doc = read_results(tmp_path / report["bench_document"])
    assert {r["role"] for r in doc["results"]} == {"reference", "model"}
    write_bench_report([doc], tmp_path / "report.md")


@pytest.mark.gpu
@no_cuda
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("fp16", 5e-3)])
@pytest.mark.parametrize("graphs", [True, False])
def test_deploy_form_on_cuda_matches_cpu_reference(official_tiny, photo_batches, precision, tol, graphs):
    """Both ways the torch runtime runs on CUDA (graphs: the deploy form; eager: the naive path), each
    with its GPU time from CUDA events, which bench records as gpu_ms."""
    from mixformer_deploy.backends.torch.runner import TorchRunner

    x = photo_batches[(256, 192)].numpy()
    want = TorchRunner(official_tiny).run(x)
    runner = TorchRunner(official_tiny, device="cuda", precision=precision, deploy=True, cuda_graphs=graphs)
    got = runner.run(x)
    assert got.dtype == np.float32 and rel_l2(got, want) <= tol
    again = runner.run(x)
    if graphs:  # a graph replays the same kernels: the same bits
        assert np.array_equal(again, got)
    else:       # eager may pick other kernels on a second call: the same numbers to the tolerance
        assert rel_l2(again, want) <= tol
    runner.sync()
    times = runner.take_gpu_times()
    assert len(times) == 2 and all(t > 0 for t in times) and runner.take_gpu_times() == []
    assert runner.describe()["cuda_graphs"] is graphs
