"""``--keep-fp32 auto``: the smallest float32 set that makes a reduced-precision artifact pass its gate.

Why this way: the default keeps (every LayerNorm, the attention logits, pool and head) cost speed that a
given model may not need, and which modules matter is a property of the weights. The per-block error
curve of ``debug`` says which places add the most error, so the search starts from no keeps and only pays
an export for sets the curve suggests:

1. export with no keeps (the user's globs only) and gate it; done if it passes;
2. probe its block curve (one export) and rank the places by the error each adds; probe the top block's
   branches (one export) and take its two worst;
3. export with those and the second-ranked place kept, and gate it;
4. if it passes, try without the second-ranked place (cheap backends); if it fails, add the next two;
5. export the set found (the artifact, with the search in its manifest).

At most ``MAX_EXPORTS`` exports of the backend, probes and the final one included.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GateError, UsageError

log = logging.getLogger(__name__)

AUTO = "auto"
MAX_EXPORTS = 6
HEAD_MODULES = ("last_proj", "head")


@dataclass
class _Search:
    kwargs: dict                        # export()'s arguments (source loaded once)
    globs: tuple[str, ...]              # the user's own --keep-fp32 patterns: always kept
    folder: Path
    exports: int = 0
    steps: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    case: object = None                 # the first export as debug sees it (both probes share it)
    entering: dict = field(default_factory=dict)   # block-curve point -> the error entering it


def check_auto(spec, precision: str) -> None:
    """auto only where a runtime here computes the reduced precision the gate would judge."""
    if precision != "int8":
        raise UsageError(f"--keep-fp32 auto: {spec.key} {precision} is computed in float32 by every runtime here "
                         "(onnxruntime's CPU provider runs float16 graphs in float32; OpenVINO and LiteRT decompress "
                         "float16 weights), so no set can be judged: use int8, or explicit --keep-fp32 globs")
    if not spec.runner_class().status().get("can_run"):
        raise UsageError(f"--keep-fp32 auto: {spec.runtime} cannot run here to judge a set; use explicit globs")


def export_auto(export_fn, spec, kwargs: dict) -> object:
    """The search, then the export of the set found (see the module docstring). A target whose int8 needs
    float LayerNorm inputs (``spec.int8_float_norms``: TensorRT) starts from every LayerNorm kept."""
    globs = tuple(g for g in kwargs["keep_fp32"] if g != AUTO)
    if spec.int8_float_norms:
        globs += tuple(_layer_norms(kwargs))
    with tempfile.TemporaryDirectory(prefix="mixformer-keeps-") as tmp:
        s = _Search(kwargs, globs, Path(tmp))
        found, passed = _search(s, export_fn, spec)
    record = {"method": "auto", "passed": passed, "found": found, "exports": s.exports + 1,
              "steps": s.steps, "probes": s.probes}
    flags = " ".join(["--no-default-keeps", *(f"--keep-fp32 {g}" for g in globs + tuple(found))])
    log.info("keep-fp32 auto: %s in %d exports; the same without the search: %s",
             f"{len(found)} module(s) kept" if passed else "no set passed", s.exports + 1, flags)
    result = export_fn(**{**kwargs, "keep_fp32": globs + tuple(found), "default_keeps": False,
                          "keep_search": {**record, "flags": flags}})
    if not passed and result.passed:
        log.warning("keep-fp32 auto: the final export passed where its search step failed")
    if not result.passed:
        raise GateError(f"--keep-fp32 auto: no set passed the gate in {s.exports + 1} exports; best found: "
                        f"{flags} ({_step_line(_best(s.steps))})")
    return result


def _layer_norms(kwargs: dict) -> list[str]:
    """Every LayerNorm of the deploy form, by name (what a target that needs them float must keep)."""
    from torch import nn

    from .deploy import to_deploy
    from .source import resolve_size

    source = kwargs["source"]
    deploy = to_deploy(source.model, resolve_size(source, kwargs["img_size"]))
    return [n for n, m in deploy.named_modules() if isinstance(m, nn.LayerNorm)]


def _search(s: _Search, export_fn, spec) -> tuple[list[str], bool]:
    first = _try(s, export_fn, [])
    if first["passed"]:
        return [], True
    places = _ranked_places(s, first["artifact"])
    top = _modules_of(s, first["artifact"], places[0])
    second = [m for p in places[1:2] for m in _modules_of(s, None, p)]
    step = _try(s, export_fn, top + second)
    if step["passed"]:
        if second and spec.export_cost == "cheap" and s.exports < MAX_EXPORTS - 1:
            smaller = _try(s, export_fn, top)
            if smaller["passed"]:
                return top, True
        return top + second, True
    more = [m for p in places[2:4] for m in _modules_of(s, None, p)]
    if more and s.exports < MAX_EXPORTS - 1:
        last = _try(s, export_fn, top + second + more)
        if last["passed"]:
            return top + second + more, True
    return _best(s.steps)["keeps"], False


def _try(s: _Search, export_fn, keeps: list[str]) -> dict:
    """One gated export of a candidate set (into the search's folder)."""
    out = s.folder / f"step{len(s.steps)}"
    result = export_fn(**{**s.kwargs, "keep_fp32": s.globs + tuple(keeps), "default_keeps": False,
                          "output": out, "check": True})
    s.exports += 1
    p = result.parity
    step = {"keeps": list(keeps), "passed": result.passed,
            "rel_l2": None if p is None else p.overall.rel_l2,
            "failure": None if p is None or p.passed else (p.failures or ["failed"])[0]}
    s.steps.append(step)
    log.info("keep-fp32 auto: step %d, %d kept: %s", len(s.steps), len(keeps), _step_line(step))
    return {**step, "artifact": named_as_exported(result.path)}


def _step_line(step: dict) -> str:
    err = "-" if step["rel_l2"] is None else f"rel L2 {step['rel_l2']:.3g}"
    return f"{err}, {'passed' if step['passed'] else 'failed: ' + str(step['failure'])}"


def _best(steps: list[dict]) -> dict:
    return min(steps, key=lambda st: (not st["passed"], st["rel_l2"] if st["rel_l2"] is not None else 1e9))


def named_as_exported(path: Path) -> Path:
    """A gated export that failed is kept as ``<name>.failed``: give it its name back to probe it."""
    from .artifact import sidecar_path

    if not path.name.endswith(".failed"):
        return path
    good = path.with_name(path.name[:-len(".failed")])
    shutil.move(str(path), str(good))
    if sidecar_path(path).exists():
        shutil.move(str(sidecar_path(path)), str(sidecar_path(good)))
    return good


def _case(s: _Search, artifact: Path):
    """The first export's artifact as ``debug`` sees it (built once, shared by both probes)."""
    from .debug import open_case

    if s.case is None:
        calibration = s.kwargs.get("calibration")
        s.case = open_case(artifact, s.kwargs.get("weights"), None, None, calibration, {}, None, 4, [])
    return s.case


def _curve(s: _Search, case, points: list[str]) -> tuple[list[float], list[float]]:
    """(each point's rel L2, each output's) from one probe export."""
    from .debug import finite_rel_l2, probe_points

    with tempfile.TemporaryDirectory(dir=s.folder) as tmp:
        try:
            got, want = probe_points(case, points, Path(tmp))
        finally:
            s.exports += 1
    n = len(got) - len(points)
    return ([finite_rel_l2(a, r) for a, r in zip(got[n:], want[n:])],
            [finite_rel_l2(a, r) for a, r in zip(got[:n], want[:n])])


def _ranked_places(s: _Search, artifact: Path) -> list[str]:
    """Block boundaries (stem, blocks, merges) and the head, by the error each adds, largest first."""
    from .debug import entering_errors
    from .probe import block_points

    case = _case(s, artifact)
    points = block_points(case.reference_deploy)
    errors, outputs = _curve(s, case, points)
    entering = entering_errors(errors)
    s.entering = dict(zip(points, entering))
    added = [(p, e - before) for p, e, before in zip(points, errors, entering)]
    added.append(("head", max(outputs) - errors[-1]))
    ranked = sorted(added, key=lambda t: -t[1])
    s.probes.append({"probe": "blocks", "added": [[p, float(f"{a:.3g}")] for p, a in ranked]})
    return [p for p, _ in ranked]


def _modules_of(s: _Search, artifact: Path | None, place: str) -> list[str]:
    """The modules to keep for a place: the head's GEMMs, a stem or merge whole, and for a block its two
    worst branches when a branch probe is affordable (the top place), else the whole block."""
    if place == "head":
        return list(HEAD_MODULES)
    if not place.startswith("stages.") or artifact is None:
        return [place]
    from .probe import branch_points

    case = _case(s, artifact)
    branches = branch_points(case.reference_deploy, place)
    errors, _ = _curve(s, case, branches)
    before = s.entering.get(place, 0.0)
    ranked = sorted(zip(branches, errors), key=lambda t: -(t[1] - before))
    s.probes.append({"probe": place, "added": [[b, float(f"{e - before:.3g}")] for b, e in ranked]})
    return [b.removesuffix(".logits") for b, _ in ranked[:2]]
