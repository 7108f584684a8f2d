"""What `bench` shows: the table at 100 columns (CI logs), the noise warning's numbers, the plots' ticks and
labels. No benchmark runs here: the result documents are made up, with the fields `bench` fills."""

from __future__ import annotations

import re

import pytest

from mixformer_deploy.bench import Policy, Subject, _row, latency_stats, percent_pair
from mixformer_deploy.cli.bench_cmd import COLUMNS, _cells, print_results, row_label

MIB = 2 ** 20
PREFIX = "mixformer-b1-224x224-dyn-int8-calibrated-on-512-imagenet-val-images-keep-layernorm"


def made_up_doc(names: list[str], p50s: list[float], batches=(1, 8), reference: bool = True) -> dict:
    """A bench/1 document of these artifacts (onnx int8) at these batches, p50 as given (x batch), and the
    PyTorch reference when ``reference``: only the fields the table and its legend read."""
    subjects = [(n, "artifact", "onnxruntime", "onnx", "int8") for n in names]
    if reference:
        subjects.append(("torch eager reference (B1)", "reference", "torch", None, "fp32"))
    artifacts = [{"name": n, "role": role, "size_bytes": 12 * MIB, "load_ms": 321.0, "peak_rss_bytes": 2500 * MIB,
                  "rss_before_load_bytes": 90 * MIB, "manifest": {"target": target}}
                 for n, role, _, target, _ in subjects]
    results = []
    for b in batches:
        ref_p50 = p50s[-1] * b * 3.0
        for (n, role, runtime, _, precision), p50 in zip(subjects, [*p50s, p50s[-1] * 3.0]):
            lat = latency_stats([p50 * b * f for f in (0.9, 1.0, 1.0, 1.2, 1.5)])
            results.append({"artifact": n, "role": role, "runtime": runtime, "precision": precision, "form": None,
                            "batch": b, "latency_ms": lat, "cv": lat["std"] / lat["mean"],
                            "throughput_ips": b * 1000 / lat["mean"], "first_inference_ms": 45.6,
                            "ratio_to_first": lat["p50"] / (p50s[0] * b),
                            "ratio_to_reference": lat["p50"] / ref_p50 if reference else None,
                            "floor_fraction": 0.123, "peak_rss_bytes": 2500 * MIB})
    return {"machine": {"slug": "intel-xeon-2c-2t"}, "floor": {"matmul": {"gflops": 151.3}},
            "artifacts": artifacts, "results": results}


def rendered(doc: dict, capsys, monkeypatch) -> list[str]:
    """print_results as CI sees it: stdout piped (100 columns), COLUMNS=100."""
    monkeypatch.setenv("COLUMNS", "100")
    print_results(doc)
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("p50s", [[0.847, 0.835], [1234.5, 0.000123]], ids=["tiny", "extreme"])
def test_table_at_100_columns_has_unique_uncut_labels_and_numbers(p50s, capsys, monkeypatch):
    """Two artifacts whose file names share 80 characters: at 100 columns every row has its own label,
    no cell is cut (no ellipsis), every shown number is whole in its row, and the legend names each file."""
    names = [f"{PREFIX}-a.onnx", f"{PREFIX}-b.onnx"]
    doc = made_up_doc(names, p50s)
    lines = rendered(doc, capsys, monkeypatch)
    text = "\n".join(lines)
    assert "…" not in text and "..." not in text, text
    header = next(i for i, line in enumerate(lines) if line.startswith("artifact "))
    shown = lines[header].split()[1:]
    table = lines[header + 2:header + 2 + len(doc["results"])]
    assert all(len(line) <= 100 for line in lines[:header + 2 + len(table)]), text
    assert {"p50", "speed-up"} <= set(shown) and set(shown) <= {h for c in COLUMNS for h in c.split()}, shown

    numbers = {a["name"]: i + 1 for i, a in enumerate(doc["artifacts"])}
    targets = {a["name"]: a["manifest"]["target"] for a in doc["artifacts"]}
    labels = [row_label(r, numbers[r["artifact"]], targets[r["artifact"]]) for r in doc["results"]]
    assert len(set(labels)) == len(labels) == len(table)
    for line, label, r in zip(table, labels, doc["results"]):
        assert line.startswith(label + " "), (line, label)
        cells = _cells(r, 12 * MIB)
        for column in ("p50", "speed-up", "CV"):
            assert re.search(rf"(^|\s){re.escape(cells[column])}(\s|$)", line[len(label):]), (column, line)
    for i, name in enumerate(names):
        assert any(line.startswith(f"#{i + 1} {name}: ") for line in lines), text


