"""AOTInductor target (.pt2) and runner, on a micro model (two stages): one real compile in the default run.

A compile of even a micro model costs ~25 s of CPU on 2 cores (C++ codegen + g++), so the default run
builds one dynamic-batch package and derives every bad-input case from its bytes; the other compiles
(fixed batch, bf16, reproducibility, the full-size B1) are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rel_l2

pytestmark = pytest.mark.aoti

from mixformer_deploy import create_model  # noqa: E402
from mixformer_deploy.artifact import read_manifest, sidecar_path  # noqa: E402
from mixformer_deploy.errors import ArtifactError, ExportError, MissingBackendError, UsageError  # noqa: E402
from mixformer_deploy.backends import get_spec, open_runner  # noqa: E402
from mixformer_deploy.backends.aoti.spec import MANIFEST_FILE, can_compile  # noqa: E402
from mixformer_deploy.backends.exporter import ExportContext, ExportOptions  # noqa: E402

NO_COMPILER = can_compile()
needs_compiler = pytest.mark.skipif(NO_COMPILER is not None, reason=f"cannot compile here: {NO_COMPILER}")
MICRO = dict(num_classes=10, seed=0, embed_dim=16, depths=(1, 1), num_heads=(1, 2), head_dim=64)
SIZE = 32


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a .pt2 zip, passing each member's (short name, bytes) through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            short = info.filename.split("/", 1)[1]
            zout.writestr(info, edit(short, zin.read(info.filename)))
    return dst


def _edit_json(short_suffix: str, change):
    def edit(short, data):
        if short.endswith(short_suffix):
            d = json.loads(data)
            change(d)
            return json.dumps(d).encode()
        return data
    return edit


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from mixformer_deploy.checkpoints import save_safetensors
    return save_safetensors(create_model("custom", **MICRO), tmp_path_factory.mktemp("w") / "micro.safetensors")


@pytest.fixture(scope="module")
def package(weights, tmp_path_factory):
    """One dynamic-batch fp32 package of the micro model, exported and parity-checked end to end."""
    if NO_COMPILER:
        pytest.skip(f"cannot compile here: {NO_COMPILER}")
    from mixformer_deploy.export_api import export
    result = export(weights, target="aoti", img_size=SIZE, batch="dynamic", output=tmp_path_factory.mktemp("aoti"))
    return result


@pytest.fixture(scope="module")
def images():
    from mixformer_deploy.data import photos
    return photos(SIZE, SIZE, names=("chelsea", "astronaut", "coffee"))[0]


def test_export_writes_a_checked_pt2_with_its_manifest_inside(package, tmp_path):
    path = package.path
    assert path.name == "mixformer-custom-32x32-dyn-fp32.pt2" and path.is_file()
    assert package.passed and package.manifest["parity"]["passed"] is True
    assert package.manifest["parity"]["max_abs"] <= 1e-4
    side = json.loads(sidecar_path(path).read_text())
    assert side["compile"]["inductor_configs"]["freezing"] is True and side["compile"]["compile_s"] > 0
    embedded = get_spec("aoti").read_embedded(path)
    assert embedded["target"] == "aoti" and embedded["runtime"] == "aoti"
    assert embedded["compile"]["torch"] == torch.__version__ and embedded["versions"]["torch"] == torch.__version__
    assert embedded["compile"]["batch"] == {"dynamic": True, "min": 1, "max": 64}
    assert "compile_s" not in embedded["compile"]          # times stay out of the bytes
    with zipfile.ZipFile(path) as z:                        # a fixed archive root, never the temporary name
        assert {n.split("/")[0] for n in z.namelist()} == {"archive"}
        assert f"archive/extra/{MANIFEST_FILE}" in z.namelist()
    lone = tmp_path / path.name                             # the manifest travels inside the package
    lone.write_bytes(path.read_bytes())
    assert read_manifest(lone)["target"] == "aoti"
    assert not list(path.parent.glob("*.partial*")) and not list(path.parent.glob("*.compile.log"))


def test_runs_at_fp32_parity_with_a_dynamic_batch(package, weights, images):
    from mixformer_deploy.checkpoints import load_model
    runner = open_runner(package.path, threads=1)
    assert runner.key == "aoti" and runner.describe()["device"] == "cpu"
    with torch.no_grad():
        ref = load_model(weights)(torch.from_numpy(images)).numpy()
    together = runner.run(images)
    assert together.shape == (3, 10) and together.dtype == np.float32
    assert rel_l2(together, ref) <= 1e-5
    alone = np.concatenate([runner.run(images[i:i + 1]) for i in range(3)])
    assert np.abs(together - alone).max() <= 1e-5
    big = np.repeat(images[:1], 17, axis=0)                 # any batch up to --max-batch
    assert np.abs(runner.run(big) - together[:1]).max() <= 1e-5
    with pytest.raises(UsageError, match="batches of 1 to 64"):
        runner.run(np.zeros((65, 3, SIZE, SIZE), np.float32))
    with pytest.raises(UsageError, match="32x32"):
        runner.run(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(UsageError, match="takes no option|cuda_graphs"):
        open_runner(package.path, options={"cuda_graphs": "on"})
    runner.close()


def test_inspect_reads_the_package_without_loading_it(package):
    info = get_spec("aoti").inspect(package.path)
    assert info["device"] == "cpu" and info["machine"]
    assert info["inputs"][0]["shape"] == ["batch", 3, SIZE, SIZE]
    assert info["outputs"][0]["shape"] == ["batch", 10]
    assert info["ops"].get("addmm", 0) > 0 and info["ops"]["generated fused kernels"] > 0
    assert info["embedded_metadata"]["mixformer_deploy.precision"] == "fp32"
    assert info["compile"]["inductor_configs"]["freezing"] is True


def test_other_torch_version_is_exit_4_naming_both(package, tmp_path):
    def older(m):
        m["versions"]["torch"] = "2.11.0+cu128"
    bad = _rewrite(package.path, tmp_path / "old.pt2", _edit_json(MANIFEST_FILE, older))
    with pytest.raises(ArtifactError, match=r"2\.11\.0\+cu128.*" + torch.__version__.replace("+", r"\+")) as e:
        open_runner(bad)
    assert e.value.exit_code == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: a CUDA package would be runnable")
def test_package_for_a_device_not_here_is_exit_3(package, tmp_path):
    def cuda(m):
        m["AOTI_DEVICE_KEY"], m["AOTI_COMPUTE_CAPABILITY"] = "cuda", "90"
    bad = _rewrite(package.path, tmp_path / "cuda.pt2", _edit_json("wrapper_metadata.json", cuda))
    with pytest.raises(MissingBackendError, match="CUDA") as e:
        open_runner(bad)
    assert e.value.exit_code == 3

    def arm(m):
        m["AOTI_MACHINE"] = "aarch64"
    bad = _rewrite(package.path, tmp_path / "arm.pt2", _edit_json("wrapper_metadata.json", arm))
    with pytest.raises(MissingBackendError, match="aarch64"):
        open_runner(bad)


def test_not_a_package_is_exit_4(tmp_path):
    for name, content in (("text.pt2", b"not a zip"), ("empty.pt2", b"")):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ArtifactError):
            open_runner(p, runtime="aoti")
    z = tmp_path / "other.pt2"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("archive/data/x.txt", "x")
    with pytest.raises(ArtifactError, match="not an AOTInductor package"):
        open_runner(z, runtime="aoti")


def test_options_that_cannot_work_here_fail_before_reading_weights(tmp_path, monkeypatch):
    from mixformer_deploy.export_api import export
    missing = tmp_path / "missing.safetensors"          # never read: the checks come first
    with pytest.raises(MissingBackendError, match="fp16 needs --device cuda"):
        export(missing, target="aoti", precision="fp16")
    with pytest.raises(UsageError, match="max-batch"):
        export(missing, target="aoti", batch="dynamic", target_options={"max_batch": 1})
    with pytest.raises(UsageError):
        export(missing, target="aoti", target_options={"device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(MissingBackendError, match="no CUDA GPU"):
            export(missing, target="aoti", target_options={"device": "cuda"})
    import mixformer_deploy.backends.aoti.spec as aoti
    monkeypatch.setattr(aoti, "cpu_has_bf16", lambda: False)
    with pytest.raises(MissingBackendError, match="bf16"):
        export(missing, target="aoti", precision="bf16")
    from torch._inductor import config
    with config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}), \
            pytest.raises(MissingBackendError, match="no-such-g\\+\\+") as e:
        export(missing, target="aoti")
    assert e.value.exit_code == 3


@needs_compiler
def test_compile_failure_is_exit_5_with_the_first_error_and_the_log_kept(tmp_path, monkeypatch):
    """A real compile through a compiler that fails: the first error line, and the full log beside it."""
    fake = tmp_path / "bin" / "g++"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "g++ (fake) 12.2.0"; exit 0; fi\n'
                    'echo "kernel.cpp:7:3: error: simulated failure for the test" >&2\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    from torch._inductor import config
    final = tmp_path / "mixformer-custom-32x32-b1-fp32.pt2"
    out = tmp_path / ".mixformer-custom-32x32-b1-fp32.pt2.123.partial.pt2"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    spec = get_spec("aoti")
    options = ExportOptions(8, 8, 1, "fp32", target=spec.parse_options({"device": "cpu", "max_batch": 64}))
    with config.patch({"cpp.cxx": (None, str(fake))}), \
            pytest.raises(ExportError, match="simulated failure for the test") as e:
        spec.exporter().export(model, ExportContext(final=final, tmp=out, options=options,
                                                    manifest={"variant": "custom", "versions": {}}))
    assert e.value.exit_code == 5
    log = tmp_path / "mixformer-custom-32x32-b1-fp32.pt2.compile.log"
    assert log.is_file() and str(log) in str(e.value) and "simulated failure" in log.read_text()
    assert not out.exists()


# ---------------------------------------------------------------- slow: more compiles

@pytest.mark.slow
@needs_compiler
def test_fixed_batch_bf16_and_reproducible_bytes(weights, images, tmp_path, monkeypatch):
    from mixformer_deploy.export_api import export
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    a = export(weights, target="aoti", img_size=SIZE, batch=3, output=tmp_path / "a", check=True)
    b = export(weights, target="aoti", img_size=SIZE, batch=3, output=tmp_path / "b", check=False)
    assert a.passed and a.path.name == "mixformer-custom-32x32-b3-fp32.pt2"
    assert hashlib.sha256(a.path.read_bytes()).digest() == hashlib.sha256(b.path.read_bytes()).digest()
    with pytest.raises(UsageError, match="batch 3"):
        open_runner(a.path).run(images[:1])
    if get_spec("aoti").tolerance("bf16") and __import__("mixformer_deploy.backends.aoti.spec", fromlist=["x"]).cpu_has_bf16():
        c = export(weights, target="aoti", img_size=SIZE, batch=1, precision="bf16", output=tmp_path / "c")
        assert c.passed and c.manifest["precision_keeps"]["modules"]
        assert get_spec("aoti").inspect(c.path)["kept_fp32"]


@pytest.mark.slow
@needs_compiler
def test_cli_export_parity_inspect_end_to_end(weights, tmp_path):
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, "-m", "mixformer_deploy"]
    r = subprocess.run([*cmd, "export", "--target", "aoti", "--weights", str(weights), "--img-size", "32",
                        "--output", str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.name == "mixformer-custom-32x32-b1-fp32.pt2"
    r = subprocess.run([*cmd, "parity", str(path), "--weights", str(weights)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cmd, "inspect", str(path), "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_package_with_cuda_graphs(weights, images, tmp_path):
    from mixformer_deploy.export_api import export
    r = export(weights, target="aoti", img_size=SIZE, batch=3, output=tmp_path, target_options={"device": "cuda"})
    assert r.passed
    runner = open_runner(r.path, device="cuda")
    assert runner.describe()["cuda_graphs"] is True
    first = runner.run(images)
    assert np.abs(runner.run(images) - first).max() == 0
    assert runner.gpu_time_ms() > 0
    plain = open_runner(r.path, device="cuda", options={"cuda_graphs": "off"})
    assert np.abs(plain.run(images) - first).max() <= 1e-5
    r16 = export(weights, target="aoti", img_size=SIZE, batch=3, precision="fp16", output=tmp_path,
                 target_options={"device": "cuda"})
    assert r16.passed
