"""CUDA checks of the torch runtime (deselected by default: `pytest -m gpu` on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rel_l2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch here")]


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("fp16", 5e-3)])
def test_deploy_form_on_cuda_matches_cpu_reference(official_tiny, photo_batches, precision, tol):
    from mixformer_deploy.runtimes.torch_runner import TorchRunner

    x = photo_batches[(256, 192)].numpy()
    want = TorchRunner(official_tiny).run(x)
    got = TorchRunner(official_tiny, device="cuda", precision=precision, deploy=True).run(x)
    assert got.dtype == np.float32 and rel_l2(got, want) <= tol
