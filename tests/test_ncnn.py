"""ncnn backend: the ncnn form of the deploy form (rank <= 4, unit batch axis), its pnnx conversion and
runs through ncnn's Python binding, against the deploy form.

The official tiny fixture at 64x64 and 64x96 (stage maps that need padding); a conversion takes about
2 s on a 2-core machine. Measured here (x86, fp32): logits rel L2 <= 5.3e-7 and max abs 1.3e-7, feature
maps rel L2 <= 6.5e-7; fp16 weights: rel L2 4.8e-4, 1 - cosine 1.5e-7. The fp32 asserts take the
FP32 tolerance (atol 1e-4, rtol 1e-4, cosine 0.99999) and rel L2 1e-5, ~20x the measured error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rel_l2

pytest.importorskip("ncnn", reason="the ncnn extra is not installed")
pytest.importorskip("pnnx", reason="the ncnn extra is not installed")

from mixformer_deploy.backends.ncnn import convert as ncnn_convert  # noqa: E402
from mixformer_deploy.backends.ncnn.convert import convert  # noqa: E402
from mixformer_deploy.backends.ncnn.runner import NcnnNet  # noqa: E402
from mixformer_deploy.backends.ncnn.graph import NcnnBlock, to_ncnn_form, traced_max_rank  # noqa: E402
from mixformer_deploy.deploy import to_deploy  # noqa: E402
from mixformer_deploy.errors import ArtifactError, ExportError, RewriteError  # noqa: E402
from mixformer_deploy.model.backbone import MixFormerBackbone  # noqa: E402

pytestmark = pytest.mark.ncnn

SIZES = [(64, 64), (64, 96)]


def load(model, fp16: bool = False) -> NcnnNet:
    """A converted net, loaded as the runner loads it (one thread: the test models are tiny)."""
    return NcnnNet(model.param, model.bin, model.output_shapes, threads=1, fp16=fp16)


def _batch(size, n=3, seed=0) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-image cosine similarity (float64)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(min(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)))


def _assert_fp32_close(got: np.ndarray, want: np.ndarray):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert rel_l2(got, want) <= 1e-5
    assert _cosine(got, want) >= 0.99999


def _traced(model: torch.nn.Module, size) -> torch.jit.ScriptModule:
    with torch.no_grad():
        return torch.jit.trace(model, torch.zeros(1, 3, *size), check_trace=False)


# ---------------------------------------------------------------- the ncnn form (torch only)

@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("size", SIZES)
def test_ncnn_form_equals_the_deploy_form_with_rank_4_tensors(official_tiny, size):
    deploy = to_deploy(official_tiny, size)
    form = to_ncnn_form(deploy)
    x = _batch(size, n=2)
    with torch.no_grad():
        for want, got in zip(deploy.stage_tensors(x), form.stage_tensors(x)):
            assert rel_l2(got.reshape(want.shape), want) <= 1e-6
    assert traced_max_rank(_traced(deploy, size)) == 5  # what ncnn refuses, so the check can fail
    assert traced_max_rank(_traced(form, size)) <= 4


def test_ncnn_form_exports_with_rank_4_tensors(official_tiny):
    """The same bound in torch.export's graph (independent of the TorchScript tracer pnnx reads)."""
    form = to_ncnn_form(to_deploy(official_tiny, (64, 96)))
    graph = torch.export.export(form, (_batch((64, 96), n=2),)).graph
    ranks = [len(n.meta["val"].shape) for n in graph.nodes if hasattr(n.meta.get("val"), "shape")]
    assert ranks and max(ranks) <= 4


def test_ncnn_form_of_a_backbone_equals_the_deploy_form(official_tiny):
    deploy = to_deploy(MixFormerBackbone(official_tiny, (0, 2, 3)), (64, 96))
    x = _batch((64, 96), n=2)
    with torch.no_grad():
        want, got = deploy(x), to_ncnn_form(deploy)(x)
    assert len(got) == 3
    for w, g in zip(want, got):
        assert g.shape == w.shape and rel_l2(g, w) <= 1e-6


def test_ncnn_form_leaves_the_deploy_form_alone_and_keeps_its_module_names(official_tiny):
    deploy = to_deploy(official_tiny, 64)
    before = {k: v.clone() for k, v in deploy.state_dict().items()}
    form = to_ncnn_form(deploy)
    assert not any(isinstance(m, NcnnBlock) for m in deploy.modules())
    assert all(torch.equal(before[k], v) for k, v in deploy.state_dict().items())
    assert set(dict(form.named_modules())) == set(dict(deploy.named_modules()))


def test_ncnn_form_rejects_what_is_not_a_deploy_form(official_tiny):
    with pytest.raises(RewriteError):
        to_ncnn_form(official_tiny)
    with pytest.raises(RewriteError, match="nothing to rewrite"):
        to_ncnn_form(to_ncnn_form(to_deploy(official_tiny, 64)))


