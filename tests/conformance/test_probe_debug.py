"""``debug`` on every target whose runtime runs here: a planted fault (a block's ``qkv`` weights scaled by 1.5
in the reference, not in the artifact) is named at its block and at the attention branch, by both names;
the probe computes what the artifact computes. Core ML cannot predict here (its probe is not run).

The session's fp32 artifact of each backend is debugged against its planted reference weights."""

from __future__ import annotations

import pytest
import torch

from conftest import backends, costly
from mixformer_deploy.checkpoints import load_checkpoint, save_safetensors


def runs_here(spec) -> bool:
    return bool(spec.runner_class().status().get("can_run"))


def planted_block(model) -> tuple[int, int]:
    """stages.2.1 where the config has it (TINY), else the last block (MICRO)."""
    depths = model.cfg.depths
    if len(depths) > 2 and depths[2] > 1:
        return 2, 1
    return len(depths) - 1, depths[-1] - 1


def plant_qkv(weights, out) -> tuple[str, str]:
    """The weights with one block's qkv weight scaled by 1.5 -> (its deploy name, its reference name)."""
    model = load_checkpoint(weights).model
    s, b = planted_block(model)
    with torch.no_grad():
        model.layers[s].blocks[b].attn.qkv.weight.mul_(1.5)
    save_safetensors(model, out)
    return f"stages.{s}.{b}", f"layers.{s}.blocks.{b}"


@pytest.mark.parametrize("spec", backends(where=lambda s: s.key != "coreml", slow=costly))
def test_debug_names_a_planted_qkv_fault(spec, exported, weights_of, tmp_path):
    from mixformer_deploy.debug import debug_artifact

    if not runs_here(spec):
        pytest.skip(f"{spec.runtime} cannot run here")
    artifact, own = exported(spec).path, weights_of(spec)
    block, reference = plant_qkv(own, tmp_path / "planted.safetensors")
    report = debug_artifact(artifact, weights=tmp_path / "planted.safetensors", artifact_weights=own)
    assert report.first_block == block, [(p.name, p.rel_l2, p.budget) for p in report.blocks]
    assert report.first_branch == f"{block}.attention.logits", [(p.name, p.rel_l2) for p in report.branches]
    assert next(p for p in report.blocks if p.name == block).reference == reference
    before = [p for p in report.blocks[:report.blocks.index(next(p for p in report.blocks if p.name == block))]]
    assert before and all(p.rel_l2 < 1e-5 for p in before)       # float noise until the planted block
    assert report.probe_vs_artifact <= 1e-5                        # extra outputs change nothing computed
    assert report.exports == 2
    assert report.verdict().startswith(f"first divergence: {block} ({reference}) attention: rel L2 ")
