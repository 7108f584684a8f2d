"""export_all(): every target of the targets table, one precision list, one load of the weights.

What a user runs to choose a format: each target that can be built here is exported through
``export_api.export`` (its own parity gate included) from the same loaded weights; the ones that cannot
are rows that say why and give the command that finishes them elsewhere. Optionally every artifact that
runs here is then timed against PyTorch eager in one interleaved benchmark (``bench.benchmark_subjects``).

Nothing here branches on a format name: what a target cannot do here comes from the target itself
(``Target.status``, ``Target.check``, its runtime's ``status``, a parity the export recorded as "not run",
an ``after_publish`` step that needs something missing here).

Row kinds (``Row.kind``), in the order a reader cares about them:

- ``passed``       built and its parity gate passed (a later step may still need another machine: note);
- ``failed``       built, and its parity or accuracy gate failed (kept as ``<name>.failed``): exit 1;
- ``exported``     built, parity not run (``check=False``, or its runtime cannot run here: command says where);
- ``not offered``  the target does not export this precision (or these options), nothing attempted;
- ``missing extra`` the target's package is not installed (note: the pip line);
- ``unavailable``  the target needs a backend or hardware that is not here (note: what; command: where);
- ``error``        the export raised one of our errors (exit code kept), the others went on;
- ``reference``    PyTorch eager, the benchmark's reference (only with ``bench=True``).

A precision a target does not export but its runtime executes (OpenVINO's bf16: the fp32 IR with the runtime's
``precision=bf16`` setting; the target's spec has a tolerance for it and its runner a ``precision`` option) is a
row of its own, ``runtime_options`` set: checked and timed with that setting, no new export. A row whose
artifact runs here only on another runtime than the one it is deployed on (the TensorRT-ready ONNX on
onnxruntime) is checked there but never timed: ``deploy_runtime`` names the runtime whose time it is not.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from .calibration import DEFAULT_SIZE as DEFAULT_CALIBRATION_SIZE
from .errors import InputFileError, MissingBackendError, MixformerDeployError, ParityError, UsageError, one_line

log = logging.getLogger(__name__)

SCHEMA = "mixformer-deploy/export-all/1"
SUMMARY_NAME = "summary.md"
DEFAULT_BENCH_DURATION_S = 3.0
DEFAULT_BENCH_WARMUP_S = 0.5
MIB = 2 ** 20
HEADERS = ("target", "precision", "status", "size MiB", "max abs error", "cosine (worst input)",
           "top-1 agreement", "accuracy (artifact / reference)", "p50 ms", "speed-up vs PyTorch eager")
BUILT = ("passed", "failed", "exported")
SHORT_HEADERS = ("target", "precision", "status", "MiB", "max abs", "cosine", "top-1", "accuracy", "p50 ms",
                 "speed-up")
LEGEND = ("max abs: the largest |artifact - PyTorch| logit; cosine: the worst input's; top-1: agreement with "
          "PyTorch; accuracy: held-out digits, artifact/PyTorch; speed-up: PyTorch eager p50 / the row's p50")
PENDING = "pending"                    # a runtime precision's row until the fp32 artifact it runs exists
CLI = "mixformer-deploy"

Progress = Callable[[str], None]


@dataclass
class Row:
    target: str
    precision: str
    kind: str                          # see the module docstring
    status: str                        # what the table shows
    artifact: str | None = None
    size_bytes: int | None = None
    max_abs: float | None = None
    cosine: float | None = None        # the worst input's cosine (the pass rule's)
    top1_agreement: float | None = None
    accuracy: float | None = None      # held-out digits, artifact (shipped weights only)
    accuracy_reference: float | None = None
    p50_ms: float | None = None
    speedup: float | None = None       # PyTorch eager p50 / this row's p50
    exit_code: int | None = None       # of the error that made this row (kind error / unavailable)
    note: str | None = None
    command: str | None = None         # what builds or checks it where it can be (another machine)
    runtime: str | None = None
    seconds: float | None = None       # export + check wall time
    runtime_options: dict | None = None  # a runtime precision: the fp32 artifact run with these (-O KEY=VALUE)
    deploy_runtime: str | None = None  # checked here on ``runtime``, deployed on this one: never timed here
    noisy_cv: float | None = None      # the timing's coefficient of variation, where the benchmark calls it noisy

    @property
    def built(self) -> bool:
        return self.kind in BUILT

    @property
    def precision_label(self) -> str:
        """'bf16 (runtime)' for a runtime precision, so that it never reads as a bf16 export."""
        return f"{self.precision} (runtime)" if self.runtime_options else self.precision

    @property
    def label(self) -> str:
        """What names the row in tables and notes: target and precision (one batch per run)."""
        return f"{self.target} {self.precision_label}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExportAllResult:
    rows: list[Row]
    output: Path
    precisions: list[str]
    seconds: float = 0.0
    load_seconds: float = 0.0          # reading the weights (once)
    bench: dict | None = None          # the bench/1 document when timed
    bench_error: str | None = None
    summary_path: Path | None = None
    batch: str = "1"                   # every row's: 1, N or dynamic
    command: str | None = None
    errors: list[MixformerDeployError] = field(default_factory=list, repr=False)

    def counts(self) -> dict:
        out: dict[str, int] = {}
        for r in self.rows:
            if r.kind != "reference":
                out[r.kind] = out.get(r.kind, 0) + 1
        return out

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "failed"]

    def error(self) -> MixformerDeployError | None:
        """What the command exits with after printing: a gate failure (exit 1) if any built artifact failed
        its gate; the error itself if every attempted export raised one; exit 3 if nothing could be built
        here at all; else None (exit 0). Rows that cannot be built here are not failures."""
        if self.failed:
            names = ", ".join(Path(r.artifact).name if r.artifact else f"{r.target} {r.precision}" for r in self.failed)
            return ParityError(f"{len(self.failed)} artifact(s) failed their gate, kept for inspection: {names}")
        attempted = [r for r in self.rows if r.built or r.kind == "error"]
        if attempted and all(r.kind == "error" for r in attempted):
            first = self.errors[0] if self.errors else MixformerDeployError(attempted[0].status)
            return type(first)(f"every export failed; the first: {attempted[0].target} {attempted[0].precision}: "
                               f"{str(first).splitlines()[0] if str(first) else type(first).__name__}")
        if not attempted:
            return MissingBackendError(f"no target can export {', '.join(self.precisions)} here: "
                                       + "; ".join(f"{r.target} {r.precision}: {r.status}" for r in self.rows))
        return None

    @property
    def exit_code(self) -> int:
        e = self.error()
        return 0 if e is None else e.exit_code

    def summary(self) -> dict:
        from .environment import hardware

        hw = hardware()
        out = {"counts": self.counts(), "exit_code": self.exit_code, "seconds": round(self.seconds, 2),
               "load_seconds": round(self.load_seconds, 2), "cpu": hw.get("cpu"), "usable_cpus": hw.get("usable_cpus"),
               "gpus": [g.get("name") or g.get("model") for g in hw.get("gpus") or []],
               "precisions": self.precisions, "batch": self.batch, "output": str(self.output),
               "summary_md": str(self.summary_path) if self.summary_path else None, "command": self.command,
               "bench": None}
        if self.bench is not None or self.bench_error:
            doc = self.bench or {}
            s = doc.get("settings") or {}
            out["bench"] = {"machine": (doc.get("machine") or {}).get("slug"), "threads": s.get("threads"),
                            "device": s.get("device"), "batches": s.get("batches"), "duration_s": s.get("duration_s"),
                            "error": self.bench_error}
        return out

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "rows": [r.to_dict() for r in self.rows], "summary": self.summary()}


# ---------------------------------------------------------------- checks before any weights are read

def known_precisions() -> list[str]:
    """What some target exports, or runs its fp32 artifact at (a runtime precision)."""
    from .backends import all_specs
    seen: dict[str, None] = {}
    for t in all_specs(exporting=True):
        seen.update(dict.fromkeys(t.precisions))
        seen.update(dict.fromkeys(p for p in t.tolerances if runtime_precision(t, p)))
    return list(seen)


def parse_precisions(text: str | Sequence[str] | None) -> list[str]:
    """'fp32,int8' -> ['fp32', 'int8']; a word no target offers is a usage error."""
    if text is None:
        return ["fp32"]
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in str(t).split(",")]
    words = list(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    known = known_precisions()
    bad = [w for w in words if w not in known]
    if bad or not words:
        raise UsageError(f"bad --precision {text if isinstance(text, str) else ','.join(text)!r}: a comma list of "
                         f"{', '.join(known)}")
    return words


def _check_arguments(precisions, img_size, output, calibration, calibration_size, keep_fp32, default_keeps, inputs,
                     accuracy_set, max_accuracy_drop) -> Path:
    """Every usage and input-file error that does not need the weights; returns the output directory."""
    from .data import parse_size
    from .export_api import check_stride
    from .parity import check_input_options
    from .backends import all_specs

    if img_size:
        check_stride(*parse_size(img_size))
    out = Path(output) if output else Path("artifacts")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file: with every target it is a directory")
    reduced = [p for p in precisions if p != "fp32"]
    if (keep_fp32 or not default_keeps) and not reduced:
        raise UsageError("--keep-fp32 / --no-default-keeps apply to reduced precisions, not fp32")
    if "auto" in (keep_fp32 or ()):
        raise UsageError("--keep-fp32 auto searches one target at a time: give --target")
    if calibration is not None:
        if not any(p in t.calibrated for t in all_specs(exporting=True) for p in precisions):
            raise UsageError(f"--calibration applies to calibrated precisions (int8), not {', '.join(precisions)}")
        if not Path(calibration).is_dir():
            raise InputFileError(f"calibration folder not found: {calibration}")
    if calibration_size is not None and calibration_size < 1:
        raise UsageError(f"bad --calibration-size {calibration_size}: at least 1")
    check_input_options(inputs, accuracy_set, max_accuracy_drop)
    return out


def _plan(precisions: list[str], batch: int | None, command) -> list[tuple[object, str, Row | None]]:
    """(target, precision, a row already decided or None = export it), in table order; no weights read.
    A runtime precision's row is ``PENDING`` until the fp32 artifact it runs exists."""
    from .backends import all_specs

    out = []
    for tgt in all_specs(exporting=True):
        status = tgt.status()
        for p in precisions:
            out.append((tgt, p, _plan_row(tgt, p, status, batch, command)))
    return out