# ---------------------------------------------------------------- pnnx conversion and ncnn runs

@pytest.fixture(scope="module")
def tiny_ncnn(official_tiny, tmp_path_factory):
    """The tiny classifier at 64x96 converted once (fp32): (deploy form, converted net)."""
    deploy = to_deploy(official_tiny, (64, 96))
    return deploy, convert(to_ncnn_form(deploy), (64, 96), tmp_path_factory.mktemp("tiny") / "model.ncnn")


def test_ncnn_computes_the_tiny_classifier_like_the_deploy_form(tiny_ncnn):
    deploy, model = tiny_ncnn
    assert sorted(p.name for p in model.param.parent.iterdir()) == ["model.ncnn.bin", "model.ncnn.param"]
    assert model.output_shapes == ((1, 10),) and model.output_blobs == ["out0"]
    x = _batch((64, 96))
    with torch.no_grad():
        want = deploy(x).numpy()
    (got,) = load(model).run(x.numpy())
    assert got.shape == want.shape
    _assert_fp32_close(got, want)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_converted_net_runs_each_layer_once_per_image(tiny_ncnn):
    """No blob has an ncnn batch above 1: a token axis taken for the batch runs layers once per token."""
    _, model = tiny_ncnn
    net = NcnnNet(model.param, model.bin, model.output_shapes)
    net.net.opt.lightmode = False
    ex = net.net.create_extractor()
    ex.input("in0", net._ncnn.Mat(_batch((64, 96), n=1).numpy(), batch_index=0).clone())
    batched = []
    for line in model.param.read_text().splitlines()[2:]:
        kind, name, n_in, n_out, *rest = line.split()
        for blob in rest[int(n_in):int(n_in) + int(n_out)]:
            rc, mat = ex.extract(blob)
            assert rc == 0
            if mat.n > 1:
                batched.append(f"{kind} {name}: batch {mat.n}")
    assert not batched, batched[:5]


def test_ncnn_backbone_returns_the_feature_maps_in_order(official_tiny, tmp_path):
    deploy = to_deploy(MixFormerBackbone(official_tiny, (0, 2, 3)), (64, 64))
    model = convert(to_ncnn_form(deploy), (64, 64), tmp_path)
    assert model.output_blobs == ["out0", "out1", "out2"]
    x = _batch((64, 64), n=2)
    with torch.no_grad():
        want = [w.numpy() for w in deploy(x)]
    got = load(model).run(x.numpy())
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        _assert_fp32_close(g, w)


def test_ncnn_fp16_weights_and_storage(official_tiny, tiny_ncnn, tmp_path):
    """fp16 weights (pnnx fp16=1) run with ncnn's default fp16 options: measured rel L2 4.8e-4 on x86,
    where ncnn has fp16 storage but no fp16 arithmetic."""
    deploy, fp32 = tiny_ncnn
    model = convert(to_ncnn_form(deploy), (64, 96), tmp_path, fp16=True)
    assert model.bin.stat().st_size < 0.6 * fp32.bin.stat().st_size
    x = _batch((64, 96))
    with torch.no_grad():
        want = deploy(x).numpy()
    (got,) = load(model, fp16=True).run(x.numpy())
    assert rel_l2(got, want) <= 5e-3
    assert _cosine(got, want) >= 0.9999


# ---------------------------------------------------------------- refusals

def test_convert_refuses_a_rank_5_graph_before_running_pnnx(official_tiny, tmp_path):
    with pytest.raises(ExportError, match="rank-5"):
        convert(to_deploy(official_tiny, 64), (64, 64), tmp_path)
    assert not any(tmp_path.iterdir())


def test_an_op_pnnx_leaves_unlowered_fails_the_conversion(official_tiny, tmp_path, monkeypatch):
    """pnnx exits 0 and writes Tensor.reshape layers for rank-5 reshapes; the check catches them."""
    monkeypatch.setattr(ncnn_convert, "NCNN_MAX_RANK", 5)
    with pytest.raises(ExportError, match="Tensor.reshape"):
        convert(to_deploy(official_tiny, 64), (64, 64), tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_net_ncnn_cannot_load_is_an_artifact_error(tiny_ncnn, tmp_path):
    _, model = tiny_ncnn
    text = model.param.read_text()
    assert "Softmax " in text
    broken = tmp_path / "model.ncnn.param"
    broken.write_text(text.replace("Softmax ", "Softmaxx", 1))
    with pytest.raises(ArtifactError, match="Softmaxx"):
        NcnnNet(broken, model.bin, model.output_shapes)
    broken.write_text(text.replace(" out0", " outX"))
    with pytest.raises(ArtifactError, match="out0"):
        NcnnNet(broken, model.bin, model.output_shapes)
