"""The `--target all` table and summary.md, rendered from synthetic rows (no export runs): at 100 columns
(piped output, a CI log) every row is one label, whole and unique, and no number is cut; summary.md is the
signal a pull request needs; a row checked on a stand-in runtime is never timed; a follow-up's note says
where its command is, not "printed above"."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from mixformer_deploy.backends.exporter import FollowUp
from mixformer_deploy.errors import MissingBackendError
from mixformer_deploy.export_all import SHORT_HEADERS, ExportAllResult, Row, _bench, _read_after
from mixformer_deploy.reports.export_table import cells, notes, print_table, summary_markdown

MIB = 2 ** 20
NUMBER = re.compile(r"^(\d+\.\d+|\d+|\d\.\de[-+]\d\d|\d+\.\d+%|\d+\.\d+/\d+\.\d+%|\d+\.\d+x)$")
TRTEXEC = "trtexec --onnx=/out/m-fp32.trt.onnx --saveEngine=/out/m-fp32.engine --noTF32"


def built(target: str, precision: str, suffix: str, **more) -> Row:
    """A passed row with the widest numbers a real run makes (hundreds of MiB, seconds of latency)."""
    values = dict(artifact=f"/out/mixformer-b1-224x224-b1-{precision}{suffix}", size_bytes=int(123.45 * MIB),
                  max_abs=1.2e-3, cosine=0.999974, top1_agreement=1.0, accuracy=0.9972, accuracy_reference=0.9972,
                  p50_ms=1234.5, speedup=12.34, runtime=target)
    values.update(more)
    return Row(target, precision, "passed", values.pop("status", "passed"), **values)


def every_kind() -> ExportAllResult:
    """One row of each kind the table shows, and the rows a B1 fp32,bf16,int8 run folds away."""
    rows = [
        built("onnx", "fp32", ".onnx"),
        Row("onnx", "bf16", "not offered", "not offered", note="onnx exports fp32, fp16, int8"),
        Row("onnx", "int8", "error", "error: int8 needs calibration", exit_code=2, note="int8 needs calibration"),
        built("openvino", "fp32", ".openvino", noisy_cv=0.84),
        built("openvino", "bf16", ".openvino", runtime_options={"precision": "bf16"}, p50_ms=0.677),
        built("tensorrt", "fp32", ".trt.onnx", runtime="onnxruntime", deploy_runtime="TensorRT", p50_ms=None,
              speedup=None, status="passed; cannot build the engine here", exit_code=3, command=TRTEXEC,
              note="cannot build the engine here: TensorRT and a CUDA GPU not available"),
        Row("tensorrt", "bf16", "not offered", "not offered", note="tensorrt exports fp32, fp16, int8"),
        Row("coreml", "fp32", "exported", "exported; parity not run: Core ML prediction needs macOS",
            artifact="/out/m-fp32.mlpackage", size_bytes=2 * MIB, note="parity not run here: Core ML prediction "
            "needs macOS", command="mixformer-deploy parity /out/m-fp32.mlpackage"),
        Row("coreml", "int8", "not offered", "not offered", note="coreml exports fp32, fp16"),
        Row("executorch", "int8", "error", "error: int8 needs calibration", exit_code=2, note="int8 needs calibration"),
        Row("executorch", "fp32", "failed", "FAILED", artifact="/out/m-fp32.pte.failed", max_abs=0.51, cosine=0.2,
            top1_agreement=0.5, note="max|a-r| 0.51 > bound", command="mixformer-deploy parity /out/m-fp32.pte.failed"),
        Row("aoti", "fp16", "unavailable", "not available here", exit_code=3, note="aoti fp16 needs CUDA"),
        Row("ncnn", "fp32", "missing extra", "missing extra", note='pip install "mixformer-deploy[ncnn]"',
            command='pip install "mixformer-deploy[ncnn]" && mixformer-deploy export --target ncnn'),
        Row("pytorch", "fp32", "reference", "reference (eager)", p50_ms=23.3, speedup=1.0, noisy_cv=1.86),
    ]
    return ExportAllResult(rows, Path("/out"), ["fp32", "bf16", "int8"], command="mixformer-deploy export --target all",
                           bench={"settings": {"threads": 2, "batches": [1], "duration_s": 3.0}})


def rendered(result: ExportAllResult, width: int = 100) -> list[str]:
    buf = io.StringIO()
    print_table(result, Console(file=buf, width=width, highlight=False, color_system=None))
    return buf.getvalue().splitlines()


def table_lines(lines: list[str]) -> list[str]:
    """The table's body: from the line under the header to the legend."""
    start = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"}) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("max abs:"))
    return lines[start:end]


def test_every_row_is_one_whole_unique_label_with_whole_numbers_at_100_columns():
    result = every_kind()
    lines = rendered(result)
    header = next(line for line in lines if line.split()[:2] == ["target", "precision"])
    assert header.split() == " ".join(SHORT_HEADERS).split()
    assert "…" not in "\n".join(lines) and "..." not in "\n".join(lines)
    cut = header.index("status")  # the label: the target and precision columns
    shown = [r for r in result.rows if r.kind != "not offered"]
    starts = [line for line in table_lines(lines) if line[:1] != " "]  # a wrapped status continues indented
    assert len(starts) == len(shown)
    labels = [" ".join(line[:cut].split()) for line in starts]
    assert labels == [r.label for r in shown] and len(set(labels)) == len(labels)
    for line, row in zip(starts, shown):  # every number whole, on the row's own line
        numbers = [c for c in cells(row)[3:] if c]
        assert all(NUMBER.match(c) for c in numbers), numbers
        assert not numbers or line[cut:].split()[-len(numbers):] == numbers, line
    assert all(len(line.rstrip()) <= 100 for line in table_lines(lines))