def runtime_precision(tgt, precision: str) -> bool:
    """True when ``tgt`` does not export ``precision`` but its runtime executes its fp32 artifact at it: the
    spec judges that precision (a tolerance) and its runner takes a ``precision`` option (OpenVINO's bf16)."""
    from .backends import runner_class

    if precision in tgt.precisions or precision not in tgt.tolerances or "fp32" not in tgt.precisions:
        return False
    try:
        return "precision" in runner_class(tgt.runtime).option_help
    except MixformerDeployError:
        return False


def _plan_row(tgt, p: str, status: dict, batch: int | None, command) -> Row | None:
    """The row decided before any weights are read (not offered, missing extra, unavailable), a PENDING
    runtime precision, or None: export it."""
    from .export_api import target_options_of
    from .backends.exporter import ExportOptions

    at_runtime = runtime_precision(tgt, p)
    if p not in tgt.precisions and not at_runtime:
        return Row(tgt.key, p, "not offered", "not offered", note=offered_note(tgt))
    options = {"precision": p} if at_runtime else None
    exported = "fp32" if at_runtime else p  # what is exported for the row
    if not status.get("installed"):
        return Row(tgt.key, p, "missing extra", "missing extra", runtime_options=options,
                   note=status.get("note") or f'pip install "{CLI}[{tgt.extra}]"',
                   command=f'pip install "{CLI}[{tgt.extra}]" && {command(tgt.key, exported)}')
    if not status.get("can_export", True):
        return Row(tgt.key, p, "unavailable", "not available here", exit_code=MissingBackendError.exit_code,
                   note=status.get("note"), command=command(tgt.key, exported), runtime_options=options)
    try:
        tgt.check(ExportOptions(0, 0, batch, exported, target=target_options_of(tgt, {})))
    except MissingBackendError as e:
        return Row(tgt.key, p, "unavailable", "not available here", exit_code=e.exit_code, note=str(e),
                   command=command(tgt.key, exported), runtime_options=options)
    except UsageError as e:
        return Row(tgt.key, p, "not offered", "not offered", note=str(e))
    return Row(tgt.key, p, PENDING, PENDING, runtime_options=options) if at_runtime else None