def test_row_labels_say_target_precision_batch_and_a_foreign_runtime():
    r = {"runtime": "onnxruntime", "precision": "int8", "batch": 8, "role": "artifact"}
    assert row_label(r, 2, "onnx") == "#2 onnx int8 b8"
    assert row_label(r, 1, "tensorrt") == "#1 tensorrt on onnxruntime int8 b8"
    assert row_label({**r, "runtime": "torch", "precision": "fp32", "role": "reference"}, 3, None) == \
        "#3 torch ref fp32 b8"


@pytest.mark.parametrize("cv, text", [(0.104, "10.4%"), (0.1004, "10.04%"), (0.35, "35%"), (3.52, "352%"),
                                      (0.1051, "11%")])
def test_noise_warning_never_reads_as_the_limit(cv, text):
    assert percent_pair(cv, 0.10) == (text, "10%")


def test_noisy_row_warns_with_a_value_above_the_limit(caplog):
    """Two samples whose CV is 10.4%: the warning reads "CV 10.4% > 10%", not "CV 10% > 10%"."""
    subject = Subject("m.onnx", "artifact", "onnxruntime", "cpu", 1, {"input_size": [64, 64]})
    row = _row(subject, 0, {"describe": {}}, 1, 1_000_000, [926_461, 1_073_539], {}, Policy())
    assert row["cv"] == pytest.approx(0.104, abs=1e-4)
    assert "noisy, CV 10.4% > 10%" in row["warnings"][0]


# ---------------------------------------------------------------- plots

@pytest.fixture
def plots():
    pytest.importorskip("matplotlib")
    from mixformer_deploy.reports import plots
    yield plots
    plots._pyplot().close("all")


def _outside(fig) -> list[str]:
    """What sticks out of the figure: the tight bounding box of everything drawn (tick labels, titles,
    axis labels, the bars' value labels), in inches, against the figure's own box."""
    fig.canvas.draw()
    tight, box = fig.get_tightbbox(fig.canvas.get_renderer()), fig.bbox_inches
    sides = {"left": box.x0 - tight.x0, "right": tight.x1 - box.x1, "bottom": box.y0 - tight.y0,
             "top": tight.y1 - box.y1}
    return [f"{side} by {d:.2f} in" for side, d in sides.items() if d > 0.01]


@pytest.mark.parametrize("speed_up", [2.95, 1234.5])
def test_speedup_labels_stay_inside_the_figure(plots, speed_up):
    doc = made_up_doc([f"{PREFIX}-a.onnx", f"{PREFIX}-b.onnx"], [1.0, 1.0 / speed_up], batches=(1,),
                      reference=False)
    fig = plots.speedup_figure(plots.labelled_rows([doc]))
    plots._layout(fig)
    assert f"{speed_up:.2f}x" in [t.get_text() for t in fig.axes[0].texts]
    assert _outside(fig) == []


def test_log_scale_ticks_read_as_plain_numbers(plots):
    """Latencies from 2 to 60 ms: a log axis whose labelled ticks read 2, 3, ..., 10, 20, ... (never
    3x10^0 or 10^1)."""
    doc = made_up_doc(["a.onnx", "b.onnx"], [2.0, 30.0], batches=(1,), reference=False)
    rows = plots.labelled_rows([doc])
    for label, _, r in rows:
        r["samples_ms"] = [r["latency_ms"]["p50"] * f for f in (0.9, 1.0, 1.1, 1.3)]
    fig = plots.distribution_figure(rows)
    plots._layout(fig)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    shown = [t.get_text() for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
             if t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    assert "10" in shown and len(shown) >= 3, shown
    assert all(re.fullmatch(r"\d+(\.\d+)?", s) for s in shown), shown
    assert _outside(fig) == []


def test_a_busy_machine_is_recorded_and_warned_about(monkeypatch, caplog):
    """One busy process beside a 2-thread run on 2 CPUs: the load goes into the JSON and a warning says the
    latencies include contention; on an idle machine, no warning."""
    import logging

    from mixformer_deploy import bench

    monkeypatch.setattr(bench, "available_cores", lambda: 2)
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (1.1, 0.5, 0.2))
    with caplog.at_level(logging.WARNING, logger="mixformer_deploy.bench"):
        busy = bench.machine_load(threads=2)
    assert busy == {"load_1m": 1.1, "usable_cpus": 2, "free_cpus": 0.9}
    assert any("busy" in r.getMessage() and "load 1.10" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (0.05, 0.1, 0.1))
    with caplog.at_level(logging.WARNING, logger="mixformer_deploy.bench"):
        assert bench.machine_load(threads=2)["free_cpus"] == 1.95
    assert not caplog.records
