"""The deploy form: the same function as the reference MixFormer, in a shape exporters handle cleanly
(static sizes, rank <= 5, folded norms, constant relative-position bias, no data-dependent shapes)."""

from __future__ import annotations

import logging

from ..errors import UsageError
from ..model import MixFormer, check_input_size
from .compact import BLOCK_FORMS, to_compact
from .model import DeployMixFormer, to_reference_layout
from .passes import PASSES, restructure

log = logging.getLogger(__name__)

__all__ = ["BLOCK_FORMS", "DeployMixFormer", "PASSES", "restructure", "to_deploy", "to_reference_layout"]


def to_deploy(model: MixFormer, input_size, block: str = "classic") -> DeployMixFormer:
    """A new deploy-form module for a static input size (int or (H, W)) with the classic block or the
    compact one (deploy/compact.py); the reference is untouched."""
    if block not in BLOCK_FORMS:
        raise UsageError(f"bad block form {block!r}: {' or '.join(BLOCK_FORMS)}")
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    check_input_size(model.cfg, h, w)
    deploy = restructure(model, h, w)
    for rewrite in PASSES:
        n = rewrite(deploy)
        log.debug("%s: %d rewrites", rewrite.__name__, n)
    return to_compact(deploy) if block == "compact" else deploy.eval()