def offered_note(tgt) -> str:
    """The note of a precision a target does not export (summary.md folds these into one line)."""
    return f"{tgt.key} exports {', '.join(tgt.precisions)}"


# ---------------------------------------------------------------- the run

def export_all(weights: str | Path | None = None, variant: str | None = None, img_size: str | int | None = None,
               batch: str | int | None = 1, precisions: str | Sequence[str] | None = "fp32",
               output: str | Path | None = None, check: bool | None = None, num_classes: int | None = None,
               inputs: tuple[str, ...] | None = None, keep_fp32: tuple[str, ...] = (), default_keeps: bool = True,
               calibration: str | Path | None = None, calibration_size: int = DEFAULT_CALIBRATION_SIZE,
               accuracy_set: str | Path | None = None, max_accuracy_drop: str | None = None,
               bench: bool = False, bench_policy=None, threads: int | None = None, command: str | None = None,
               progress: Progress | None = None, **export_options) -> ExportAllResult:
    """Export the weights to every target here (each through ``export_api.export``, gated by its parity check),
    optionally time every artifact that runs here against PyTorch eager, and write ``summary.md`` into the
    output directory. Never raises for one target's error (it becomes that row); raises usage and input-file
    errors before any weights are read, and errors of the shared work (reading the weights). The caller
    decides the exit code from ``result.error()``. ``export_options``: more of ``export``'s generic keywords
    (e.g. ``head``, ``out_indices``, ``out_norm``), passed to every export as they are."""
    from .export_api import export, parse_batch
    from .source import load_source, resolve_size

    start = time.perf_counter()
    tick = progress or (lambda text: None)
    words = parse_precisions(precisions)
    n = parse_batch(batch)
    out = _check_arguments(words, img_size, output, calibration, calibration_size, keep_fp32, default_keeps, inputs,
                           accuracy_set, max_accuracy_drop)
    if {"head", "out_indices", "out_norm"} & set(export_options):
        from .export_api import check_head
        check_head(export_options.get("head", "classifier"), export_options.get("out_indices"),
                   bool(export_options.get("out_norm")))
    elsewhere = _Commands(weights, variant, img_size, n, num_classes, out, export_options)
    plan = _plan(words, n, elsewhere.export)

    tick("reading the weights")
    t0 = time.perf_counter()
    source = load_source(weights, variant, num_classes)
    h, w = resolve_size(source, img_size)
    load_s = time.perf_counter() - t0
    shipped = bool(source.weights.get("shipped"))
    result = ExportAllResult([], out, words, load_seconds=load_s, command=command,
                             batch="dynamic" if n is None else str(n))
    job = dict(weights=weights, variant=variant, img_size=f"{h}x{w}", batch=batch, output=out, check=check,
               num_classes=num_classes, inputs=inputs, keep_fp32=tuple(keep_fp32), default_keeps=default_keeps,
               calibration=calibration, calibration_size=calibration_size, accuracy_set=accuracy_set,
               max_accuracy_drop=max_accuracy_drop, source=source, **export_options)
    _export_rows(export, result, plan, job, elsewhere, shipped, tick)
    if bench:
        tick("timing every artifact that runs here against PyTorch eager")
        _bench(result, n or 1, weights, bench_policy, threads, tick)
    result.seconds = time.perf_counter() - start
    from .reports.export_table import write_summary
    result.summary_path = write_summary(result)
    return result


