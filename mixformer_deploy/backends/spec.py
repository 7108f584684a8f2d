"""A backend's light facts: what generic code (artifact detection, parity, bench, inspect, info, profiles,
the CLI) needs to know about a backend without importing its exporter or its runtime.

Why light: running an artifact must not import every exporter (converters cost seconds to import and may
be missing). A spec module imports nothing heavy at import time; its readers import the backend's
runtime lazily, never its exporter. The heavy parts are reached through ``exporter()`` and
``runner_class()``, which import ``<package>.export`` and ``<package>.runner`` on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UsageError


@dataclass(frozen=True)
class Tolerance:
    """Parity tolerances (per input, max|a-r| <= atol + rtol*max|r| and cosine >= min_cosine).
    ``gate_top1`` False for int8, whose top-1 is judged by the accuracy gate instead."""

    atol: float = 1e-4
    rtol: float = 1e-4
    min_cosine: float = 0.99999
    gate_top1: bool = True


# The named tolerances every backend picks from (docs/parity.md says why each is what it is).
FP32 = Tolerance(1e-4, 1e-4, 0.99999)
# fp16 storage and arithmetic: half precision's 11-bit mantissa over 15 blocks.
FP16 = Tolerance(2e-2, 2e-2, 0.999)
# bf16 (8-bit mantissa) keeps a wider range but fewer digits than fp16.
BF16 = Tolerance(1e-1, 5e-2, 0.995)
# int8 through runtimes whose quantizers calibrate activations per tensor (onnxruntime QDQ, OpenVINO/NNCF,
# ExecuTorch and LiteRT PT2E): on the seeded random inputs, far outside the calibration images, their logits
# drift to a cosine near 0.5 while accuracy holds (the shipped weights lose at most 1 of 360 held-out digits).
# The accuracy gate judges these artifacts; this bound only catches a broken one (cosine near 0).
INT8_PER_TENSOR = Tolerance(1.0, 0.75, 0.4, gate_top1=False)


def option(default: Any, help: str, choices: tuple = ()) -> Any:
    """A field of a backend's Options dataclass: its default, the CLI help and the allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices)})


def block_option():
    """The option of every target whose exporter takes the deploy form as is: which block (deploy/compact.py)."""
    return option("classic", "Deploy-form block: 'classic' (default) or 'compact' (window-ordered stages, fewer "
                  "ops; same function).", ("classic", "compact"))


@dataclass(frozen=True)
class OptionInfo:
    """One option as the CLI and the profiles see it (generated from an Options dataclass field)."""

    name: str
    help: str
    type: type
    default: Any
    choices: tuple = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """A value from the CLI or a profile -> this option's type, checked against its choices."""
        if value is None:
            return self.default
        try:
            if self.type is bool and isinstance(value, str):
                v = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
            else:
                v = self.type(value)
        except (KeyError, ValueError, TypeError):
            raise UsageError(f"bad {self.flag} {value!r}: expected {self.type.__name__}") from None
        if self.choices and v not in self.choices:
            raise UsageError(f"bad {self.flag} {value!r}: choose one of {', '.join(map(str, self.choices))}")
        return v


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _field_type(f: dataclasses.Field) -> type:
    """The scalar type of a field annotated ``int``, ``str | None``, ... (annotations are strings here)."""
    names = [t.strip() for t in str(f.type).split("|") if t.strip() != "None"]
    return _TYPES[names[0]] if names and names[0] in _TYPES else str


