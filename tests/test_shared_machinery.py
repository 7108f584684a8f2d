"""What every target shares: artifacts of any shape, per-target options, precision keeps, calibration,
the accuracy gate, inspect, and the layering (generic code reaches backends through the registry only). Exercised
on the ONNX target; each backend contract is in tests/conformance/."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import WEIGHTS

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

@pytest.mark.slow  # the shipped weights' fp16 export, gated on 370 inputs: 12 s
def test_onnx_fp16_of_the_shipped_weights_passes_with_the_default_keeps(shipped_fp16):
    assert shipped_fp16.passed, shipped_fp16.parity.failures
    gates = shipped_fp16.parity.accuracy
    assert gates and gates[0].set == "dataset" and gates[0].count == 360 and gates[0].allowed_extra == 1
    keeps = shipped_fp16.manifest["precision_keeps"]
    assert keeps["defaults"] and "head" in keeps["modules"]


@pytest.mark.slow  # the shipped weights' fp16 export, gated on 370 inputs: 12 s
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


@pytest.mark.slow  # the shipped weights' fp16 export, gated on 370 inputs: 12 s
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


@pytest.mark.slow  # the shipped weights' fp16 export, gated on 370 inputs: 12 s
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

def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a source file, relative ones resolved (``module`` is
    the file's own dotted name), lazy ones inside functions included."""
    import ast

    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            mod = ".".join(p for p in (base, node.module or "") if p)
            # ``from .backends import onnx`` imports the module mixformer_deploy.backends.onnx
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def test_nothing_outside_the_backends_imports_a_backend_package():
    """Generic code reaches a backend through the registry (get_spec, open_runner), never by its package:
    walked over every import statement of the package, lazy ones included, relative ones resolved."""
    import mixformer_deploy

    root = Path(mixformer_deploy.__file__).parent
    packages = sorted(p.parent.name for p in (root / "backends").glob("*/spec.py"))
    assert {"onnx", "openvino"} <= set(packages)
    named = tuple(f"mixformer_deploy.backends.{p}" for p in packages)
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if rel.parts[:2] == ("mixformer_deploy", "backends"):
            continue
        module = ".".join(rel.with_suffix("").parts)
        for line, name in _imports(path, module):
            if name in named or name.startswith(tuple(n + "." for n in named)):
                bad.append(f"{rel}:{line} imports {name}")
    assert not bad, bad


def test_the_import_walk_resolves_relative_and_lazy_imports(tmp_path):
    """The walk above, on a planted module: a relative import, a lazy one in a function, a ``from`` of the
    package that names a backend."""
    f = tmp_path / "m.py"
    f.write_text("from ..backends.onnx.spec import load_onnx\nfrom ..backends import get_spec, openvino\n"
                 "def later():\n    import mixformer_deploy.backends.litert.runner\n")
    names = [n for _, n in _imports(f, "mixformer_deploy.cli.m")]
    assert names == ["mixformer_deploy.backends.onnx.spec.load_onnx", "mixformer_deploy.backends.get_spec",
                     "mixformer_deploy.backends.openvino", "mixformer_deploy.backends.litert.runner"]


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
