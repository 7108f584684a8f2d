"""The deploy form computes the reference function: each rewrite pass on its own, and all together."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import rel_l2
from mixformer_deploy.deploy import PASSES, restructure, to_deploy
from mixformer_deploy.errors import RewriteError, UsageError

SIZES = [(224, 224), (256, 192)]
TOL = 1e-6


def _out(model, x):
    with torch.no_grad():
        return model.forward_stages(x)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 3])
def test_restructure_alone_is_equivalent(official_tiny, photo_batches, size, batch):
    x = photo_batches[size][:batch]
    ref = _out(official_tiny, x)
    dep = _out(restructure(official_tiny, *size), x)
    for key in ("logits", "features"):
        assert rel_l2(dep[key], ref[key]) <= TOL, key
    for key in ("stem", "stage0", "stage1", "stage2", "stage3"):
        assert dep[key].shape == ref[key].shape
        assert rel_l2(dep[key], ref[key]) <= 5 * TOL, key


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("rewrite", PASSES, ids=lambda p: p.__name__)
def test_each_pass_is_equivalent(official_tiny, photo_batches, size, batch, rewrite):
    x = photo_batches[size][:batch]
    before = restructure(official_tiny, *size)
    after = copy.deepcopy(before)
    assert rewrite(after) > 0
    with torch.no_grad():
        assert rel_l2(after(x), before(x)) <= TOL
        assert rel_l2(after(x), official_tiny(x)) <= TOL


@pytest.mark.parametrize("size", SIZES)
def test_to_deploy_matches_reference_and_leaves_it_untouched(official_tiny, photo_batches, size):
    x = photo_batches[size]
    state = {k: v.clone() for k, v in official_tiny.state_dict().items()}
    deploy = to_deploy(official_tiny, size)
    with torch.no_grad():
        assert rel_l2(deploy(x), official_tiny(x)) <= TOL
    assert all(torch.equal(state[k], v) for k, v in official_tiny.state_dict().items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules()), "a BatchNorm was not folded"


def test_batch_items_are_independent(official_tiny, photo_batches):
    x = photo_batches[(256, 192)]
    deploy = to_deploy(official_tiny, (256, 192))
    with torch.no_grad():
        together = deploy(x)
        alone = torch.cat([deploy(x[i:i + 1]) for i in range(len(x))])
    assert (together - alone).abs().max() <= 1e-5


def test_a_pass_with_nothing_to_rewrite_raises(official_tiny):
    deploy = to_deploy(official_tiny, 224)
    for rewrite in PASSES:
        with pytest.raises(RewriteError, match=rewrite.__name__):
            rewrite(deploy)


def test_input_side_must_be_a_multiple_of_32(official_tiny):
    with pytest.raises(UsageError, match="multiple of 32"):
        to_deploy(official_tiny, (224, 200))


LEGAL_SIZES = [(s, s) for s in range(32, 513, 32)] + [(32, 512), (512, 32), (96, 160), (224, 288), (480, 64),
                                                    (64, 480), (160, 352), (288, 96)]


@pytest.mark.parametrize("size", LEGAL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_legal_size_matches_the_reference(size):
    from mixformer_deploy.model import create_model

    model = create_model("custom", num_classes=10, seed=3, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_l2(to_deploy(model, size)(x), model(x)) <= TOL


def test_a_rewrite_that_changes_the_function_stops_the_export(tmp_path, monkeypatch):
    from mixformer_deploy import export_api
    from mixformer_deploy.errors import RewriteError

    monkeypatch.setattr(export_api, "rewrite_error", lambda *a: 3e-4)
    with pytest.raises(RewriteError) as e:
        export_api.export(Path(__file__).parent / "data" / "tiny.pdparams", img_size=64, output=tmp_path, check=False)
    assert e.value.exit_code == 5 and "0.0003" in str(e.value)
    assert not list(tmp_path.iterdir())


def test_compact_block_is_the_same_function_with_fewer_ops(official_tiny, photo_batches):
    """224: every stage's windows tile its map, so every block is compact; 256x192: none do (classic)."""
    import io
    import onnx
    from mixformer_deploy.deploy.compact import WindowStage

    x = photo_batches[(224, 224)]
    compact, classic = to_deploy(official_tiny, 224, "compact"), to_deploy(official_tiny, 224)
    assert compact.block_form == "compact" and all(isinstance(s, WindowStage) for s in compact.stages)
    with torch.no_grad():
        assert rel_l2(compact(x), official_tiny(x)) <= TOL
        stages, ref = compact.forward_stages(x), official_tiny.forward_stages(x)
    assert all(rel_l2(stages[k], ref[k]) <= 5 * TOL for k in ("stage0", "stage3"))
    nodes = {}
    for name, model in (("compact", compact), ("classic", classic)):
        buf = io.BytesIO()
        torch.onnx.export(model, (x[:1],), buf, dynamo=False, opset_version=20)
        nodes[name] = len(onnx.load_from_string(buf.getvalue()).graph.node)
    assert nodes["compact"] < nodes["classic"], nodes
    assert to_deploy(official_tiny, (256, 192), "compact").block_form == "classic"
    with pytest.raises(UsageError, match="block form"):
        to_deploy(official_tiny, 224, "fast")