@dataclass(frozen=True)
class Options:
    """A backend's own export options: subclass as a frozen dataclass whose fields use ``option()``."""

    @classmethod
    def infos(cls) -> tuple[OptionInfo, ...]:
        return tuple(OptionInfo(f.name, f.metadata.get("help", ""), _field_type(f), f.default,
                                f.metadata.get("choices", ())) for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls, given: dict | None) -> "Options":
        """Values from the CLI or a profile (strings or typed; None means the default) -> Options."""
        infos = {i.name: i for i in cls.infos()}
        unknown = sorted(set(given or {}) - set(infos))
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r}")
        return cls(**{k: infos[k].parse(v) for k, v in (given or {}).items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class BackendSpec:
    """Light facts of one backend. Subclasses set the class attributes and override the readers."""

    key: str = ""                       # package name, pip extra, CLI choice, pytest marker
    suffix: str = ""                    # of the file, or of the directory when is_dir
    is_dir: bool = False                # the artifact is a directory (built beside, renamed whole)
    extra: str = ""
    export_cost: str = "cheap"          # "costly": a compile or lowering per block (searches spend fewer exports)
    int8_float_norms: bool = False      # int8 needs every LayerNorm's input in float (keep searches start there)
    runtime: str = ""                   # the runtime key that runs this backend's artifacts ("" = none)
    runners: ClassVar[dict[str, str]] = {}   # runtime key -> runner class name in <package>.runner
    exporter_name: str = ""             # exporter class name in <package>.export ("" = exports nothing)
    cli_module: str = ""                # a module of the package that adds CLI commands of its own
    phone_bench: str = ""               # the on-device benchmark binary its phone.py drives ("" = none)
    precisions: tuple[str, ...] = ("fp32",)
    calibrated: tuple[str, ...] = ()    # precisions that need calibration images (int8)
    tolerances: ClassVar[dict[str, Tolerance]] = {"fp32": FP32}
    Options: ClassVar[type[Options]] = Options
    versions: tuple[str, ...] = ()      # distributions whose versions go into the manifest
    description: str = ""
    title: str = ""                     # the name users know it by (the targets table)
    runs_here: str = ""                 # what runs on a Linux x86 CPU (the targets table's column)
    verified: str = ""                  # where it was verified beyond that: GPU, Mac, phone (the same table)
    # What the conformance suite may ask of it: "int8", "reproducible" (same bytes twice), "backbone",
    # "phone_bench", "inspect", "embedded_manifest", "checksum" (a flipped weight byte is detected).
    capabilities: frozenset[str] = frozenset()
    # Lines of the converter's or runtime's captured output that a user must see (regular expressions):
    # its own errors and accuracy warnings, shown as one warning each; the rest only with --debug.
    notable: tuple[str, ...] = (r"^(ERROR|Error|error)\b", r"(?i)\baccuracy\b")

    @property
    def package(self) -> str:
        return type(self).__module__.rsplit(".", 1)[0]

    @property
    def options(self) -> tuple[OptionInfo, ...]:
        return self.Options.infos()

    def exporter(self):
        """The exporter (imports ``<package>.export``: converters are heavy)."""
        if not self.exporter_name:
            raise UsageError(f"{self.key} exports nothing (it is a runtime only)")
        return getattr(importlib.import_module(f"{self.package}.export"), self.exporter_name)(self)

    def quietly(self, doing: str = ""):
        """``captured`` for this backend's converter or runtime: its output off our stdout and stderr,
        its notable lines as warnings (see quiet.py)."""
        from ..quiet import captured
        return captured(f"{self.title or self.key}{doing}", fds=True, notable=self.notable)

    def runner_class(self, runtime: str | None = None):
        """The runner class of ``runtime`` (default: the one that runs this backend's artifacts, which may
        live in another backend: TensorRT's ONNX runs on onnxruntime)."""
        runtime = runtime or self.runtime
        if runtime not in self.runners:
            from . import runner_class
            return runner_class(runtime)
        return getattr(importlib.import_module(f"{self.package}.runner"), self.runners[runtime])

    def phone(self):
        """The phone-bench driver (``<package>.phone``: phone_command, parse_phone_output, phone_bench)."""
        if not self.phone_bench:
            raise UsageError(f"{self.key} artifacts have no phone benchmark")
        return importlib.import_module(f"{self.package}.phone")

    def parse_options(self, given: dict | None) -> Options:
        return self.Options.parse(given)

    def check(self, options) -> None:
        """Reject export options this backend cannot honour, before any weights are read (UsageError),
        or a backend that is missing (MissingBackendError). Cheap: no converter is imported."""
        if options.precision not in self.precisions:
            raise UsageError(f"{self.key} exports {' or '.join(self.precisions)}, not {options.precision!r}")

    def unjudged_form(self, options) -> str | None:
        """Why parity cannot judge the artifact these options make (an app-facing form whose inputs or
        outputs are not the contract's tensors), or None. Export then skips the gate and records why."""
        return None

    def read_embedded(self, path: Path) -> dict | None:
        """The manifest embedded in an artifact, or None; raise ArtifactError if it is corrupt."""
        return None

    def verify(self, path: Path) -> None:
        """A cheap structural check of an artifact without its runtime (ArtifactError when it is broken):
        by default, its embedded manifest reads. Formats whose files can be checked further override."""
        from ..errors import ArtifactError

        if not self.files(path):
            raise ArtifactError(f"{Path(path).name}: no file of a {self.key} artifact there")
        self.read_embedded(path)

    def inspect(self, path: Path) -> dict:
        """What is inside: inputs, outputs, op histogram, max rank, ops per precision, kept-fp32 ops."""
        return {"inputs": None, "outputs": None, "ops": None, "max_rank": None, "precisions": None,
                "kept_fp32": None, "note": f"{self.key} artifacts have no inspect reader"}

    def files(self, path: Path) -> list[Path]:
        """Every file that belongs to the artifact (for sizes): a directory's whole tree by default."""
        path = Path(path)
        if path.is_dir():
            return sorted(f for f in path.rglob("*") if f.is_file())
        return [path] if path.is_file() else []

    def status(self) -> dict:
        """Can this backend export here? By default: its first package (``versions[0]``) is installed."""
        from ..optional import version_of

        dist = self.versions[0] if self.versions else self.key
        version = version_of(dist)
        note = "" if version else f'not installed: pip install "mixformer-deploy[{self.extra}]"'
        return {"installed": bool(version), "package": dist, "version": version,
                "can_export": bool(version) and bool(self.exporter_name), "note": note}

    def runtime_for(self, path: Path) -> str:
        """The runtime that runs one of this backend's artifacts (a backend with two kinds overrides)."""
        return self.runtime

    def tolerance(self, precision: str) -> Tolerance:
        return self.tolerances.get(precision, FP32)

    def owns(self, path: Path) -> bool:
        """Whether the file name fits this backend's artifacts (the suffix; the manifest decides)."""
        return bool(self.suffix) and Path(path).name.lower().endswith(self.suffix)