def _export_rows(export, result: ExportAllResult, plan, job: dict, elsewhere: "_Commands", shipped: bool,
                 tick: Progress) -> None:
    """Every planned export, then the runtime precisions (they run the fp32 artifacts just built), each in
    its planned place."""
    todo = sum(1 for _, _, row in plan if row is None or row.kind == PENDING)
    done = 0
    for tgt, p, row in plan:
        if row is None:
            done += 1
            tick(f"{tgt.key} {p} ({done}/{todo})")
            row = _export_one(export, result, tgt, p, elsewhere, shipped, _kwargs_of(job, tgt, p))
        elif row.kind != PENDING:  # a precision not offered is one line of the table's: not a log line too
            log.log(logging.DEBUG if row.kind == "not offered" else logging.INFO, "%s: %s%s", row.label, row.status,
                    f" ({row.note})" if row.note else "")
        result.rows.append(row)
    for i, (tgt, p, row) in enumerate(plan):
        if row is not None and row.kind == PENDING:
            done += 1
            tick(f"{row.label} ({done}/{todo})")
            result.rows[i] = _runtime_row(export, result, tgt, row, elsewhere, shipped, job)


def _kwargs_of(job: dict, tgt, precision: str) -> dict:
    """export()'s keywords for one target and precision: keeps and calibration only where they apply."""
    reduced = precision != "fp32"
    return {**job, "target": tgt.key, "precision": precision,
            "keep_fp32": job["keep_fp32"] if reduced else (),
            "default_keeps": job["default_keeps"] if reduced else True,
            "calibration": job["calibration"] if precision in tgt.calibrated else None}


