"""The Runner interface: load an artifact, run numpy batches, say where and in what precision it runs.

Parity and benchmarks are written once against this; each backend's runners live in its package
(``backends/<key>/runner.py``).
Runtime settings that are one runtime's own (OpenVINO's inference precision, Core ML's compute units, ...)
arrive as ``options`` (``--runtime-option KEY=VALUE`` on parity, bench and predict): each runner
declares the keys it takes in ``option_help``, and anything else is a usage error naming them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..optional import version_of
from ..errors import UsageError


class Runner(ABC):
    key: str = ""          # the runtime's key: its module name and CLI choice
    dists: tuple[str, ...] = ()      # pip distributions that provide it (first installed wins)
    extra: str = ""                  # the extra that installs it
    option_help: dict[str, str] = {}  # runtime option key -> what it does (values are strings)
    option_choices: dict[str, tuple[str, ...]] = {}  # keys whose values are one of a few words
    devices: tuple[str, ...] = ("cpu",)   # device kinds it can run on (``cuda`` also takes cuda:N)
    device: str = "cpu"    # where it runs, e.g. "cpu", "cuda:0"
    precision: str = "fp32"
    threads: int | None = None

    @classmethod
    @abstractmethod
    def load(cls, artifact: str | Path, device: str = "cpu", threads: int | None = None,
             options: dict[str, str] | None = None) -> "Runner":
        """Open an artifact for inference (raise ArtifactError for a bad file, MissingBackendError when
        the runtime or device is not available, UsageError for an option it does not take)."""

    @classmethod
    def check_device(cls, device: str) -> str:
        """``device`` if this runtime can run there ("auto" always passes: the runner picks), else a usage
        error naming where it runs. Checked once here, before any runner opens an artifact."""
        if device == "auto" or device.lower().split(":")[0] in cls.devices:
            return device
        raise UsageError(f"{cls.key} runs on {', '.join(('auto',) + cls.devices)} here, not {device!r}")

    @classmethod
    def check_options(cls, options: dict[str, str] | None) -> dict[str, str]:
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.option_help))
        if unknown:
            takes = ", ".join(cls.option_help) or "none"
            raise UsageError(f"the {cls.key} runtime takes no option {', '.join(unknown)} (it takes: {takes})")
        for key, value in options.items():
            choices = cls.option_choices.get(key)
            if choices and value not in choices:
                raise UsageError(f"bad {cls.key} runtime option {key}={value!r}: choose one of {', '.join(choices)}")
        return options

    @classmethod
    def status(cls, probe: bool = False) -> dict:
        """Installed?, version, can it run here, on which devices, a note. Runners with hardware needs
        override (``probe`` may import the runtime to ask it)."""
        for dist in cls.dists:
            v = version_of(dist)
            if v:
                return {"installed": True, "package": dist, "version": v, "can_run": True, "devices": ["cpu"],
                        "note": ""}
        return {"installed": False, "package": cls.dists[0] if cls.dists else cls.key, "version": None,
                "can_run": False, "devices": [], "note": f'not installed: pip install "mixformer-deploy[{cls.extra}]"'}

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """NCHW float32 normalized images -> the artifact's outputs as numpy float32: the logits, or a
        backbone's feature maps as a tuple in the manifest's output order."""

    def run_fixed(self, batch: np.ndarray, shape: tuple, run_one) -> np.ndarray:
        """Run a program compiled for one input ``shape`` on a batch that is a multiple of its batch size:
        slices of that size through ``run_one`` (numpy in, numpy out), concatenated, float32."""
        from ..errors import ArtifactError, one_line

        x = np.ascontiguousarray(batch, dtype=np.float32)
        b = shape[0]
        if x.shape[1:] != tuple(shape[1:]) or x.shape[0] % b:
            raise ArtifactError(f"{Path(self.path).name}: takes batches of {tuple(shape)}, not {x.shape}")
        try:
            outs = [as_outputs(run_one(x[i:i + b])) for i in range(0, x.shape[0], b)]
        except Exception as e:
            raise ArtifactError(f"{Path(self.path).name}: inference failed on input {x.shape} ({one_line(e, 200)})") from e
        joined = tuple(np.concatenate(parts).astype(np.float32, copy=False) for parts in zip(*outs))
        return packed(joined)

    def run_stages(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Per-stage debug outputs (stem, stage0..N, features, logits) in the reference layout, for
        localizing a parity failure. Runners that cannot expose them return only the logits (a backbone's
        feature maps: nothing, as they are not stages)."""
        out = self.run(batch)
        return {} if isinstance(out, tuple) else {"logits": out}

    def take_gpu_times(self) -> list[float]:
        """Device compute time (ms) of each run since the last call, where the runner measures it (CUDA
        events); empty where it does not. bench reads it into each row's ``gpu_ms``."""
        return []

    def sync(self) -> None:
        """Wait for queued device work (GPU runners override); timing calls it after each run."""

    def describe(self) -> dict:
        return {"runtime": self.key, "device": self.device, "precision": self.precision, "threads": self.threads}

    def close(self) -> None:
        """Release sessions and device memory."""


def packed(outputs) -> np.ndarray | tuple[np.ndarray, ...]:
    """A runner's outputs as ``run`` returns them: the one array (logits), or a backbone's tuple."""
    outputs = tuple(outputs)
    return outputs[0] if len(outputs) == 1 else outputs


def as_outputs(value) -> list[np.ndarray]:
    """A runner's result (one array, or a backbone's several) -> a list of float32 arrays."""
    items = value if isinstance(value, (tuple, list)) else [value]
    return [np.asarray(v, dtype=np.float32) for v in items]


def parse_runtime_options(items: list[str] | None) -> dict[str, str]:
    """['KEY=VALUE', ...] -> {KEY: VALUE} (the CLI's --runtime-option)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad --runtime-option {item!r}: use KEY=VALUE, e.g. precision=bf16")
        out[key.strip()] = value.strip()
    return out
