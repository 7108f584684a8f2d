"""mixformer-deploy: trained MixFormer weights to verified, benchmarked edge artifacts.

Public API: create_model, load_model, to_deploy, export, check_parity, benchmark.
Heavy and optional dependencies are imported lazily, inside the functions that need them.
"""

__version__ = "0.1.0"



def __getattr__(name: str):
    """create_model and load_model on first use: importing the package (and a backend's light spec)
    does not import torch."""
    if name == "create_model":
        from .model import create_model
        return create_model
    if name == "load_model":
        from .checkpoints import load_model
        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_deploy(model, input_size, block: str = "classic"):
    """The export-friendly deploy form of ``model`` at a static input size, with the "classic" or the
    "compact" block (see mixformer_deploy.deploy)."""
    from .deploy import to_deploy as _to_deploy
    return _to_deploy(model, input_size, block)


def export(*args, **kwargs):
    """Export weights to an artifact of a target (see mixformer_deploy.export_api.export)."""
    from .export_api import export as _export
    return _export(*args, **kwargs)


def check_parity(*args, **kwargs):
    """Compare an artifact with the PyTorch reference (see mixformer_deploy.parity.check_parity)."""
    from .parity import check_parity as _check
    return _check(*args, **kwargs)


def benchmark(*args, **kwargs):
    """Time artifacts through their runners (see mixformer_deploy.bench.benchmark)."""
    from .bench import benchmark as _bench
    return _bench(*args, **kwargs)


__all__ = ["__version__", "create_model", "load_model", "to_deploy", "export", "check_parity", "benchmark"]
