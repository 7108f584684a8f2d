"""A backbone artifact (``head="none"``) gives the stages' feature maps in the order its manifest lists them,
each the reference backbone's map of that stage. Non-square input, so that every map has its own shape and
a reordering cannot pass. The costly backends' backbone belongs to the slow run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import backends, costly, export_here, plan_of, rel_l2


def _shape(desc) -> list | None:
    shape = desc.get("shape") if isinstance(desc, dict) else None
    return [int(d) for d in shape] if shape and all(isinstance(d, int) for d in shape) else None


@pytest.mark.parametrize("spec", backends("backbone", slow=costly))
def test_backbone_outputs_come_in_manifest_order(spec, tiny_weights, tmp_path):
    from mixformer_deploy.backends import open_runner, runner_class
    from mixformer_deploy.backends.runner import as_outputs
    from mixformer_deploy.model.backbone import MixFormerBackbone
    from mixformer_deploy.source import load_source

    plan = plan_of(spec)
    h, w = plan.size, plan.size + 32
    weights = tiny_weights(plan.config)
    result = export_here(spec, tiny_weights, tmp_path, head="none", img_size=f"{h}x{w}")
    assert "-backbone" in result.path.name
    model = load_source(weights).model
    stages = len(model.cfg.depths)
    outputs = result.manifest["outputs"]
    assert [o["name"] for o in outputs] == [f"features_{i}" for i in range(stages)]
    x = np.random.default_rng(1).standard_normal((1, 3, h, w)).astype(np.float32)
    with torch.no_grad():
        ref = [r.numpy() for r in MixFormerBackbone(model)(torch.from_numpy(x))]
    assert [o["shape"] for o in outputs] == [list(r.shape) for r in ref]
    assert len({tuple(r.shape) for r in ref}) == len(ref), "two outputs of one shape: order would go unseen"

    listed = [_shape(d) for d in (spec.inspect(result.path).get("outputs") or [])]
    if listed and all(listed):   # what the artifact itself declares, where inspect reads shapes
        assert listed == [o["shape"] for o in outputs]

    runtime = spec.runtime_for(result.path)
    status = runner_class(runtime).status()
    if not status.get("can_run"):
        pytest.skip(f"{spec.key}: the outputs are checked up to the manifest and inspect; {runtime} cannot run "
                    f"here: {status.get('note')}")
    got = as_outputs(open_runner(result.path, threads=1).run(x))
    assert len(got) == len(ref)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert a.shape == r.shape, (outputs[i]["name"], a.shape, r.shape)
        assert rel_l2(a, r) <= 1e-4, (outputs[i]["name"], rel_l2(a, r))