def _export_one(export, result: ExportAllResult, tgt, precision: str, elsewhere: "_Commands", shipped: bool,
                kwargs: dict) -> Row:
    """One target and precision through export(); one of our errors becomes the row (KeyboardInterrupt and
    bugs are not ours to swallow)."""
    from .backends import runner_class

    t0 = time.perf_counter()
    try:
        res = export(**kwargs)
    except MissingBackendError as e:  # not a failure: something it needs is not here
        row = Row(tgt.key, precision, "unavailable", "not available here", exit_code=e.exit_code,
                  note=str(e), command=elsewhere.export(tgt.key, precision))
    except MixformerDeployError as e:
        result.errors.append(e)
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        row = Row(tgt.key, precision, "error", f"error: {text}", exit_code=e.exit_code, note=text)
    else:
        row = _row_of(res, tgt, precision, shipped, elsewhere)
        if row.kind == "error":
            result.errors.append(res.after.error)
    row.seconds = round(time.perf_counter() - t0, 2)
    if row.runtime is None and row.artifact:
        row.runtime = tgt.runtime_for(Path(row.artifact))
    if row.runtime and row.built and not runner_class(row.runtime).status().get("can_run"):
        row.runtime = None  # nothing here runs it: not timed
    if row.runtime and row.built and row.runtime not in tgt.runners:  # e.g. the TensorRT-ready ONNX
        row.deploy_runtime = tgt.title or tgt.key
    log.info("%s %s: %s (%.1f s)", tgt.key, precision, row.status, row.seconds)
    return row


