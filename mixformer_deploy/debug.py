"""debug: where an artifact's error comes from, block by block, then branch by branch, on any backend.

A probe (``probe.py``) of the artifact is exported by the artifact's own backend with its recorded
precision, keeps, target options and calibration, and run on the artifact's runtime with the runtime
options given. Each probe point is compared with the same point of the float32 deploy form of the
reference weights in PyTorch. The first block whose error exceeds its budget is then probed again at
each of its branches. See docs/debug.md for the budget rule and the report's schema.

Budget rule: a point's error may be at most ``GROWTH`` times the error entering it (the previous block
boundary's) plus the precision's own ``LOCAL_BUDGET``; inherited error is then not blamed on the block
that inherits it. Errors are relative L2 over all inputs.
"""

from __future__ import annotations

import copy
import functools
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError, UsageError, one_line
from .numerics import rel_l2
from .probe import block_points, branch_points, make_probe, reference_name

log = logging.getLogger(__name__)

GROWTH = 1.5
# relative L2 a block (or one of its branches) may add on top of GROWTH x the error entering it, by the
# precision the runtime computes in; chosen from measured curves of healthy artifacts (docs/debug.md)
LOCAL_BUDGET = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2, "int8": 1.5e-1}
# the probe's own outputs against the artifact's: extra outputs must not change what is computed
PROBE_FINAL_LIMIT = {"fp32": 1e-5}
PROBE_FINAL_LIMIT_REDUCED = 1e-3


@dataclass
class PointError:
    name: str              # deploy-form module path (what --keep-fp32 globs match)
    reference: str         # the reference's / checkpoint's path
    rel_l2: float
    worst_cosine: float    # the lowest per-input cosine
    entering: float        # the error entering the point (the previous block boundary's)
    budget: float
    exceeded: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DebugReport:
    artifact: str
    target: str
    runtime: dict
    precision: str
    block_form: str
    budget_rule: dict
    inputs: list[dict]
    blocks: list[PointError] = field(default_factory=list)
    outputs: list[PointError] = field(default_factory=list)
    branches: list[PointError] = field(default_factory=list)
    first_block: str | None = None
    first_branch: str | None = None
    probe_vs_artifact: float | None = None   # relative L2 of the probe's outputs against the artifact's
    exports: int = 0
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.first_block is not None

    def verdict(self) -> str:
        if not self.diverged:
            return "no divergence: every block within its budget"
        where = next(p for p in self.blocks if p.name == self.first_block)
        culprit = next((p for p in self.branches if p.name == self.first_branch), where)
        branch = ""
        if self.first_branch:   # attention.logits stands for the attention branch
            branch = " " + self.first_branch[len(where.name) + 1:].removesuffix(".logits")
        return (f"first divergence: {where.name} ({where.reference}){branch}: rel L2 {culprit.rel_l2:.2g} "
                f"against budget {culprit.budget:.2g}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items()}
        d.update(diverged=self.diverged, verdict=self.verdict())
        return d


def budget_of(precision: str, entering: float) -> float:
    return GROWTH * entering + LOCAL_BUDGET.get(precision, LOCAL_BUDGET["int8"])


def point_errors(names: list[str], got: list[np.ndarray], want: list[np.ndarray], precision: str,
                 entering: list[float]) -> list[PointError]:
    """Each point's relative L2 and worst per-input cosine, judged against its budget."""
    out = []
    for name, a, r, e in zip(names, got, want, entering):
        err = finite_rel_l2(a, r)
        budget = budget_of(precision, e)
        out.append(PointError(name, reference_name(name), err, _worst_cosine(a, r), e, budget, not err <= budget))
    return out


def finite_rel_l2(a: np.ndarray, r: np.ndarray) -> float:
    if not np.isfinite(a).all():
        return float("inf")
    return float(rel_l2(a, r))


def _worst_cosine(a: np.ndarray, r: np.ndarray) -> float:
    a, r = a.reshape(len(a), -1).astype(np.float64), r.reshape(len(r), -1).astype(np.float64)
    if not np.isfinite(a).all():
        return float("nan")
    num = (a * r).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(r, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))


def entering_errors(errors: list[float]) -> list[float]:
    """The error entering each point of the block curve: the previous point's (the input's is 0)."""
    return [0.0, *errors[:-1]]


