"""A reduced float precision (fp16, bf16) records the default keeps of the deploy form (every LayerNorm, the
attention logits, pool and head), and ``inspect`` of the artifact agrees: what it reports as kept in float32
are modules the keeps name, and where the artifact computes in reduced precision every keep is honoured (every
LayerNorm of the deploy form among them); where only the weights are stored reduced, it reports float32
arithmetic."""

from __future__ import annotations

import pytest
import torch

from conftest import backends, costly, export_here, plan_of

from mixformer_deploy.errors import MissingBackendError

REDUCED = ("fp16", "bf16")
NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}   # inspect's spellings


def _reduced_here(spec) -> tuple[str | None, str]:
    """The first reduced float precision the backend makes here, or None and why not."""
    from mixformer_deploy.backends.exporter import ExportOptions

    why = ""
    for precision in (p for p in spec.precisions if p in REDUCED):
        options = ExportOptions(32, 32, 1, precision, target=spec.parse_options(plan_of(spec).target_options))
        try:
            spec.check(options)
            return precision, ""
        except MissingBackendError as e:   # e.g. fp16 needs a GPU, bf16 a CPU that has it
            why = str(e)
    return None, why


@pytest.mark.parametrize("spec", backends("inspect", slow=costly,
                                          where=lambda s: any(p in REDUCED for p in s.precisions)))
def test_default_keeps_are_honoured_and_inspect_agrees_with_the_deploy_form(spec, tiny_weights, tmp_path):
    from mixformer_deploy.deploy import to_deploy
    from mixformer_deploy.deploy.precision import resolve_keeps
    from mixformer_deploy.source import load_source

    precision, why = _reduced_here(spec)
    if precision is None:
        pytest.skip(f"{spec.key} makes no reduced precision on this machine: {why}")
    plan = plan_of(spec)
    result = export_here(spec, tiny_weights, tmp_path, precision=precision)
    deploy = to_deploy(load_source(tiny_weights(plan.config)).model, (plan.size, plan.size))
    keeps = resolve_keeps(deploy)
    assert result.manifest["precision"] == precision
    recorded = result.manifest["precision_keeps"]
    assert {k: recorded.get(k) for k in ("defaults", "patterns", "modules")} == \
        {"defaults": True, "patterns": [], "modules": keeps}

    info = spec.inspect(result.path)
    kept = info["kept_fp32"]
    assert kept is not None, f"{spec.key} inspect cannot tell what is kept in float32"
    assert set(kept) <= set(keeps), f"reported as kept but not a keep: {sorted(set(kept) - set(keeps))}"
    assert info["precisions"], f"{spec.key} inspect cannot tell what precision the artifact computes in"
    computes = {NAMES.get(p, p) for p, n in info["precisions"].items() if n}
    if recorded.get("applied") is False:   # the backend says it stores reduced and computes in float32
        assert computes == {"fp32"}, f"keeps recorded as not applied, yet it computes in {info['precisions']}"
    elif computes & set(REDUCED):  # reduced arithmetic: the keeps are islands of float32 in it
        norms = {n for n, m in deploy.named_modules() if isinstance(m, torch.nn.LayerNorm)}
        assert norms and norms <= set(keeps)
        assert norms <= set(kept), f"LayerNorms not kept in float32: {sorted(norms - set(kept))}"
        assert set(kept) == set(keeps), f"keeps not honoured: {sorted(set(keeps) - set(kept))}"
    else:                          # reduced storage only (weights), float32 arithmetic: nothing to keep
        assert computes == {"fp32"}, info["precisions"]
