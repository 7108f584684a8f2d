"""ExecuTorch target (XNNPACK delegate) and runner, and the XNNPACK form of the deploy form it lowers.

The default run exports a two-stage tiny model once, at a small size whose stage maps need padding
(lowering costs per block: ~8 s on an idle 2-core machine, against ~20 s for the five blocks of the
official fixture); int8 on the shipped weights and the 224x224 fixture check are `slow`.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import DATA, rel_l2

from mixformer_deploy.deploy import to_deploy  # noqa: E402
from mixformer_deploy.deploy.precision import resolve_keeps  # noqa: E402
from mixformer_deploy.backends.xnnpack import XnnLayerNorm, to_xnnpack  # noqa: E402
from mixformer_deploy.errors import ArtifactError, RewriteError, UsageError  # noqa: E402
from mixformer_deploy.model import create_model  # noqa: E402
from mixformer_deploy.artifact import read_manifest  # noqa: E402
from mixformer_deploy.export_api import export  # noqa: E402
from mixformer_deploy.backends import open_runner  # noqa: E402
from mixformer_deploy.backends import get_spec  # noqa: E402

pytestmark = pytest.mark.executorch

WEIGHTS = DATA / "tiny.pdparams"
SIZE = "64x64"
# The exported program's model: two stages, one block each (what the conformance suite lowers too).
MICRO = dict(num_classes=10, embed_dim=16, depths=(1, 1), num_heads=(1, 2), head_dim=64)
MICRO_SIZE = 32


# ---------------------------------------------------------------- the XNNPACK form (no ExecuTorch needed)

@pytest.mark.parametrize("size", [(224, 224), (256, 192), (64, 96)])
def test_xnnpack_form_equals_the_deploy_form(official_tiny, size):
    deploy = to_deploy(official_tiny, size)
    xnn = to_xnnpack(deploy)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = deploy.stage_tensors(x), xnn.stage_tensors(x)
    for w, g in zip(want, got):
        assert rel_l2(g, w) <= 1e-6
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in xnn.modules())
    assert sum(isinstance(m, XnnLayerNorm) for m in xnn.modules()) > 0


def test_xnnpack_form_one_head_and_seeded_variant():
    model = create_model("custom", 5, seed=1, embed_dim=16, depths=(1, 2), num_heads=(1, 2)).eval()
    deploy = to_deploy(model, 96)
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_l2(to_xnnpack(deploy)(x), deploy(x)) <= 1e-6


def test_xnnpack_form_keeps_the_deploy_module_names(official_tiny):
    deploy = to_deploy(official_tiny, 64)
    names = dict(to_xnnpack(deploy).named_modules())
    for keep in resolve_keeps(deploy):
        assert keep in names, keep
    assert "stages.0.0.attention.qkv.q" in names


def test_xnnpack_form_leaves_the_deploy_form_alone(official_tiny):
    deploy = to_deploy(official_tiny, 64)
    before = {k: v.clone() for k, v in deploy.state_dict().items()}
    to_xnnpack(deploy)
    assert any(isinstance(m, torch.nn.LayerNorm) for m in deploy.modules())
    assert all(torch.equal(before[k], v) for k, v in deploy.state_dict().items())


def test_xnnpack_form_rejects_what_is_not_a_deploy_form(official_tiny):
    with pytest.raises(RewriteError):
        to_xnnpack(official_tiny)


# ---------------------------------------------------------------- ExecuTorch

def _needs_executorch():
    pytest.importorskip("executorch.exir", reason="the executorch extra is not installed")


@pytest.fixture(autouse=True)
def _skip_without_executorch(request):
    if "xnnpack_form" not in request.node.name:
        _needs_executorch()


@pytest.fixture(scope="module")
def micro(tiny_weights):
    return tiny_weights(MICRO)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, micro):
    _needs_executorch()
    out = tmp_path_factory.mktemp("et")
    result = export(micro, target="executorch", img_size=MICRO_SIZE, output=out)
    assert result.passed, result.parity.failures
    return result


def test_matches_pytorch_and_splits_larger_batches(fp32, micro):
    from mixformer_deploy.checkpoints import load_checkpoint
    from mixformer_deploy.data import photos

    x = photos(MICRO_SIZE, MICRO_SIZE, names=("chelsea", "astronaut", "coffee"))[0]
    with torch.no_grad():
        want = load_checkpoint(micro).model(torch.from_numpy(x)).numpy()
    runner = open_runner(fp32.path, threads=1)
    got = runner.run(x)  # a b1 program, three images
    assert got.dtype == np.float32 and got.shape == want.shape
    assert rel_l2(got, want) <= 1e-5
    assert runner.describe()["delegate"] == "XnnpackBackend"


def test_every_compute_op_is_delegated_to_xnnpack(fp32):
    d = fp32.manifest["delegation"]
    assert d["non_delegated"] == {} and d["compute_off_delegate"] == {}
    assert d["delegated"]["linear"] > 0 and d["delegated"]["convolution"] > 0 and d["delegated"]["bmm"] > 0
    assert not {"native_layer_norm", "addmm", "expand_copy", "split_with_sizes_copy"} & set(d["delegated"])
    info = get_spec("executorch").inspect(fp32.path)
    assert info["instructions"] == {"delegate:XnnpackBackend": 1}
    assert info["inputs"] == [{"shape": [1, 3, MICRO_SIZE, MICRO_SIZE], "dtype": "fp32"}]
    assert info["outputs"] == [{"shape": [1, 10], "dtype": "fp32"}]


def test_inspect_cli_prints_delegated_and_non_delegated_ops(fp32):
    """The human printer once crashed (exit 70) on the grouped op counts a .pte reports."""
    from typer.testing import CliRunner

    from mixformer_deploy.cli.app import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, ["inspect", str(fp32.path)])
    assert r.exit_code == 0, r.output
    d = fp32.manifest["delegation"]
    assert f"delegated ops: {d['delegated_ops']}" in r.stdout and "non-delegated ops: 0 (none)" in r.stdout
    assert "delegate:XnnpackBackend 1" in r.stdout and "compute ops off the delegate: none" in r.stdout
    assert "linear" in r.stdout


def test_manifest_is_embedded_and_survives_without_sidecar(fp32, tmp_path):
    copy = tmp_path / "renamed.pte"
    shutil.copyfile(fp32.path, copy)
    manifest = read_manifest(copy)
    assert manifest["input_size"] == [MICRO_SIZE, MICRO_SIZE] and manifest["target"] == "executorch"
    assert manifest["graph_form"] == "xnnpack" and manifest["delegation"]["subgraphs"] == 1
    assert open_runner(copy).run(np.zeros((1, 3, MICRO_SIZE, MICRO_SIZE), np.float32)).shape == (1, 10)


def test_wrong_input_shape_is_an_artifact_error(fp32):
    with pytest.raises(ArtifactError, match="takes batches"):
        open_runner(fp32.path).run(np.zeros((1, 3, 64, 64), np.float32))


def test_dynamic_batch_and_unknown_options_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="fixed batch"):
        export(WEIGHTS, target="executorch", img_size=SIZE, batch="dynamic", output=tmp_path, check=False)
    with pytest.raises(UsageError):
        export(WEIGHTS, target="executorch", precision="fp16", output=tmp_path, check=False)
    with pytest.raises(UsageError):
        export(WEIGHTS, target="executorch", img_size=SIZE, output=tmp_path, check=False,
               target_options={"graph_form": "nchw"})
    assert not list(tmp_path.glob("*.pte"))


# ---------------------------------------------------------------- slow: full sizes, int8 of the shipped weights

@pytest.mark.slow
def test_official_fixture_at_224_within_1e4(tmp_path):
    ref = np.load(DATA / "tiny.npz")
    result = export(WEIGHTS, target="executorch", img_size=224, output=tmp_path, check=False)
    assert rel_l2(open_runner(result.path).run(ref["input"]), ref["logits"]) <= 1e-4
    assert result.manifest["delegation"]["non_delegated"] == {}


@pytest.mark.slow
def test_the_deploy_form_as_is_leaves_ops_on_portable_kernels(tmp_path):
    """The measurement the XNNPACK form answers: the deploy form's 1x1-conv GEMMs, LayerNorms, expands and
    splits stay off XNNPACK."""
    result = export(WEIGHTS, target="executorch", img_size=SIZE, output=tmp_path, check=False,
                    target_options={"graph_form": "deploy"})
    off = result.manifest["delegation"]["compute_off_delegate"]
    assert "native_layer_norm" in off and "addmm" in off
