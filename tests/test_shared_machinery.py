"""What every target shares: artifacts of any shape, per-target options, precision keeps, calibration,
the accuracy gate, inspect, and the layering (no import circles). Exercised on the ONNX target."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytestmark = pytest.mark.onnx

from mixformer_deploy.artifact import files_of, publish, read_manifest, size_bytes, target_of  # noqa: E402
from mixformer_deploy.cli.inspect_cmd import inspect_artifact  # noqa: E402
from mixformer_deploy.deploy import to_deploy  # noqa: E402
from mixformer_deploy.deploy.precision import resolve_keeps, with_keeps  # noqa: E402
from mixformer_deploy.errors import ArtifactError, InputFileError, UsageError  # noqa: E402
from mixformer_deploy.export_api import export  # noqa: E402
from mixformer_deploy.parity import allowed_extra, check_parity  # noqa: E402
from mixformer_deploy.shipped import DEFAULT_WEIGHTS  # noqa: E402

WEIGHTS = DATA / "tiny.pdparams"


@pytest.fixture(scope="module")
def shipped_fp16(tmp_path_factory):
    return export(DEFAULT_WEIGHTS, precision="fp16", output=tmp_path_factory.mktemp("fp16"))


# ---------------------------------------------------------------- precision keeps

def test_default_keeps_cover_layernorm_logits_pool_and_head(official_tiny):
    deploy = to_deploy(official_tiny, 224)
    keeps = resolve_keeps(deploy)
    norms = [n for n, m in deploy.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and set(norms) <= set(keeps)
    assert {"pool", "head"} <= set(keeps)
    assert all(any(k == n for k in keeps) for n, _ in deploy.named_modules() if n.endswith("attention.logits"))
    assert resolve_keeps(deploy, defaults=False) == []
    assert resolve_keeps(deploy, ("stages.0.0.mlp",), defaults=False) == ["stages.0.0.mlp"]
    with pytest.raises(UsageError, match="matches no module"):
        resolve_keeps(deploy, ("stages.9.*",))


def test_float32_islands_keep_their_modules_in_float32(official_tiny, photo_batches):
    deploy = to_deploy(official_tiny, 224)
    keeps = resolve_keeps(deploy)
    half = with_keeps(deploy, torch.bfloat16, keeps)
    assert half.head.module.weight.dtype == torch.float32
    assert half.stages[0][0].mlp.fc1.weight.dtype == torch.bfloat16
    x = photo_batches[(224, 224)][:1]
    with torch.no_grad():
        a, r = half(x.bfloat16()).float(), deploy(x)
    assert torch.nn.functional.cosine_similarity(a, r).item() > 0.99
    assert deploy.head.weight.dtype == torch.float32, "the deploy form itself was changed"


# ---------------------------------------------------------------- ONNX fp16 with the keeps, and inspect

def test_onnx_fp16_of_the_shipped_weights_passes_with_the_default_keeps(shipped_fp16):
    assert shipped_fp16.passed, shipped_fp16.parity.failures
    gates = shipped_fp16.parity.accuracy
    assert gates and gates[0].set == "dataset" and gates[0].count == 360 and gates[0].allowed_extra == 1
    keeps = shipped_fp16.manifest["precision_keeps"]
    assert keeps["defaults"] and "head" in keeps["modules"]


def test_inspect_reports_what_is_in_the_graph(shipped_fp16):
    path = shipped_fp16.path
    model = onnx.load(str(path))
    info = inspect_artifact(path)
    assert info["target"] == "onnx" and info["size_bytes"] == path.stat().st_size
    assert info["ops"] == dict(Counter(n.op_type for n in model.graph.node))
    assert info["max_rank"] <= 5
    assert info["inputs"][0]["dtype"] == "fp32" and info["outputs"][0]["dtype"] == "fp32"
    # every LayerNormalization is kept in float32; the GEMMs of the blocks run in fp16
    assert info["precisions"]["fp32"] >= info["ops"]["LayerNormalization"] and info["precisions"]["fp16"] > 0
    assert "head" in info["kept_fp32"] and any(k.endswith("attention.logits") for k in info["kept_fp32"])
    assert not any(k.endswith("mlp.fc1") for k in info["kept_fp32"])
    assert info["manifest"]["precision"] == "fp16"


def test_inspect_counts_match_the_deploy_form(shipped_fp16):
    """Known counts, from the PyTorch deploy form rather than from the ONNX file inspect reads."""
    from mixformer_deploy.source import load_source

    src = load_source(DEFAULT_WEIGHTS)
    deploy = to_deploy(src.model, (32, 32))
    norms = [n for n, m in deploy.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    info = inspect_artifact(shipped_fp16.path)
    assert info["ops"]["LayerNormalization"] == len(norms)
    assert info["ops"]["Softmax"] == sum(src.model.cfg.depths)
    assert set(norms) <= set(info["kept_fp32"])          # every LayerNorm computes in float32
    assert sum(info["precisions"].values()) + info["data_movement_ops"] == info["nodes"]


def test_inspect_of_fp32_has_no_keeps_and_counts_every_op(tmp_path):
    path = export(WEIGHTS, img_size=224, output=tmp_path, check=False).path
    info = inspect_artifact(path)
    assert set(info["precisions"]) == {"fp32"} and info["kept_fp32"] == []
    assert sum(info["ops"].values()) == info["nodes"] == len(onnx.load(str(path)).graph.node)


def test_onnx_fp16_tampered_fails_parity(shipped_fp16, tmp_path):
    model = onnx.load(str(shipped_fp16.path))
    from onnx import numpy_helper
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init).copy()
    w *= 1.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(model, str(bad))
    assert not check_parity(bad).passed


# ---------------------------------------------------------------- calibration and the accuracy gate

def test_int8_onnx_of_the_shipped_weights_passes_the_accuracy_gate(tmp_path):
    result = export(DEFAULT_WEIGHTS, precision="int8", calibration_size=64, output=tmp_path)
    cal = result.manifest["calibration"]
    assert cal["source"].startswith("digits-train") and cal["count"] == 64 and len(cal["sha256"]) == 64
    gate = result.parity.accuracy[0]
    assert gate.allowed_extra == 3 and gate.passed, result.parity.failures
    assert result.passed and result.path.suffix == ".onnx"   # the whole gate: export exits 0
    info = inspect_artifact(result.path)
    assert info["ops"].get("QuantizeLinear", 0) > 0 and info["precisions"].get("int8", 0) > 0


def test_int8_of_other_weights_needs_a_calibration_folder(tmp_path):
    with pytest.raises(UsageError, match="--calibration"):
        export(WEIGHTS, precision="int8", img_size=224, output=tmp_path, check=False)
    assert not list(tmp_path.iterdir())


def test_calibration_folder_of_any_mode_and_size(tmp_path):
    from skimage import data as skdata
    from skimage.io import imsave

    folder = tmp_path / "cal"
    (folder / "sub").mkdir(parents=True)
    imsave(folder / "a.png", skdata.camera())                     # grey, 512x512
    imsave(folder / "sub" / "b.png", skdata.chelsea()[:100, :150])  # RGB, odd size
    rgba = np.dstack([skdata.coffee()[:64, :64], np.full((64, 64), 255, np.uint8)])
    imsave(folder / "c.png", rgba)                                 # RGBA
    result = export(WEIGHTS, precision="int8", img_size=224, calibration=folder, output=tmp_path / "out",
                    check=False)
    assert result.manifest["calibration"]["count"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputFileError, match="no images"):
        export(WEIGHTS, precision="int8", img_size=224, calibration=empty, output=tmp_path / "out2", check=False)


def test_every_image_mode_reads_as_the_same_pixels(tmp_path):
    """Grey, grey + alpha, 16-bit, palette, RGBA and CMYK files of one picture give one preprocessed input."""
    from PIL import Image

    from mixformer_deploy.data import preprocess, read_image

    g = (np.arange(48 * 40).reshape(48, 40) * 7 % 256).astype(np.uint8)
    want = preprocess(np.stack([g] * 3, axis=-1), 32, 32)
    files = {"grey.png": Image.fromarray(g), "grey-alpha.png": Image.fromarray(g).convert("LA"),
             "palette.png": Image.fromarray(g).convert("P"), "rgba.png": Image.fromarray(g).convert("RGBA"),
             "cmyk.tif": Image.fromarray(g).convert("CMYK"),
             "grey16.png": Image.fromarray(g.astype(np.uint16) * 257)}
    for name, im in files.items():
        im.save(tmp_path / name)
        got = preprocess(read_image(tmp_path / name), 32, 32)
        assert got.shape == want.shape and np.abs(got - want).max() < 0.02, name


def test_accuracy_rules_are_in_images():
    assert allowed_extra("int8", 360, heldout=True)[0] == 3
    assert allowed_extra("fp16", 360, heldout=True)[0] == 1
    assert allowed_extra("bf16", 360, heldout=True)[0] == 1
    assert allowed_extra("fp32", 360, heldout=True)[0] == 0
    assert allowed_extra("int8", 1000, heldout=False)[0] == 10
    assert allowed_extra("fp16", 1000, heldout=False)[0] == 3
    assert allowed_extra("int8", 20, heldout=False)[0] == 1   # at least one image
    assert allowed_extra("int8", 360, heldout=True, override="2%")[0] == 8
    assert allowed_extra("int8", 360, heldout=True, override="0")[0] == 0
    with pytest.raises(UsageError):
        allowed_extra("int8", 10, heldout=True, override="many")


def test_accuracy_set_folder_is_matched_to_the_labels(shipped_fp16, tmp_path):
    from skimage.io import imsave

    from mixformer_deploy.data import digits_split
    _, _, xte, yte = digits_split()
    folder = tmp_path / "acc"
    for i in range(20):
        (folder / str(yte[i])).mkdir(parents=True, exist_ok=True)
        imsave(folder / str(yte[i]) / f"{i}.png", (xte[i] * 255 / 16).astype(np.uint8))
    report = check_parity(shipped_fp16.path, inputs=["photos"], accuracy_set=folder)
    gate = report.accuracy[0]
    assert gate.count == 20 and gate.allowed_extra == 1 and gate.passed
    (folder / "eleven").mkdir()
    with pytest.raises(InputFileError, match="eleven"):
        check_parity(shipped_fp16.path, inputs=["photos"], accuracy_set=folder)


# ---------------------------------------------------------------- options per target

def test_an_option_of_another_target_is_a_usage_error(tmp_path):
    from mixformer_deploy.backends import option_owners

    with pytest.raises(UsageError, match="no target takes it"):
        export(WEIGHTS, target_options={"bogus": 1}, output=tmp_path, check=False)
    foreign = {name: owners for name, (_, owners) in option_owners().items() if "onnx" not in owners}
    for name, owners in list(foreign.items())[:1]:
        with pytest.raises(UsageError, match=owners[0]):
            export(WEIGHTS, target_options={name: "1"}, output=tmp_path, check=False)
    with pytest.raises(UsageError, match="opset"):
        export(WEIGHTS, target_options={"opset": 13}, output=tmp_path, check=False)


def test_generic_export_code_knows_no_onnx_word():
    root = Path(__file__).parent.parent / "mixformer_deploy"
    for rel in ("export_api.py", "source.py", "artifact.py", "parity.py", "bench.py", "calibration.py"):
        text = (root / rel).read_text().lower()
        assert "opset" not in text and "onnxslim" not in text and "simplify" not in text, rel


# ---------------------------------------------------------------- artifacts of any shape

def test_target_comes_from_the_manifest_not_the_suffix(tmp_path):
    path = export(WEIGHTS, img_size=224, output=tmp_path, check=False).path
    side = json.loads((tmp_path / (path.name + ".json")).read_text())
    assert target_of(path).key == side["target"] == "onnx"
    assert read_manifest(path)["target"] == "onnx"
    # the same bytes with a manifest naming the TensorRT target, under a plain .onnx name and no sidecar
    from mixformer_deploy.manifest import EMBED_KEY
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == EMBED_KEY:
            prop.value = json.dumps({**json.loads(prop.value), "target": "tensorrt"})
    (tmp_path / "other").mkdir()
    onnx.save(model, str(tmp_path / "other" / "x.onnx"))
    assert target_of(tmp_path / "other" / "x.onnx").key == "tensorrt"


def test_size_counts_external_data_and_refuses_data_outside_the_folder(tmp_path):
    src = export(WEIGHTS, img_size=224, output=tmp_path / "a", check=False).path
    model = onnx.load(str(src))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(model, str(ext / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    files = files_of(ext / "m.onnx")
    assert {f.name for f in files} == {"m.onnx", "m.data"}
    assert size_bytes(ext / "m.onnx") == (ext / "m.onnx").stat().st_size + (ext / "m.data").stat().st_size
    from mixformer_deploy.bench import _size_bytes   # bench's artifact size is the same count
    assert _size_bytes(str(ext / "m.onnx")) == size_bytes(ext / "m.onnx")
    hostile = onnx.load(str(ext / "m.onnx"), load_external_data=False)
    for t in hostile.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    (ext / "hostile.onnx").write_bytes(hostile.SerializeToString())
    (tmp_path / "secret.data").write_bytes((ext / "m.data").read_bytes())
    with pytest.raises(ArtifactError, match="outside"):
        files_of(ext / "hostile.onnx")
    with pytest.raises(ArtifactError, match="outside"):
        check_parity(ext / "hostile.onnx", weights=WEIGHTS)


def test_a_directory_artifact_is_published_whole(tmp_path):
    final = tmp_path / "model.dir"
    for version in ("old", "new"):
        tmp = tmp_path / f".model.dir.{version}.partial"
        tmp.mkdir()
        (tmp / "a.txt").write_text(version)
        (tmp / "b.txt").write_text(version)
        publish(tmp, final)
        assert not tmp.exists()
        assert (final / "a.txt").read_text() == (final / "b.txt").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.dir"]


# ---------------------------------------------------------------- one layering, no circles

def test_parity_bench_and_runners_never_import_exporters(tmp_path):
    """Importing parity, bench and every runner, then opening an artifact of each format that a target
    shares with its runner (through the runner and the format's reader), loads neither export_api nor any
    exporter module. The artifacts are hand-made, empty or corrupt past their headers (no export needed),
    so each open gets as far as the backend's own reader."""
    (tmp_path / "m.mlpackage" / "Data").mkdir(parents=True)
    (tmp_path / "m.mlpackage" / "Manifest.json").write_text(
        json.dumps({"rootModelIdentifier": "r", "itemInfoEntries": {"r": {"path": "model.mlmodel"}}}))
    (tmp_path / "m.mlpackage" / "Data" / "model.mlmodel").write_bytes(b"\xff" * 64)
    (tmp_path / "m.pte").write_bytes(b"\0\0\0\0ET12" + b"\xff" * 64)
    (tmp_path / "m.tflite").write_bytes(b"\0\0\0\0TFL3" + b"\xff" * 64)
    (tmp_path / "m.openvino").mkdir()
    (tmp_path / "m.openvino" / "model.xml").write_text(
        '<net name="m" version="11"><rt_info><mixformer_deploy><manifest value="{}"/></mixformer_deploy>'
        "</rt_info></net>")
    (tmp_path / "m.openvino" / "model.bin").write_bytes(b"")
    code = f"""if True:
        import importlib, sys, pathlib, mixformer_deploy.parity, mixformer_deploy.bench
        from mixformer_deploy import runtimes
        from mixformer_deploy.errors import MixformerDeployError
        for k in runtimes.keys():
            importlib.import_module('mixformer_deploy.backends.' + runtimes.RUNTIMES[k][0])
        for key, name in [('coreml', 'm.mlpackage'), ('executorch', 'm.pte'), ('litert', 'm.tflite'),
                          ('openvino', 'm.openvino')]:
            path = pathlib.Path({str(tmp_path)!r}) / name
            for open_ in (runtimes.runner_class(key).load,
                          importlib.import_module('mixformer_deploy.formats.' + key).embedded_manifest):
                try:
                    open_(path)
                except MixformerDeployError:
                    pass  # a broken artifact, or the extra is missing: what matters is what got imported
        bad = [m for m in sys.modules if m == 'mixformer_deploy.export_api' or
               (m.startswith('mixformer_deploy.backends.') and m != 'mixformer_deploy.backends.exporter')]
        assert not bad, bad
    """
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runtimes_and_formats_have_no_import_from_targets():
    """Statically, so that a lazy import inside a function that no test reaches is caught too."""
    import ast

    import mixformer_deploy

    root = Path(mixformer_deploy.__file__).parent
    bad = []
    for path in sorted([*(root / "runtimes").glob("*.py"), *(root / "formats").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names = [base + a.name for a in node.names] if node.module is None else [base]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.startswith(("..targets", "mixformer_deploy.backends")) for n in names):
                bad.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not bad, bad


def test_an_internal_error_is_exit_70_in_one_line_whatever_the_verbosity(monkeypatch):
    from typer.testing import CliRunner

    from mixformer_deploy import export_api
    from mixformer_deploy.cli.app import _load_commands, app

    _load_commands()

    def boom(**kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(export_api, "export", boom)
    for extra in ([], ["--debug"], ["--quiet"]):
        r = CliRunner().invoke(app, ["export", *extra])
        assert r.exit_code == 70, (extra, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith("error: internal error: KeyError") and "--debug" in r.stderr
    r = CliRunner().invoke(app, ["export", "--bogus"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
    assert "--help" in r.stderr


# ---------------------------------------------------------------- the shipped examples

def test_predict_names_each_shipped_example_digit():
    """The examples are what the model card says the model expects: predict gets every one right."""
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app
    from mixformer_deploy.shipped import EXAMPLES_DIR

    _load_commands()
    images = sorted(EXAMPLES_DIR.glob("*.png"))
    assert len(images) >= 5
    r = CliRunner().invoke(app, ["predict", *map(str, images), "--top", "1", "--json"])
    assert r.exit_code == 0, r.output
    got = {Path(item["image"]).name: item["top"][0]["label"] for item in json.loads(r.stdout)}
    assert got == {p.name: p.stem.rsplit("-", 1)[1] for p in images}