def _row_of(res, tgt, precision: str, shipped: bool, elsewhere: "_Commands") -> Row:
    m = res.manifest
    row = Row(tgt.key, precision, "passed", "passed", artifact=str(res.path), size_bytes=m.get("size_bytes"),
              runtime=tgt.runtime_for(res.path))
    report = res.parity
    if report is not None:
        _read_parity(row, report, shipped, f"{CLI} parity {shlex.quote(str(res.path))}{elsewhere.weights_flag()}")
        if row.kind == "failed":
            return row
    else:
        recorded = m.get("parity") or {}
        reason = None
        if recorded.get("status") == "not run":  # the runtime cannot run here (why: its status, else the record)
            from .backends import runner_class
            reason = runner_class(row.runtime).status().get("reason") or recorded.get("reason") or "cannot run here"
        row.kind = "exported"
        row.status = f"exported; parity not run: {reason}" if reason else "exported; not checked"
        row.note = f"parity not run here: {reason}" if reason else None  # the check off: the status says it
        row.command = f"{CLI} parity {shlex.quote(str(res.path))}{elsewhere.weights_flag()}"
    if res.after is not None:  # a target's step after publishing (e.g. a second artifact built from this one)
        _read_after(row, res.after, tgt, precision, elsewhere)
    return row


def _read_parity(row: Row, report, shipped: bool, details: str) -> None:
    """The parity report's figures into the row; a failed gate makes it a ``failed`` row with its reason."""
    o = report.overall
    row.max_abs, row.cosine = o.max_abs, o.min_sample_cosine  # a backbone's: its worst feature map's
    row.top1_agreement = None if report.outputs else o.top1_agreement  # feature maps have no classes
    held_out = report.sets.get("dataset")
    if shipped and held_out is not None and held_out.accuracy_reference is not None:
        row.accuracy, row.accuracy_reference = held_out.accuracy_artifact, held_out.accuracy_reference
    if not report.passed:
        row.kind, row.status = "failed", "FAILED"
        where = f" (first diverging stage: {report.first_failing_stage})" if report.first_failing_stage else ""
        row.note = (report.failures[0] if report.failures else "parity failed") + where
        row.command = details


def _read_after(row: Row, after, tgt, precision: str, elsewhere: "_Commands") -> None:
    """A follow-up step into the row. Its lines (TensorRT's trtexec line) are what finishes the row where the
    step can run, so they become the row's command and the error keeps only what is missing: the row is read
    in a table and summary.md, where nothing was printed above it."""
    lines = [line for line in (after.lines or []) if line]
    if after.path is not None:
        row.note = _join(row.note, f"also built {Path(after.path).name}")
    if after.error is None:
        return
    text = str(after.error).splitlines()[0]
    clause = text.split(":", 1)[0] if ":" in text else "its next step is not possible here"
    row.status = f"{row.status}; {clause}"
    row.exit_code = after.error.exit_code
    if isinstance(after.error, MissingBackendError):  # finish it where that exists
        row.note = _join(row.note, text.split("; ")[0] if lines else text)
        row.command = " && ".join(lines) if lines else elsewhere.export(tgt.key, precision)
    else:  # the step itself failed (not something missing here): an error row
        row.note = _join(row.note, text + (f" ({'; '.join(lines)})" if lines else ""))
        row.kind, row.status = "error", f"error: {text}"