# ---------------------------------------------------------------- the artifact, its weights and its probe

@dataclass
class _Case:
    """One artifact under investigation: what its probes are exported from and run on."""

    artifact: Path
    manifest: dict
    spec: object
    artifact_model: torch.nn.Module     # the weights the artifact was exported from (the probe's)
    reference_model: torch.nn.Module    # the float32 reference it must reproduce
    options: object                     # ExportOptions as the artifact was exported
    x: np.ndarray
    batch: int | None
    precision: str = "fp32"             # what the runtime computes in (a runtime option may lower it)
    runtime_description: dict = field(default_factory=dict)
    exports: int = 0
    loader: object = None               # path -> runner: the artifact's runtime, or a test's evaluator

    def open(self, path: Path):
        return self.loader(path)

    @functools.cached_property
    def artifact_deploy(self) -> torch.nn.Module:
        """The deploy form of the artifact's weights (its probes are made from it)."""
        return self._deploy(self.artifact_model)

    @functools.cached_property
    def reference_deploy(self) -> torch.nn.Module:
        """The deploy form of the reference weights (the points probes are compared with)."""
        return self._deploy(self.reference_model)

    def _deploy(self, model: torch.nn.Module) -> torch.nn.Module:
        from .deploy import to_deploy
        size = (self.options.height, self.options.width)
        return to_deploy(model, size, self.manifest.get("block_form") or "classic")


def open_case(artifact, weights, artifact_weights, inputs, calibration, runtime_options, threads,
              random_count: int, warnings: list[str], loader=None) -> _Case:
    """Everything checked and loaded before the first probe is exported: bad input fails fast.
    ``loader`` (path -> runner) replaces the artifact's runtime: the tests' numpy evaluator of Core ML
    programs, where Core ML cannot predict."""
    from .artifact import resolve_artifact, target_of
    from .data import fixed_batch
    from .parity import _usable_runtime, artifact_manifest, resolve_reference

    path = resolve_artifact(artifact)
    manifest = artifact_manifest(path)
    spec = target_of(path)
    if spec is None:
        raise UsageError(f"{path.name}: debug needs an exported artifact (a manifest naming its target)")
    if loader is None:
        loader = _runtime_loader(*_usable_runtime(path, "auto", runtime_options), threads)
    else:
        spec.verify(path)
    precision, description = runtime_facts(loader(path), manifest)  # a bad artifact fails here
    ref = resolve_reference(path, manifest, weights, warnings)
    own = _artifact_model(path, manifest, weights, artifact_weights, ref)
    x = _inputs(manifest, ref, inputs, random_count)
    export_options = _export_options(spec, manifest, calibration, warnings)
    return _Case(path, manifest, spec, own, ref.model, export_options, x, fixed_batch(manifest), precision,
                 description, loader=loader)


def _runtime_loader(runtime: str, options: dict, threads):
    from .backends import open_runner
    return lambda path: open_runner(path, runtime, "cpu", threads=threads, options=options)


def _artifact_model(path, manifest, weights, artifact_weights, ref):
    """The weights the artifact was exported from: the probe must compute what the artifact computes."""
    from .parity import resolve_reference

    sha = (manifest.get("weights") or {}).get("sha256")
    if artifact_weights is not None:
        own = resolve_reference(path, manifest, artifact_weights, [])
        if sha and own.sha256 != sha:
            raise UsageError(f"--artifact-weights {Path(artifact_weights).name} is not what {path.name} was "
                             f"exported from (sha256 {str(own.sha256)[:12]} vs {sha[:12]})")
        return own.model
    if weights is None or ref.sha256 == sha or (sha is None and manifest.get("seed") is None):
        return ref.model
    try:
        return resolve_reference(path, manifest, None, []).model
    except UsageError:
        raise UsageError(f"{path.name} was not exported from {Path(weights).name}: the probe is exported from "
                         "the artifact's own weights; pass them with --artifact-weights") from None


def _inputs(manifest: dict, ref, inputs, random_count: int) -> np.ndarray:
    from .data import Preprocessing, load_inputs
    from .parity import DEFAULT_INPUTS
    from .shipped import is_shipped

    h, w = (int(v) for v in manifest["input_size"])
    if inputs is None:
        inputs = DEFAULT_INPUTS + (("dataset",) if is_shipped(ref.sha256) else ())
    sets = load_inputs(inputs, h, w, Preprocessing.from_dict(manifest.get("preprocessing")), random_count)
    return np.concatenate([s.x for s in sets])


