"""Parity as JUnit XML, the format CI systems (GitLab, Jenkins, GitHub test reporters) render as tests.

One testsuite "parity". The pass rule is split into testcases whose failures add up to the gate exactly:
one per input set for the max-abs bound (applied per input, each against its own max|r|, so the whole
fails iff a set does), one for the per-input cosine (the worst input's), one for the margin-gated top-1
agreement. A failure quotes the worst input's own error against that input's own bound, and the
observed figures (max|a-r| and the rtol it implies at atol 0) instead of a tolerance to loosen.
"""

from __future__ import annotations

import json
import socket
import xml.etree.ElementTree as ET
from pathlib import Path


def _g(v, spec: str = ".3g") -> str:
    """Numbers for messages; None is a non-finite value (NaN/Inf) in the report."""
    return "non-finite" if v is None else format(v, spec)


def _testcase(suite: ET.Element, classname: str, name: str, failure: str | None, details: str,
              stages: str) -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
    if failure:
        ET.SubElement(case, "failure", message=failure, type="ParityFailure").text = stages or failure
    ET.SubElement(case, "system-out").text = details


def _stage_lines(d: dict) -> str:
    if not d.get("stages"):
        return ""
    lines = [f"first diverging stage: {d.get('first_failing_stage') or 'none'} "
             f"(stage tolerance: relative L2 > {_g(d.get('stage_tolerance'))})"]
    lines += [f"  {s['name']:<10} relative L2 {_g(s['rel_l2'])}  cosine {_g(s['cosine'], '.6f')}  "
              f"max abs {_g(s['max_abs'])}{'  <- diverged' if s['diverged'] else ''}" for s in d["stages"]]
    return "\n".join(lines)


def _cases(d: dict) -> list[tuple[str, str | None, str]]:
    """(name, failure message or None, metrics text) for every testcase."""
    tol, overall = d["tolerance"], d["overall"]
    where = f"; first diverging stage: {d['first_failing_stage']}" if d.get("first_failing_stage") else ""
    cases = []
    for name, m in d["sets"].items():
        worst = m.get("worst_input_name") or f"input {m['worst_input']}"
        failure = None if m["max_abs_ok"] else (
            f"max|a-r| {_g(m['worst_abs'])} > {_g(m['bound'])} on {worst} (atol {tol['atol']:g} + rtol "
            f"{tol['rtol']:g} x its max|r| {_g(m['max_ref_abs'])}); observed: max|a-r| {_g(m['max_abs'])}, "
            f"implying rtol {_g(m['implied_rtol'])} at atol 0{where}")
        cases.append((f"logits within tolerance on {name} ({m['count']} inputs)", failure, json.dumps(m, indent=2)))
    cos_fail = None if overall["cosine_ok"] else (
        f"per-input cosine {_g(overall['min_sample_cosine'], '.8f')} < {tol['min_cosine']:g} (worst input; "
        f"pooled cosine {_g(overall['cosine'], '.8f')}){where}")
    cases.append((f"cosine of each input >= {tol['min_cosine']:g}", cos_fail,
                  f"cosine {overall['cosine']}; min per-input {overall['min_sample_cosine']}"))
    top1_fail = None if overall["top1_ok"] else (
        f"top-1 differs on {overall['gated_disagreements']} of {overall['gated']} inputs whose reference margin "
        f"exceeds {_g(overall['bound'])}{where}")
    cases.append(("top-1 agreement (inputs with a clear reference margin)", top1_fail,
                  f"top-1 agreement {overall['top1_agreement']:.4f} ({overall['top1_disagreements']} of "
                  f"{overall['count']} differ, {overall['gated_disagreements']} of {overall['gated']} gated); "
                  f"top-5 agreement {overall['top5_agreement']:.4f}"))
    return cases


def build_junit(report) -> ET.ElementTree:
    """The XML tree of a ParityReport (or its to_dict())."""
    d = report.to_dict() if hasattr(report, "to_dict") else report
    cases = _cases(d)
    failures = sum(1 for _, f, _ in cases if f)
    seconds = float(d.get("seconds") or 0.0)
    attrs = dict(tests=str(len(cases)), failures=str(failures), errors="0", skipped="0", time=f"{seconds:.3f}")
    root = ET.Element("testsuites", name="mixformer-deploy", **attrs)
    suite = ET.SubElement(root, "testsuite", name="parity", timestamp=d.get("created") or "",
                          hostname=socket.gethostname(), **attrs)
    props = ET.SubElement(suite, "properties")
    runtime = d.get("runtime") or {}
    for key, value in (("artifact", d["artifact"]), ("runtime", runtime.get("runtime")),
                       ("device", runtime.get("device")), ("precision", runtime.get("precision")),
                       ("reference", (d.get("reference") or {}).get("source")),
                       ("atol", d["tolerance"]["atol"]), ("rtol", d["tolerance"]["rtol"]),
                       ("min_cosine", d["tolerance"]["min_cosine"]),
                       ("first_failing_stage", d.get("first_failing_stage"))):
        if value is not None:
            ET.SubElement(props, "property", name=key, value=str(value))
    classname = f"parity.{Path(d['artifact']).name}"
    stages = _stage_lines(d)
    for name, failure, details in cases:
        _testcase(suite, classname, name, failure, details, stages)
    if d.get("warnings"):
        ET.SubElement(suite, "system-err").text = "\n".join(d["warnings"])
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(report, path: str | Path) -> Path:
    """Write the JUnit XML to ``path`` atomically (a temporary name, then rename), so CI never reads half."""
    from ..artifact import atomic_file

    with atomic_file(path) as tmp:
        build_junit(report).write(tmp, encoding="utf-8", xml_declaration=True)
    return Path(path)