def _runtime_row(export, result: ExportAllResult, tgt, row: Row, elsewhere: "_Commands", shipped: bool,
                 job: dict) -> Row:
    """A runtime precision: the target's fp32 artifact (this run's, else exported now) checked with the
    runtime's precision setting. What stops it here (no fp32 artifact that runs here, a CPU without that
    precision) makes it ``not available here`` with the reason; no new export."""
    t0 = time.perf_counter()
    base = next((r for r in result.rows if r.target == tgt.key and r.precision == "fp32" and not r.runtime_options),
                None)
    if base is None:  # fp32 was not asked for: its artifact is what this precision runs
        base = _export_one(export, result, tgt, "fp32", elsewhere, shipped, _kwargs_of(job, tgt, "fp32"))
    out = Row(tgt.key, row.precision, "unavailable", "not available here", artifact=base.artifact,
              size_bytes=base.size_bytes, runtime=base.runtime, runtime_options=row.runtime_options,
              exit_code=MissingBackendError.exit_code, command=elsewhere.export(tgt.key, "fp32"))
    if base.kind not in ("passed", "exported") or not base.runtime:
        out.note = f"runs the fp32 artifact, which here is {base.status}"
        out.seconds = round(time.perf_counter() - t0, 2)
        return out
    flags = "".join(f" -O {k}={v}" for k, v in row.runtime_options.items())
    parity = f"{CLI} parity {shlex.quote(base.artifact)}{flags}{elsewhere.weights_flag()}"
    try:
        if job.get("check") is False:
            _probe(base.artifact, base.runtime, row.runtime_options)
            out.kind, out.status, out.command = "exported", "exported; not checked", parity
        else:
            report = _runtime_parity(base, row, job)
            out.kind, out.status, out.command = "passed", "passed", None
            _read_parity(out, report, shipped, parity)
        out.exit_code = None
    except MissingBackendError as e:  # e.g. this CPU cannot execute bf16: check it where it can
        out.note, out.command = str(e).splitlines()[0], parity
    except MixformerDeployError as e:
        result.errors.append(e)
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        out.kind, out.status, out.exit_code, out.note = "error", f"error: {text}", e.exit_code, text
    out.seconds = round(time.perf_counter() - t0, 2)
    log.info("%s: %s (%.1f s)", out.label, out.status, out.seconds)
    return out


def _runtime_parity(base: Row, row: Row, job: dict):
    """The fp32 artifact's parity report, run with the row's runtime options (judged at that precision)."""
    from .parity import check_parity

    opts = ", ".join(f"{k}={v}" for k, v in row.runtime_options.items())
    return check_parity(base.artifact, weights_model=job["source"], inputs=job.get("inputs"),
                        runtime=base.runtime, runtime_options=dict(row.runtime_options),
                        accuracy_set=job.get("accuracy_set"), max_accuracy_drop=job.get("max_accuracy_drop"),
                        display_name=f"{Path(base.artifact).name} ({opts})")


def _probe(artifact: str, runtime: str, options: dict) -> None:
    """Open the artifact with the runtime options and close it: the runtime says whether it can (unchecked)."""
    from .backends import open_runner

    open_runner(artifact, runtime, "cpu", None, options).close()


class _Commands:
    """The command lines that finish a row on another machine, with the same generic options."""

    def __init__(self, weights, variant, img_size, batch, num_classes, output, more: dict | None = None):
        self.weights, self.variant, self.img_size, self.batch = weights, variant, img_size, batch
        self.num_classes, self.output, self.more = num_classes, output, dict(more or {})

    def weights_flag(self) -> str:
        return f" --weights {shlex.quote(str(self.weights))}" if self.weights is not None else ""

    def export(self, target: str, precision: str) -> str:
        args = [CLI, "export", "--target", target, "--precision", precision]
        if self.weights is not None:
            args += ["--weights", str(self.weights)]
        elif self.variant and str(self.variant).lower() != "auto":
            args += ["--variant", str(self.variant)]
            if self.num_classes:
                args += ["--num-classes", str(self.num_classes)]
        if self.img_size:
            args += ["--img-size", str(self.img_size)]
        if self.batch != 1:
            args += ["--batch", "dynamic" if self.batch is None else str(self.batch)]
        for key, value in self.more.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                args += [flag] if value else []
            elif value is not None:
                args += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
        return " ".join(shlex.quote(a) for a in args)


# ---------------------------------------------------------------- timing