def _export_options(spec, manifest: dict, calibration, warnings: list[str]):
    """The artifact's export options, from its manifest's record, without per-stage debug outputs."""
    from .backends.exporter import ExportOptions
    from .data import fixed_batch

    h, w = (int(v) for v in manifest["input_size"])
    precision = manifest.get("precision") or "fp32"
    keeps = list((manifest.get("precision_keeps") or {}).get("modules") or [])
    try:
        target = spec.parse_options({k: v for k, v in (manifest.get("target_options") or {}).items()
                                     if v is not None})
    except UsageError as e:
        raise UsageError(f"the manifest's target options cannot be replayed: {e}") from None
    options = ExportOptions(h, w, fixed_batch(manifest), precision, keeps, target=target, debug_outputs=False)
    if precision in spec.calibrated:
        options.calibration = _calibration(manifest, calibration, h, w, warnings)
    return options


def _calibration(manifest: dict, folder, h: int, w: int, warnings: list[str]):
    """The artifact's calibration images again: the shipped set, or a folder (--calibration, else the
    recorded one if it is still there); a set that differs from the recorded one is a warning."""
    from .calibration import DEFAULT_SIZE, load_calibration
    from .data import Preprocessing
    from .shipped import is_shipped

    record = manifest.get("calibration") or {}
    source = str(record.get("source") or "")
    if folder is None and source and not source.startswith("digits-train"):
        if not Path(source).is_dir():
            raise UsageError(f"the artifact was calibrated on {source}, which is not here: pass the images "
                             "with --calibration DIR")
        folder = source
    prep = Preprocessing.from_dict(manifest.get("preprocessing"))
    shipped = is_shipped((manifest.get("weights") or {}).get("sha256"))
    cal = load_calibration(folder, int(record.get("count") or DEFAULT_SIZE), h, w, prep, shipped)
    if record.get("sha256") and record["sha256"] != cal.record["sha256"]:
        warnings.append("the calibration images differ from the artifact's: the probe's quantization may "
                        "differ from the artifact's")
    return cal


def export_probe(case: _Case, points: list[str], folder: Path) -> Path:
    """The artifact's probe at ``points``: the same backend, precision, keeps, options and calibration."""
    from .artifact import sidecar_path, write_json
    from .backends.exporter import ExportContext

    probe = make_probe(case.artifact_deploy, points)
    path = folder / f"probe{len(list(folder.iterdir()))}{case.spec.suffix}"
    manifest = copy.deepcopy(case.manifest)
    batch = case.options.batch or "batch"
    finals = manifest.get("outputs") or [{"name": "logits", "shape": [batch, manifest.get("num_classes")]}]
    manifest["outputs"] = finals + [{"name": n, "shape": [batch, k], "probe": p}
                                    for n, k, p in zip(probe.output_names[len(finals):], probe.probe_sizes, points)]
    manifest.pop("stage_outputs", None)
    log.info("probe %d: %d point(s) through the %s exporter", case.exports + 1, len(points), case.spec.key)
    try:
        with case.spec.quietly(" converter"):
            case.spec.exporter().export(probe, ExportContext(path, path, case.options, manifest))
    except ExportError as e:
        raise ExportError(f"the probe could not be exported: {e}") from e
    except Exception as e:
        raise ExportError(f"the probe could not be exported: {one_line(e, 300)}") from e
    finally:
        case.exports += 1
    write_json(sidecar_path(path), manifest)
    return path


def run_artifact(case: _Case, path: Path) -> list[np.ndarray]:
    """Every output of an artifact (the probe, or the artifact itself) on the case's inputs."""
    from .data import run_outputs

    runner = case.open(path)
    try:
        return run_outputs(runner, case.x, case.batch, batch_size=8)
    finally:
        runner.close()


@torch.no_grad()
def reference_points(case: _Case, points: list[str]) -> list[np.ndarray]:
    """The reference's outputs and its values at ``points``, PyTorch float32 of its deploy form."""
    probe = make_probe(case.reference_deploy, points)
    parts = [[t.numpy() for t in probe(torch.from_numpy(case.x[i:i + 8]))] for i in range(0, len(case.x), 8)]
    return [np.concatenate(p) for p in zip(*parts)]


