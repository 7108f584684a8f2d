"""Small numeric helpers shared by parity, the rewrite's self-check, benchmarks and tests."""

from __future__ import annotations

import numpy as np


def rel_l2(a, r) -> float:
    """||a - r|| / ||r|| in float64 (torch tensors or numpy arrays); 0/0 is 0."""
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, np.float64)
    r = np.asarray(r.detach().cpu() if hasattr(r, "detach") else r, np.float64)
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), np.finfo(np.float64).tiny))