def _bench(result: ExportAllResult, batch: int, weights, policy, threads, tick: Progress) -> None:
    """Every built artifact that runs here on its own runtime (not a failed one, not a stand-in) and PyTorch
    eager, in ONE interleaved run. A subject whose worker fails is dropped with a note and the rest are
    timed again."""
    from .bench import Policy, benchmark_subjects, reference_subject

    policy = policy or Policy(warmup_s=DEFAULT_BENCH_WARMUP_S, duration_s=DEFAULT_BENCH_DURATION_S)
    rows = [r for r in result.rows if r.kind in ("passed", "exported") and r.runtime and r.artifact
            and not r.deploy_runtime]  # a stand-in runtime's time is not the deployed runtime's: not timed
    if not rows:
        result.bench_error = "nothing built here runs here: not timed"
        log.warning("%s", result.bench_error)
        return
    subjects = _subjects(rows, threads)
    try:
        ref = reference_subject(next(iter(subjects.values())), weights) if subjects else None
    except MixformerDeployError as e:
        result.bench_error = f"the PyTorch reference cannot be timed: {one_line(e, 200)}"
        log.warning("%s", result.bench_error)
        return
    doc = None
    while subjects:
        order = [r for r in rows if id(r) in subjects]
        try:
            doc = benchmark_subjects([subjects[id(r)] for r in order] + [ref], [batch], policy, floor=False,
                                     progress=lambda f, text: tick(f"timing: {text} {f:.0%}"))
            break
        except MixformerDeployError as e:
            text = str(e)
            culprit = next((r for r in order if text.startswith(subjects[id(r)].name + ":")), None)
            if culprit is None:  # the reference or the machinery: nothing to drop
                result.bench_error = f"timing failed: {one_line(e, 300)}"
                log.warning("%s", result.bench_error)
                return
            culprit.note = _join(culprit.note, f"not timed: {text.splitlines()[0]}")
            log.warning("not timing %s: %s", culprit.artifact, text.splitlines()[0])
            del subjects[id(culprit)]
    if doc is None:
        result.bench_error = "no artifact could be timed"
        return
    result.bench = doc
    _read_times(result, rows, subjects, doc, policy)


def _subjects(rows: list[Row], threads) -> dict:
    """id(row) -> its bench subject, with its runtime options; a runtime precision's subject is named after
    its setting (it is the same file as its fp32 row's). A row that cannot be a subject gets a note."""
    from .bench import artifact_subject

    subjects = {}
    for r in rows:
        try:
            subject = artifact_subject(r.artifact, r.runtime, "cpu", threads, r.runtime_options)
        except MixformerDeployError as e:
            r.note = _join(r.note, f"not timed: {one_line(e, 200)}")
            continue
        if r.runtime_options:
            subject = replace(subject, name=subject.name + "".join(f" ({k}={v})" for k, v in r.runtime_options.items()))
        subjects[id(r)] = subject
    return subjects


def _read_times(result: ExportAllResult, rows: list[Row], subjects: dict, doc: dict, policy) -> None:
    """The bench document's p50 and speed-up into each timed row, and PyTorch eager's as the reference row."""
    by_name = {r["artifact"]: r for r in doc["results"]}
    for r in rows:
        res = by_name.get(subjects[id(r)].name) if id(r) in subjects else None
        if res is None:
            continue
        r.p50_ms = res["latency_ms"]["p50"]
        r.speedup = 1 / res["ratio_to_reference"] if res.get("ratio_to_reference") else None
        r.noisy_cv = _noisy_cv(res, policy)
    ref_res = next((x for x in doc["results"] if x.get("role") == "reference"), None)
    if ref_res is not None:
        note = "PyTorch eager float32 of the same weights, what every row is checked and timed against"
        result.rows.append(Row("pytorch", "fp32", "reference", "reference (eager)", p50_ms=ref_res["latency_ms"]["p50"],
                               speedup=1.0, runtime="torch", note=note, noisy_cv=_noisy_cv(ref_res, policy)))


def _noisy_cv(res: dict, policy) -> float | None:
    """The timing's CV where it is above the benchmark's noise limit (the table says: compare with care)."""
    cv = res.get("cv")
    return cv if cv is not None and cv > policy.noise_cv else None


def _join(a: str | None, b: str) -> str:
    return f"{a}; {b}" if a else b