def test_runtime_precision_and_stand_in_rows_say_so_in_the_row():
    result = every_kind()
    lines = table_lines(rendered(result))
    bf16 = next(line for line in lines if line.startswith("openvino   bf16 (runtime)"))
    assert "0.677" in bf16
    trt = lines.index(next(line for line in lines if line.startswith("tensorrt")))
    assert lines[trt].split()[2:4] == ["passed", "on"] and lines[trt + 1].strip() == "onnxruntime"
    assert not re.search(r"\d+x\b", lines[trt])  # no speed-up, no latency
    text = "\n".join(notes(result))
    assert "bf16 (runtime): no bf16 export" in "\n".join(rendered(result))
    assert "tensorrt fp32: checked here on onnxruntime, deployed on TensorRT; not timed" in text


def test_summary_md_is_signal_only():
    result = every_kind()
    md = summary_markdown(result)
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| target |")]
    assert len(table) == sum(r.kind != "not offered" for r in result.rows)
    assert not any("not offered" in line for line in table)
    assert md.count("ot offered: bf16 by onnx, tensorrt; int8 by coreml") == 1
    notes_part = md.split("Notes:")[1].split("\n\n")[1].splitlines()
    assert not any(" exports fp32" in n for n in notes_part)
    names = {Path(r.artifact).name for r in result.rows if r.artifact}
    for note in notes_part:  # a file name only inside the command that finishes the row
        assert not any(name in re.sub(r"`[^`]*`", "", note) for name in names), note
    assert "- onnx int8, executorch int8: int8 needs calibration" in md  # the same reason once
    assert "timing noisy (CV over the limit), compare with care: openvino fp32 84%, pytorch fp32 186%" in md
    trt = next(line for line in table if line.startswith("| tensorrt |"))
    assert "passed on onnxruntime" in trt and trt.endswith("|  |  |")  # blank p50 and speed-up


def test_a_follow_up_note_carries_its_own_command_not_printed_above():
    row = Row("tensorrt", "fp32", "passed", "passed", artifact="/out/m-fp32.trt.onnx")
    error = MissingBackendError("cannot build the engine here: TensorRT and a CUDA GPU not available; build it "
                                "from m-fp32.trt.onnx with the trtexec line printed above")
    _read_after(row, FollowUp(lines=[TRTEXEC], error=error), None, "fp32", None)
    assert row.kind == "passed" and row.status == "passed; cannot build the engine here" and row.exit_code == 3
    assert "printed above" not in row.note and row.note.endswith("not available") and row.command == TRTEXEC
    line = notes(ExportAllResult([row], Path("/out"), ["fp32"]))[0]
    assert line.startswith("tensorrt fp32: cannot build the engine here") and f"`{TRTEXEC}`" in line


def test_a_stand_in_runtime_is_never_timed(monkeypatch):
    """The TensorRT-ready ONNX runs here on onnxruntime: bench gets the ONNX row and the OpenVINO bf16
    runtime row (with its option), never the stand-in."""
    import mixformer_deploy.bench as bench
    from mixformer_deploy.bench import Subject

    result = every_kind()
    result.rows = [r for r in result.rows if r.kind != "reference"]
    for r in result.rows:
        r.p50_ms = r.speedup = r.noisy_cv = None
    seen = []

    def subject(path, runtime, device, threads, options=None):
        seen.append((Path(path).name, runtime, options))
        return Subject(Path(path).name, "artifact", runtime, device, 1, {}, path, options=options or {})

    def timed(subjects, batches, policy, floor, progress):
        results = [{"artifact": s.name, "role": s.role, "latency_ms": {"p50": 2.0 if s.role == "artifact" else 4.0},
                    "ratio_to_reference": 0.5 if s.role == "artifact" else 1.0, "cv": 0.01} for s in subjects]
        return {"results": results, "artifacts": [], "settings": {}}

    monkeypatch.setattr(bench, "artifact_subject", subject)
    monkeypatch.setattr(bench, "reference_subject", lambda first, weights: Subject("PyTorch eager", "reference",
                                                                                    "torch", "cpu", 1, {}, None))
    monkeypatch.setattr(bench, "benchmark_subjects", timed)
    _bench(result, 1, None, None, None, lambda text: None)
    assert [s[1] for s in seen] == ["onnx", "openvino", "openvino"] and seen[2][2] == {"precision": "bf16"}
    rows = {r.label: r for r in result.rows}
    assert rows["tensorrt fp32"].p50_ms is None and rows["tensorrt fp32"].speedup is None
    assert rows["openvino bf16 (runtime)"].p50_ms == 2.0 and rows["openvino fp32"].speedup == 2.0
    assert rows["pytorch fp32"].kind == "reference"


@pytest.mark.parametrize("width", [100, 120, 160])
def test_no_cell_is_cut_at_any_usual_width(width):
    text = "\n".join(rendered(every_kind(), width))
    assert "…" not in text and "99.72/99.72%" in text and "123.45" in text
