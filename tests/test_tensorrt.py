"""TensorRT target: the TensorRT-ready ONNX (fp32 / fp16 AutoCast / int8 ModelOpt PTQ) written, linted and
checked on onnxruntime here; the trtexec line; trt-lint on our ONNX and on planted faults. Building and
running an engine needs TensorRT and an NVIDIA GPU: those tests skip with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("modelopt.onnx.quantization", reason="the tensorrt extra (nvidia-modelopt) is not installed")
pytestmark = pytest.mark.tensorrt

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mixformer_deploy.errors import MissingBackendError  # noqa: E402
from mixformer_deploy.backends import get_spec  # noqa: E402
from mixformer_deploy.backends.exporter import Calibration, ExportContext, ExportOptions  # noqa: E402
from mixformer_deploy.backends.tensorrt.lint import lint  # noqa: E402

SIZE = 32
TINY = dict(num_classes=10, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), seed=3)


def _has_tensorrt_and_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (tensorrt-runtime extra; NVIDIA GPU machines only)"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    return None


NO_ENGINE = _has_tensorrt_and_gpu()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from mixformer_deploy import create_model
    from mixformer_deploy.deploy import to_deploy
    from mixformer_deploy.deploy.precision import resolve_keeps

    model = create_model("custom", **TINY).eval()
    deploy = to_deploy(model, (SIZE, SIZE))
    x = np.random.RandomState(0).randn(8, 3, SIZE, SIZE).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return {"model": model, "deploy": deploy, "keeps": resolve_keeps(deploy), "x": x, "ref": ref,
            "dir": tmp_path_factory.mktemp("trt")}


def _options(tiny, precision, batch=1, **target_options):
    calib = Calibration(tiny["x"], {"source": "seeded random", "count": len(tiny["x"])}) if precision == "int8" else None
    return ExportOptions(SIZE, SIZE, batch, precision, keeps=tiny["keeps"] if precision != "fp32" else [],
                         calibration=calib, target=get_spec("trt").parse_options(target_options))


def _export(tiny, options, final, tmp, manifest):
    ctx = ExportContext(final=final, tmp=tmp, options=options, manifest=manifest)
    return get_spec("tensorrt").exporter().export(tiny["deploy"], ctx)


@pytest.fixture(scope="module")
def exported(tiny):
    """The three precisions written by the exporter, under the temporary name export() uses."""
    out = {}
    for precision in ("fp32", "fp16", "int8"):
        final = tiny["dir"] / f"mixformer-custom-{SIZE}x{SIZE}-b1-{precision}.trt.onnx"
        tmp = final.with_name(f".{final.name}.4242.partial.onnx")
        manifest = {"target": "tensorrt", "precision": precision, "versions": {"mixformer-deploy": "test"}}
        _export(tiny, _options(tiny, precision), final, tmp, manifest)
        tmp.rename(final)
        out[precision] = (final, manifest)
    return out


def _run(path, x):
    import onnxruntime as ort
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


from mixformer_deploy.numerics import rel_l2 as _rel  # noqa: E402


def test_target_row_and_names():
    t = get_spec("trt")
    assert t.key == "tensorrt" and t.suffix == ".trt.onnx" and t.runtime == "onnxruntime"
    assert t.runtime_for(Path("m.engine")) == "tensorrt" and t.runtime_for(Path("m.trt.onnx")) == "onnxruntime"
    assert set(t.precisions) == {"fp32", "fp16", "int8"} and t.calibrated == ("int8",)


def test_fp32_is_the_deploy_form(exported, tiny):
    path, manifest = exported["fp32"]
    a = _run(path, tiny["x"])
    assert _rel(a, tiny["ref"]) < 1e-5
    assert manifest["trt_lint"]["clean"] and "--noTF32" in manifest["trtexec"]["command"]


def test_fp16_is_mixed_precision_with_float32_edges_and_keeps(exported, tiny):
    path, manifest = exported["fp16"]
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    inits = {t.name: t.data_type for t in model.graph.initializer}
    gemm_weights = [inits.get(n.input[1]) for n in model.graph.node if n.op_type == "Gemm" and "/head/" not in n.name]
    assert gemm_weights and all(t == TensorProto.FLOAT16 for t in gemm_weights)  # the bulk runs in fp16
    head = next(n for n in model.graph.node if n.op_type == "Gemm" and "/head/" in n.name)
    assert inits[head.input[1]] == TensorProto.FLOAT                              # a keep stays fp32
    ln = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert ln and all(inits.get(n.input[1]) == TensorProto.FLOAT for n in ln)
    assert "AutoCast" in manifest["precision_tool"]["tool"] and manifest["precision_tool"]["kept_fp32_nodes"] > 0
    assert _rel(_run(path, tiny["x"]), tiny["ref"]) < 1e-2


def test_int8_has_tensorrt_style_qdq_and_stays_close(exported, tiny):
    path, manifest = exported["int8"]
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "LayerNormalization":   # the keeps read float, never a DQ
            src = producer.get(n.input[0])
            assert src is None or src.op_type != "DequantizeLinear", n.name
    tool = manifest["precision_tool"]
    assert tool["calibration_method"] == "max" and tool["calibration_count"] == len(tiny["x"])
    assert lint(model, "11").clean and lint(model, "10").clean
    assert _rel(_run(path, tiny["x"]), tiny["ref"]) < 0.15


def test_int8_leaves_onnxruntime_quantization_unpatched(exported):
    """ModelOpt patches onnxruntime's quantizer process-wide; an ONNX int8 export after a TensorRT one (as in
    ``--target all``) needs it back as onnxruntime shipped it."""
    from onnxruntime.quantization import calibrate, registry
    assert exported["int8"]
    assert calibrate.MinMaxCalibrater.collect_data.__module__ == "onnxruntime.quantization.calibrate"
    assert calibrate.create_calibrator.__module__ == "onnxruntime.quantization.calibrate"
    assert "LayerNormalization" not in registry.QDQRegistry or \
        registry.QDQRegistry["LayerNormalization"].__module__.startswith("onnxruntime")


@pytest.mark.slow
def test_same_options_give_the_same_bytes(exported, tiny, tmp_path):
    path, _ = exported["fp16"]
    again = tmp_path / f".{path.name}.4242.partial.onnx"
    _export(tiny, _options(tiny, "fp16"), path, again,
            {"target": "tensorrt", "precision": "fp16", "versions": {"mixformer-deploy": "test"}})
    assert again.read_bytes() == path.read_bytes()


def test_trtexec_line_follows_the_version_and_the_profile(tiny):
    from mixformer_deploy.backends.tensorrt.export import trtexec_command

    opts = _options(tiny, "fp16", batch=None, workspace=2048, timing_cache="cache.bin", max_batch=64)
    line11 = trtexec_command(Path("m.trt.onnx"), opts, "11")
    assert line11.startswith("trtexec --onnx=m.trt.onnx --saveEngine=m.engine")
    assert "--stronglyTyped" not in line11 and "--fp16" not in line11
    assert f"--minShapes=input:1x3x{SIZE}x{SIZE}" in line11 and f"--maxShapes=input:64x3x{SIZE}x{SIZE}" in line11
    assert "--memPoolSize=workspace:2048M" in line11 and "--timingCacheFile=cache.bin" in line11
    line10 = trtexec_command(Path("m.trt.onnx"), _options(tiny, "int8"), "10")
    assert "--stronglyTyped" in line10 and "--int8" not in line10 and "Shapes" not in line10


def test_profile_options_need_a_dynamic_batch(tiny):
    from mixformer_deploy.errors import UsageError

    with pytest.raises(UsageError, match="dynamic"):
        get_spec("tensorrt").check(_options(tiny, "fp32", batch=1, max_batch=8))
    with pytest.raises(UsageError, match="min <= opt <= max"):
        get_spec("tensorrt").check(_options(tiny, "fp32", batch=None, min_batch=8, max_batch=4))


@pytest.mark.skipif(NO_ENGINE is None, reason="TensorRT and a GPU are here: the engine is built instead")
def test_follow_up_prints_the_line_and_says_what_is_missing(exported, tiny):
    exporter = get_spec("tensorrt").exporter()
    path, _ = exported["fp16"]
    after = exporter.follow_up(path, _options(tiny, "fp16"))
    assert after.lines and after.lines[0].startswith("trtexec --onnx=") and str(path) in after.lines[0]
    assert isinstance(after.error, MissingBackendError) and after.path is None
    assert "\n" not in str(after.error) and "TensorRT" in str(after.error)
    only = exporter.follow_up(path, _options(tiny, "fp16", onnx_only=True))
    assert only.lines == after.lines and only.error is None


def test_engine_runner_without_tensorrt_is_exit_3(exported, tmp_path):
    if NO_ENGINE is None:
        pytest.skip("TensorRT and a GPU are here")
    from mixformer_deploy.backends.tensorrt.runner import TensorRtRunner

    fake = tmp_path / "m.engine"
    fake.write_bytes(b"not an engine")
    with pytest.raises(MissingBackendError):
        TensorRtRunner.load(fake, device="cuda")


def test_engine_for_another_gpu_or_version_is_refused():
    from types import SimpleNamespace

    from mixformer_deploy.errors import ArtifactError
    from mixformer_deploy.backends.tensorrt.runner import check_engine_fits

    h100 = SimpleNamespace(name="NVIDIA H100", major=9, minor=0)
    info = {"version": "11.4.0", "gpu": "NVIDIA A100", "compute_capability": "8.0", "builder": {}}
    with pytest.raises(MissingBackendError, match="A100"):
        check_engine_fits(info, "11.4.0", h100)
    with pytest.raises(ArtifactError, match="10.15"):
        check_engine_fits({**info, "version": "10.15.1", "compute_capability": "9.0"}, "11.4.0", h100)
    check_engine_fits({**info, "builder": {"hardware_compatibility": "ampere_plus"}}, "11.4.0", h100)


@pytest.mark.skipif(NO_ENGINE is not None, reason=str(NO_ENGINE))
def test_engine_builds_and_matches_the_onnx(exported, tiny):  # pragma: no cover - GPU machines only
    from mixformer_deploy.backends.tensorrt.runner import TensorRtRunner
    from mixformer_deploy.backends.tensorrt.export import build_engine

    path, _ = exported["fp32"]
    (path.parent / (path.name + ".json")).write_text(json.dumps(
        {"schema": "mixformer-deploy/manifest/1", "target": "tensorrt", "precision": "fp32"}))
    engine = build_engine(path, _options(tiny, "fp32"))
    runner = TensorRtRunner.load(engine, device="cuda")
    assert _rel(runner.run(tiny["x"][:1]), tiny["ref"][:1]) < 1e-3
    assert runner.describe()["gpu_compute_ms_median"] is not None
    times = runner.take_gpu_times()
    assert len(times) == 1 and times[0] > 0 and runner.take_gpu_times() == []


def test_engine_runner_hands_bench_its_gpu_times():
    """bench reads take_gpu_times() after each round (describe() only once, at load, before any run)."""
    from mixformer_deploy.backends.tensorrt.runner import TensorRtRunner
    from mixformer_deploy.backends.torch.runner import CudaEventTimes

    runner = object.__new__(TensorRtRunner)   # no engine here: only the bookkeeping bench relies on
    runner._gpu = CudaEventTimes()
    runner._gpu.ms += [0.5, 0.25]
    assert runner.take_gpu_times() == [0.5, 0.25] and runner.take_gpu_times() == []


# ---------------------------------------------------------------- trt-lint

def _planted(base, fault: str):
    m = onnx.ModelProto()
    m.CopyFrom(base)
    g = m.graph
    first = g.node[0]
    if fault == "unsupported":      # an op TensorRT's parser does not support, on the network input
        g.node.insert(1, helper.make_node("Det", [first.output[0]], ["det_out"], name="planted_det"))
    elif fault == "attribute":      # Resize in cubic mode
        g.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "planted_scales"))
        g.node.insert(1, helper.make_node("Resize", [first.output[0], "", "planted_scales"], ["rs_out"],
                                          name="planted_resize", mode="cubic"))
    elif fault == "custom":         # a custom-domain op: would need a plugin
        g.node.insert(1, helper.make_node("MyFancyOp", [first.output[0]], ["fancy_out"], name="planted_custom",
                                          domain="com.example"))
        m.opset_import.append(helper.make_opsetid("com.example", 1))
    elif fault == "qdq-layernorm":  # a Q/DQ pair in front of a LayerNorm
        ln = next(n for n in g.node if n.op_type == "LayerNormalization")
        src = ln.input[0]
        g.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "planted_scale"),
                              numpy_helper.from_array(np.array(0, np.int8), "planted_zp")])
        q = helper.make_node("QuantizeLinear", [src, "planted_scale", "planted_zp"], ["planted_q"], name="planted_q")
        dq = helper.make_node("DequantizeLinear", ["planted_q", "planted_scale", "planted_zp"], ["planted_dq"],
                              name="planted_dq")
        ln.input[0] = "planted_dq"
        idx = list(g.node).index(ln)
        g.node.insert(idx, dq)
        g.node.insert(idx, q)
    return m


def test_lint_is_clean_on_our_onnx(exported):
    for precision, (path, _) in exported.items():
        for version in ("10", "11"):
            report = lint(path, version)
            assert report.clean, (precision, version, [f.line() for f in report.findings])


@pytest.mark.parametrize("fault, rule, node, op", [
    ("unsupported", "unsupported-op", "planted_det", "Det"),
    ("attribute", "bad-attribute", "planted_resize", "Resize"),
    ("custom", "custom-domain", "planted_custom", "MyFancyOp"),
    ("qdq-layernorm", "qdq-normalization-input", None, "LayerNormalization"),
])
def test_lint_catches_planted_faults(exported, fault, rule, node, op):
    base = onnx.load(str(exported["fp32"][0]))
    report = lint(_planted(base, fault), "11")
    hits = [f for f in report.findings if f.rule == rule and f.op == op]
    assert hits, [f.line() for f in report.findings]
    if node:
        assert hits[0].node == node
    assert hits[0].node in hits[0].line() and op in hits[0].line()


def test_lint_knows_the_version_differences(exported):
    base = onnx.load(str(exported["fp32"][0]))
    m = onnx.ModelProto()
    m.CopyFrom(base)
    m.graph.node.insert(1, helper.make_node("Swish", [m.graph.node[0].output[0]], ["sw"], name="planted_swish"))
    assert any(f.op == "Swish" for f in lint(m, "10").findings)
    assert not any(f.op == "Swish" for f in lint(m, "11").findings)


def test_support_data_names_its_source():
    from mixformer_deploy.backends.tensorrt.lint import support_data

    data = support_data()
    assert "onnx-tensorrt" in data["source"]["operators"] and "10.15" in data["source"]["operators"]
    assert data["versions"]["11"]["opset_max"] >= data["versions"]["10"]["opset_max"]
    assert data["operators"]["LayerNormalization"]["supported"] and not data["operators"]["Det"]["supported"]


def test_trt_lint_cli_exit_codes(exported, tmp_path):
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app
    _load_commands()
    ok = CliRunner().invoke(app, ["trt-lint", str(exported["int8"][0])])
    assert ok.exit_code == 0 and "clean" in ok.stdout
    bad = tmp_path / "planted.onnx"
    onnx.save(_planted(onnx.load(str(exported["fp32"][0])), "custom"), str(bad))
    res = CliRunner().invoke(app, ["trt-lint", str(bad), "--trt-version", "10", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout)["findings"][0]["node"] == "planted_custom"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"nope")
    res = CliRunner().invoke(app, ["trt-lint", str(junk)])
    assert res.exit_code == 4 and res.stderr.strip().startswith("error:")


# ---------------------------------------------------------------- the export command, end to end

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from mixformer_deploy import create_model
    from mixformer_deploy.checkpoints import save_safetensors

    return save_safetensors(create_model("custom", **TINY), tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.mark.skipif(NO_ENGINE is None, reason="TensorRT and a GPU are here: the export builds the engine")
def test_export_cli_exit_3_and_onnx_only_exit_0(tiny_weights, tmp_path):
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app
    _load_commands()
    out = tmp_path / "out"
    args = ["export", "--target", "trt", "--weights", str(tiny_weights), "--img-size", str(SIZE),
            "--precision", "int8", "--calibration", str(_calibration_folder(tmp_path)), "--output", str(out),
            "--no-check"]
    path = out / f"mixformer-custom-{SIZE}x{SIZE}-b1-int8.trt.onnx"
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == str(path) and path.is_file() and lines[-2].startswith("trtexec --onnx=")
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in res.stderr
    assert json.loads((out / (path.name + ".json")).read_text())["trtexec"]["command"].startswith("trtexec")
    res = CliRunner().invoke(app, args + ["--onnx-only"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(path)


def _calibration_folder(tmp_path):
    from skimage import data as skdata
    from skimage import io

    folder = tmp_path / "calib"
    folder.mkdir()
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        io.imsave(folder / f"{name}.png", getattr(skdata, name)(), check_contrast=False)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(NO_ENGINE is None, reason="TensorRT and a GPU are here: the export builds the engine")
def test_export_cli_writes_the_onnx_prints_trtexec_and_exits_3(tiny_weights, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mixformer_deploy", "export", "--target", "trt", "--weights", str(tiny_weights),
            "--img-size", str(SIZE), "--precision", "fp16", "--output", str(out), "--variant", "auto"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    path = out / f"mixformer-custom-{SIZE}x{SIZE}-b1-fp16.trt.onnx"
    assert res.returncode == 3, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == str(path) and path.is_file()
    assert any(line.startswith("trtexec --onnx=") for line in lines)
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "TensorRT" in err[-1] and "Traceback" not in res.stderr
    side = json.loads((out / (path.name + ".json")).read_text())
    assert side["target"] == "tensorrt" and side["parity"]["passed"] and side["trtexec"]["command"]
    res = subprocess.run(args + ["--onnx-only"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(path)


@pytest.mark.slow
@pytest.mark.skipif(NO_ENGINE is None, reason="TensorRT and a GPU are here: the export builds the engine")
def test_int8_of_the_shipped_weights_passes_the_accuracy_gate_through_the_cli(tmp_path):
    """The command users run: int8 with the default calibration (the digits' training split), checked."""
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app
    _load_commands()
    res = CliRunner().invoke(app, ["export", "--target", "trt", "--precision", "int8", "--output", str(tmp_path)])
    assert res.exit_code == 3, res.stderr   # verified ONNX written; no TensorRT here to build the engine
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.name == "mixformer-b0-32x32-b1-int8.trt.onnx" and path.is_file()
    parity = json.loads((tmp_path / (path.name + ".json")).read_text())["parity"]
    assert parity["passed"]
    gate = next(g for g in parity["accuracy_gate"] if g["set"] == "dataset")
    assert gate["count"] == 360 and gate["passed"] and gate["artifact_errors"] <= gate["reference_errors"] + 3


@pytest.mark.skipif(get_spec("tensorrt").runner_class("tensorrt").status().get("can_run", False),
                    reason="TensorRT runs here: a whole engine would be run, not refused")
def test_an_engine_is_checked_against_its_manifest_without_tensorrt(tmp_path):
    """No TensorRT here, yet a truncated or altered engine is a bad artifact (exit 4, one line): its sidecar
    records its size and SHA-256. An intact one is exit 3 (the runtime is missing), not 4."""
    import hashlib

    from typer.testing import CliRunner

    from mixformer_deploy.artifact import SCHEMA, sidecar_path, write_json
    from mixformer_deploy.cli.app import _load_commands, app

    _load_commands()
    engine, data = tmp_path / "m.engine", bytes(range(256)) * 8
    manifest = {"schema": SCHEMA, "target": "tensorrt", "size_bytes": len(data),
                "tensorrt": {"engine_sha256": hashlib.sha256(data).hexdigest()}}
    write_json(sidecar_path(engine), manifest)
    for content, code in ((data[:1000], 4), (data[:-1] + b"x", 4), (data, 3)):
        engine.write_bytes(content)
        r = CliRunner().invoke(app, ["parity", str(engine)])
        assert r.exit_code == code and len(r.stderr.strip().splitlines()) == 1, (code, r.stderr)
