"""``--block compact``, on every target that offers it: the export passes its parity gate (the compact
block is the same function) and the manifest records the block form; the default stays classic.

MICRO at 224x224: the smallest input whose windows tile every stage (56 and 28), so that every block is a
compact one."""

from __future__ import annotations

import pytest

from conftest import MICRO, backends, costly, needs_export, plan_of
from mixformer_deploy.export_api import export


def offers_block(spec) -> bool:
    return any(o.name == "block" for o in spec.options)


@pytest.mark.parametrize("spec", backends(where=offers_block, slow=costly))
def test_compact_block_passes_parity_and_is_recorded(spec, tiny_weights, tmp_path):
    needs_export(spec)
    weights, base = tiny_weights(MICRO), dict(plan_of(spec).target_options)
    compact = export(weights, target=spec.key, img_size=224, output=tmp_path / "compact", check=True,
                     target_options={**base, "block": "compact"})
    assert compact.parity is not None and compact.passed, compact.manifest.get("parity")
    assert compact.manifest["block_form"] == "compact"
    assert compact.manifest["target_options"]["block"] == "compact"
    assert compact.manifest["rewrite_error_rel_l2"] <= 1e-6


def test_the_default_block_is_classic(tiny_weights, tmp_path):
    result = export(tiny_weights(MICRO), target="onnx", img_size=224, output=tmp_path, check=False)
    assert result.manifest["block_form"] == "classic"
