"""export(): weights -> deploy form -> a target's artifact (+ manifest) -> parity check.

An artifact only ever appears under its final name complete and, unless the check is skipped, verified:
it is written under a temporary name, and renamed when done. One that fails parity is kept for
inspection as ``<final name>.failed`` (with its sidecar), and an earlier good artifact is left alone.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifact import (publish, remove, remove_stale_temporaries, sidecar_path, temp_path, uninterrupted,
                       write_json, write_json_atomic)
from .calibration import DEFAULT_SIZE as DEFAULT_CALIBRATION_SIZE
from .data import parse_size, photos
from .errors import ArtifactError, CheckpointError, ExportError, InputFileError, RewriteError, UsageError, one_line
from .keep_search import AUTO
from .manifest import artifact_name
from .numerics import rel_l2
from .source import SourceModel, base_manifest, load_source, resolve_size
from .backends import get_spec
from .backends.exporter import ExportContext, ExportOptions
from .backends.spec import BackendSpec

log = logging.getLogger(__name__)
REWRITE_MAX_REL_L2 = 1e-5


def rewrite_error(model: torch.nn.Module, deploy: torch.nn.Module, h: int, w: int) -> float:
    """Relative L2 between the deploy form and the reference on real photos: the rewrite's own error,
    reported apart from the backend's (a backbone's: its worst output's). It goes into the artifact, so it
    is measured on one thread (a float32 sum's order depends on the thread count) and kept to 3 significant
    digits: two exports of the same weights give the same bytes, whatever the machine's threads."""
    x = torch.from_numpy(photos(h, w, names=("chelsea", "astronaut"))[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref, dep = model(x), deploy(x)
    finally:
        torch.set_num_threads(threads)
    if isinstance(ref, torch.Tensor):
        err = rel_l2(dep, ref)
    else:
        err = max(rel_l2(d, r) for d, r in zip(dep, ref))
    return float(f"{err:.3g}")


HEADS = ("classifier", "none")


def check_head(head: str, out_indices, out_norm: bool) -> None:
    if head not in HEADS:
        raise UsageError(f"bad --head {head!r}: classifier (logits) or none (a backbone's feature maps)")
    if head != "none" and (out_indices is not None or out_norm):
        raise UsageError("--out-indices and --out-norm apply to backbones: add --head none")
    if head == "none":
        from .model.backbone import parse_out_indices
        parse_out_indices(out_indices)


def check_stride(h: int, w: int, stride: int = 32) -> None:
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise UsageError(f"input size {h}x{w} is not supported: each side must be a positive multiple of {stride}")


def parse_batch(batch: str | int | None) -> int | None:
    if batch is None or str(batch).lower() in ("dynamic", "dyn"):
        return None
    try:
        n = int(batch)
    except ValueError:
        raise UsageError(f"bad --batch {batch!r}: a positive integer or 'dynamic'") from None
    if n < 1:
        raise UsageError(f"bad --batch {batch!r}: a positive integer or 'dynamic'")
    return n


def check_output(output: str | Path | None, suffix: str) -> Path:
    """--output as given: a directory, or a path with the target's suffix (checked before any weights are read)."""
    out = Path(output) if output else Path("artifacts")
    if out.suffix and not out.is_dir() and not out.name.lower().endswith(suffix):
        raise UsageError(f"--output {out} must be a directory or a path ending in {suffix}")
    return out


def output_path(output: str | Path | None, name: str, suffix: str) -> Path:
    out = check_output(output, suffix)
    return out if out.name.lower().endswith(suffix) else out / name


def target_options_of(spec: BackendSpec, given: dict | None):
    """The backend's own options, typed, defaults filled. An option of another target is a usage error
    naming the targets that take it."""
    from .backends import option_owners

    mine = {o.name for o in spec.options}
    given = {k: v for k, v in (given or {}).items() if v is not None}
    for name in given:
        if name not in mine:
            owners = option_owners().get(name, (None, []))[1]
            flag = "--" + name.replace("_", "-")
            where = f"it belongs to {', '.join(owners)}" if owners else "no target takes it"
            raise UsageError(f"{flag} is not an option of the {spec.key} target ({where})")
    return spec.parse_options(given)


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    parity: object | None = None
    after: object | None = None   # the backend's follow-up (FollowUp; TensorRT: trtexec line, engine, what is missing)

    @property
    def passed(self) -> bool:
        return self.parity is None or bool(self.parity.passed)

    def to_dict(self) -> dict:
        return {"artifact": str(self.path), "passed": self.passed, "manifest": self.manifest}


@dataclass
class _Job:
    """One export on its way through the pipeline's steps."""

    spec: BackendSpec
    options: ExportOptions
    source: SourceModel | None = None
    reference: torch.nn.Module | None = None
    deploy: torch.nn.Module | None = None
    manifest: dict = field(default_factory=dict)
    check: bool | None = None


def export(weights: str | Path | None = None, target: str = "onnx", variant: str | None = None,
           img_size: str | int | None = None, batch: str | int | None = 1, precision: str = "fp32",
           output: str | Path | None = None, check: bool | None = None, num_classes: int | None = None,
           inputs: tuple[str, ...] | None = None, keep_fp32: tuple[str, ...] = (), default_keeps: bool = True,
           calibration: str | Path | None = None, calibration_size: int = DEFAULT_CALIBRATION_SIZE,
           target_options: dict | None = None, accuracy_set: str | Path | None = None,
           max_accuracy_drop: str | None = None, source: SourceModel | None = None, head: str = "classifier",
           out_indices: str | tuple[int, ...] | None = None, out_norm: bool = False,
           keep_search: dict | None = None) -> ExportResult:
    """Export weights to a target's artifact and (unless check=False) gate it on parity and accuracy.

    ``check``: None (the default) runs the parity gate where the target's runtime can run here, and
    otherwise records in the manifest why it was not run (Core ML on Linux); True insists (exit 3 where it
    cannot run); False skips it. ``source``: weights already loaded (``load_source``), so that several
    exports of one model read them once. ``head="none"``: a backbone artifact whose outputs are the
    feature maps of the stages in ``out_indices`` (features_0..3, NCHW), each after its LayerNorm from
    the checkpoint with ``out_norm``. The steps: check the request (before any weights are read) ->
    resolve the source -> deploy form -> manifest -> write, gate and publish -> the backend's follow-up.
    ``keep_fp32`` holding "auto": the smallest float32 set is searched for (keep_search.py);
    ``keep_search`` is that search's record, for the manifest."""
    if AUTO in keep_fp32:
        return _export_auto(dict(locals()))
    job = _check_request(target, batch, img_size, precision, head, out_indices, out_norm, check, keep_fp32,
                         default_keeps, calibration, target_options, output, inputs, accuracy_set,
                         max_accuracy_drop)
    _resolve_source(job, source or load_source(weights, variant, num_classes), img_size, head, out_indices, out_norm)
    _deploy_form(job, keep_fp32, default_keeps, calibration, calibration_size)
    _describe(job, head, out_norm, keep_fp32, default_keeps)
    if keep_search is not None:
        job.manifest["precision_keeps"]["search"] = keep_search
    result = _write_gate_publish(job, output, head, inputs, accuracy_set, max_accuracy_drop)
    if result.passed:
        result.after = job.spec.exporter().follow_up(result.path, job.options)
    return result


def _export_auto(args: dict) -> ExportResult:
    """``--keep-fp32 auto``: the request checked as a plain export would be, the weights read once, then
    the search (keep_search.py)."""
    from .keep_search import check_auto, export_auto

    globs = tuple(g for g in args["keep_fp32"] if g != AUTO)
    spec = get_spec(args["target"])
    _check_request(args["target"], args["batch"], args["img_size"], args["precision"], args["head"],
                   args["out_indices"], args["out_norm"], args["check"], globs, False, args["calibration"],
                   args["target_options"], args["output"], args["inputs"], args["accuracy_set"],
                   args["max_accuracy_drop"])
    check_auto(spec, args["precision"])
    if args["check"] is False:
        raise UsageError("--keep-fp32 auto searches with the parity gate: it cannot run with --no-check")
    args["source"] = args["source"] or load_source(args["weights"], args["variant"], args["num_classes"])
    return export_auto(export, spec, args)


def _check_request(target, batch, img_size, precision, head, out_indices, out_norm, check, keep_fp32,
                   default_keeps, calibration, target_options, output, inputs, accuracy_set,
                   max_accuracy_drop) -> _Job:
    """Every option checked before any weights are read: a usage error costs nothing."""
    spec = get_spec(target)
    if img_size:  # every MixFormer's stride is 32
        check_stride(*parse_size(img_size))
    check_head(head, out_indices, out_norm)
    options = ExportOptions(0, 0, parse_batch(batch), precision, target=target_options_of(spec, target_options))
    spec.check(options)
    unjudged = spec.unjudged_form(options)
    if unjudged and check:
        raise UsageError(f"--check: {unjudged}; check the plain form (export it without those options)")
    if precision == "fp32" and (keep_fp32 or not default_keeps):
        raise UsageError("--keep-fp32 / --no-default-keeps apply to reduced precisions, not fp32")
    if calibration is not None and precision not in spec.calibrated:
        raise UsageError(f"--calibration applies to {', '.join(spec.calibrated) or 'no precision'} of {spec.key}, "
                         f"not {precision}")
    if calibration is not None and not Path(calibration).is_dir():
        raise InputFileError(f"calibration folder not found: {calibration}")
    check_output(output, spec.suffix)
    if check is not False:
        from .parity import check_input_options
        check_input_options(inputs, accuracy_set, max_accuracy_drop)
    return _Job(spec, options, check=check)


def _resolve_source(job: _Job, source: SourceModel, img_size, head: str, out_indices, out_norm: bool) -> None:
    """The weights, the input size they record and the module to export (a classifier or its backbone)."""
    job.source = source
    job.options.height, job.options.width = resolve_size(source, img_size)
    job.reference = source.model
    if head == "none":
        from .source import backbone_of
        job.reference = backbone_of(source, out_indices, out_norm)
    elif not source.has_classifier:
        raise CheckpointError(f"{source.weights.get('name')}: a backbone-only checkpoint (no classifier head): "
                              "export it with --head none")


def _deploy_form(job: _Job, keep_fp32, default_keeps: bool, calibration, calibration_size: int) -> None:
    """The deploy form, the float32 keeps of a reduced precision and the int8 calibration images."""
    from .calibration import load_calibration
    from .deploy.precision import resolve_keeps

    o = job.options
    job.deploy = _to_deploy(job.reference, o.height, o.width, getattr(o.target, "block", "classic"))
    if o.precision != "fp32":
        o.keeps = resolve_keeps(job.deploy, tuple(keep_fp32), default_keeps)
    if o.precision in job.spec.calibrated:
        o.calibration = load_calibration(calibration, calibration_size, o.height, o.width,
                                         job.source.preprocessing, bool(job.source.weights.get("shipped")))


def _describe(job: _Job, head: str, out_norm: bool, keep_fp32, default_keeps: bool) -> None:
    """The manifest, with the deploy form's own error: it gates itself (over REWRITE_MAX_REL_L2: exit 5)."""
    spec, o, h, w = job.spec, job.options, job.options.height, job.options.width
    m = job.manifest = base_manifest(job.source, spec.key, spec.runtime, h, w, o.batch, o.precision, spec.versions)
    m["target_options"], m["head"] = o.target.to_dict(), head
    m["block_form"] = job.deploy.block_form
    if head == "none":
        m["outputs"] = job.reference.outputs(h, w, o.batch or "batch")
        m["out_indices"], m["out_norm"] = list(job.reference.out_indices), bool(out_norm)
    m["rewrite_error_rel_l2"] = err = rewrite_error(job.reference, job.deploy, h, w)
    if not err <= REWRITE_MAX_REL_L2:
        raise RewriteError(f"the deploy form differs from the reference by {err:.3g} relative L2 on photos "
                           f"(limit {REWRITE_MAX_REL_L2:g}): refusing to export")
    if o.precision != "fp32":
        m["precision_keeps"] = {"defaults": default_keeps, "patterns": list(keep_fp32), "modules": o.keeps}
    if o.calibration is not None:
        m["calibration"] = o.calibration.record
    _decide_check(job)


def _decide_check(job: _Job) -> None:
    """Whether the gate runs: never on an app-facing form; by default where the runtime runs here."""
    unjudged = job.spec.unjudged_form(job.options)
    if unjudged:
        job.check = False
        log.warning("parity not checked: %s", unjudged)
        job.manifest["parity"] = {"status": "not run", "reason": unjudged}
    if job.check is None:
        status = job.spec.runner_class().status()
        job.check = bool(status.get("can_run"))
        if not job.check:
            log.warning("parity not checked here: %s", status.get("note") or f"{job.spec.runtime} cannot run here")
            job.manifest["parity"] = {"status": "not run", "reason": status.get("note")}


def _write_gate_publish(job: _Job, output, head: str, inputs, accuracy_set, max_accuracy_drop) -> ExportResult:
    """Write under a temporary name, gate it, publish it whole (a failure as ``<name>.failed``)."""
    spec, o, manifest = job.spec, job.options, job.manifest
    name = artifact_name(job.source.model.cfg.name, o.height, o.width, o.batch, o.precision, spec.suffix,
                         backbone=head == "none")
    final = output_path(output, name, spec.suffix)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = temp_path(final)
    result = ExportResult(final, manifest)
    try:
        with spec.quietly(" converter"):
            facts = spec.exporter().export(job.deploy, ExportContext(final, tmp, o, manifest)) or {}
        for key, value in facts.items():  # what the exporter learnt, in the sidecar where it did not embed it
            manifest.setdefault(key, value)
        manifest["size_bytes"] = sum(f.stat().st_size for f in spec.files(tmp))
        write_json(sidecar_path(tmp), manifest)  # a temporary already: its name carries the pid
        if job.check:
            from .parity import check_parity
            with _converter_rejects(tmp.name, final.name):
                result.parity = check_parity(tmp, weights_model=job.source, inputs=inputs, accuracy_set=accuracy_set,
                                             max_accuracy_drop=max_accuracy_drop, display_name=final.name)
            manifest["parity"] = result.parity.summary()
        if not result.passed:
            result.path = final = final.with_name(final.name + ".failed")
        with uninterrupted():  # the artifact and its sidecar together
            publish(tmp, final)
            write_json_atomic(sidecar_path(final), manifest)
        if result.parity is not None:
            result.parity.artifact = str(final)
    finally:
        remove(tmp)
        sidecar_path(tmp).unlink(missing_ok=True)
    if result.passed:  # a stale failure of this name no longer describes what is there
        stale = final.with_name(final.name + ".failed")
        remove(stale)
        sidecar_path(stale).unlink(missing_ok=True)
    return result


@contextmanager
def _converter_rejects(tmp_name: str, final_name: str):
    """A runtime that rejects what was just exported is the converter's failure (exit 5), not a bad input.
    The message names the artifact by its final name, never the temporary one."""
    try:
        yield
    except ArtifactError as e:
        raise ExportError(f"the freshly exported artifact was rejected: {str(e).replace(tmp_name, final_name)}") from e


def _to_deploy(model: torch.nn.Module, h: int, w: int, block: str = "classic"):
    from .deploy import to_deploy
    try:
        return to_deploy(model, (h, w), block)
    except RewriteError:
        raise
    except Exception as e:
        raise RewriteError(f"deploy rewrite failed: {one_line(e, 200)}") from e