def probe_points(case: _Case, points: list[str], folder: Path) -> tuple[list, list]:
    """(the probe's outputs, the reference's) at ``points``, finals first."""
    got = run_artifact(case, export_probe(case, points, folder))
    return got, reference_points(case, points)


def runtime_facts(runner, manifest: dict) -> tuple[str, dict]:
    """(the precision the runtime computes in (a runtime option may lower it: OpenVINO bf16), the
    runtime's description) of an opened artifact; closes it."""
    try:
        return getattr(runner, "precision", None) or manifest.get("precision") or "fp32", runner.describe()
    finally:
        runner.close()


# ---------------------------------------------------------------- the search

def debug_artifact(artifact, weights=None, artifact_weights=None, inputs=None, calibration=None,
                   runtime_options: dict | None = None, threads: int | None = None,
                   random_count: int = 4, loader=None) -> DebugReport:
    """The error curve of ``artifact`` through the network and the first block (then branch) whose error
    exceeds its budget. Two probe exports at most: every block boundary, then the failing block's branches."""
    start, warnings = time.perf_counter(), []
    case = open_case(artifact, weights, artifact_weights, inputs, calibration, runtime_options or {}, threads,
                     random_count, warnings, loader)
    precision = case.precision
    report = DebugReport(str(case.artifact), case.spec.key, case.runtime_description, precision,
                         case.manifest.get("block_form") or "classic",
                         {"growth": GROWTH, "local": LOCAL_BUDGET.get(precision, LOCAL_BUDGET["int8"]),
                          "rule": "rel L2 <= growth x entering rel L2 + local"},
                         [{"count": int(len(case.x))}], warnings=warnings)
    with tempfile.TemporaryDirectory(prefix="mixformer-debug-") as tmp:
        _block_curve(case, report, Path(tmp))
        if report.first_block and report.first_block.startswith("stages."):
            _branch_curve(case, report, Path(tmp))
    report.exports, report.seconds = case.exports, round(time.perf_counter() - start, 3)
    return report


def _block_curve(case: _Case, report: DebugReport, folder: Path) -> None:
    """Every block boundary, judged against the error entering it; the outputs after them."""
    points = block_points(case.reference_deploy)
    got, want = probe_points(case, points, folder)
    n = len(got) - len(points)
    errors = [finite_rel_l2(a, r) for a, r in zip(got[n:], want[n:])]
    report.blocks = point_errors(points, got[n:], want[n:], report.precision, entering_errors(errors))
    last = errors[-1] if errors else 0.0
    names = [o.get("name") for o in (case.manifest.get("outputs") or [])] or ["logits"]
    report.outputs = point_errors(names, got[:n], want[:n], report.precision, [last] * n)
    report.first_block = next((p.name for p in report.blocks if p.exceeded), None)
    report.probe_vs_artifact = _probe_vs_artifact(case, got[:n], report)


def _branch_curve(case: _Case, report: DebugReport, folder: Path) -> None:
    """The failing block's branches, each judged against the error entering the block."""
    block = next(p for p in report.blocks if p.name == report.first_block)
    points = branch_points(case.reference_deploy, block.name)
    got, want = probe_points(case, points, folder)
    n = len(got) - len(points)
    report.branches = point_errors(points, got[n:], want[n:], report.precision, [block.entering] * len(points))
    report.first_branch = next((p.name for p in report.branches if p.exceeded), None)


def _probe_vs_artifact(case: _Case, probe_finals: list[np.ndarray], report: DebugReport) -> float:
    """The probe's outputs against the artifact's own: extra outputs must not change what is computed."""
    own = run_artifact(case, case.artifact)
    err = max(float(rel_l2(np.nan_to_num(a), np.nan_to_num(r))) for a, r in zip(probe_finals, own))
    limit = PROBE_FINAL_LIMIT.get(report.precision, PROBE_FINAL_LIMIT_REDUCED)
    if not err <= limit:
        report.warnings.append(f"the probe's outputs differ from the artifact's by {err:.2g} relative L2 "
                               f"(limit {limit:g}): the backend compiles the probe differently")
    return float(f"{err:.3g}")
