"""Benchmark results as Markdown: one section per machine (timings are never compared across machines),
each with its environment, a results table and its warnings. ``sections()`` is the format-neutral
content that the HTML report renders too."""

from __future__ import annotations

MIB = 2 ** 20
HEADERS = ("Artifact", "Runtime", "Precision", "Batch", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "CV",
           "images/s", "speed-up", "floor ms", "floor / p50", "peak RSS MiB", "size MiB")
# "speed-up": p50 of the reference (PyTorch eager float32) over this row's p50 when the reference ran, else
# the first artifact's p50 over this row's; higher is faster. One column, one meaning.


def _f(v, spec: str = ".3g", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def machine_key(doc: dict) -> str:
    return doc["machine"]["slug"]


def series_name(row: dict, machine: str | None = None) -> str:
    """A result's subject in plots: artifact, runtime and precision (and its machine when several)."""
    name = f"{row['artifact']} [{row['runtime']} {row['precision']}]"
    return f"{machine}: {name}" if machine else name


def speedup(row: dict) -> tuple[float | None, str]:
    """Speed-up against the reference when one ran, else against the first artifact (1 / p50 ratio)."""
    if row.get("ratio_to_reference"):
        return 1 / row["ratio_to_reference"], "reference"
    if row.get("ratio_to_first"):
        return 1 / row["ratio_to_first"], "first artifact"
    return None, ""


def _sizes(doc: dict) -> dict:
    return {a["name"]: a.get("size_bytes") for a in doc["artifacts"]}


def result_row(r: dict, size: int | None) -> list[str]:
    lat = r["latency_ms"]
    up, base = speedup(r)
    return [r["artifact"], r["runtime"] + (f" ({r['form']})" if r.get("form") else ""), r["precision"],
            str(r["batch"]), _f(lat["p50"]), _f(lat["p90"]), _f(lat["p99"]), _mean_std(lat),
            _f(r["cv"], ".0%"), _f(r["throughput_ips"], ".4g"),
            _f(up, ".2f", f"× vs {'ref' if base == 'reference' else 'first'}"), _f(r.get("floor_ms")), _f(r.get("floor_fraction"), ".0%"),
            _f(r["peak_rss_bytes"] / MIB if r.get("peak_rss_bytes") else None, ".0f"),
            _f(size / MIB if size else None, ".1f")]


def _mean_std(lat: dict) -> str:
    if lat.get("mean") is None:
        return "–"
    return f"{lat['mean']:.3g}" + (f" ± {lat['std']:.2g}" if lat.get("std") is not None else "")


def _run(doc: dict) -> str:
    """How the rows were timed: our own policy, or (a phone over adb) the device tool's run and warm-up counts."""
    s = doc["settings"]
    if "warmup_s" in s:
        return (f"{doc['created']}, device {s['device']}, warm-up {s['warmup_s']} s, >= {s['duration_s']} s and "
                f">= {s['min_iters']} iterations per row")
    return (f"{doc['created']}, device {s['device']}, timed by {s.get('timer') or 'the device tool'}: "
            f"{s.get('runs', '?')} runs after {s.get('warmup', '?')} warm-up")


def _facts(group: list[dict]) -> list[tuple[str, str]]:
    """The machine's facts (from its first document) and how each of its runs was timed."""
    doc = group[0]
    env = doc["environment"]
    gpu = env.get("gpu")
    backends = ", ".join(f"{k} {v}" for k, v in env["backends"].items() if v)
    facts = [("CPU", f"{env['cpu_model']} (usable cores: {env.get('cores') or '?'}, threads used: {env['threads']})"),
             ("GPU", f"{gpu['model']} (driver {gpu.get('driver') or '?'})" if gpu else "–"),
             ("OS / Python", f"{env['os']} / {env.get('python') or '–'}"), ("Backends", backends or "–"),
             ("mixformer-deploy", env["tool_version"]), ("Run", "; ".join(dict.fromkeys(_run(d) for d in group)))]
    replayed = [p for p in (d.get("provenance") for d in group)
                if isinstance(p, dict) and p.get("kind", "replayed") != "measured"]
    if replayed:  # never let a replayed tool output pass for a measurement
        facts.insert(0, ("Source", "; ".join(dict.fromkeys(
            f"{p.get('kind', 'replayed')}: {p.get('note') or 'not a measurement'}" for p in replayed))))
    m = (doc.get("floor") or {}).get("matmul")
    if m:
        facts.append(("float32 matmul", f"{m['gflops']:.1f} GFLOP/s ({m['n']}x{m['n']}, threads: {m['threads']}, "
                                        f"{m['device']}): the FLOP floor's denominator"))
    return facts


def _regression_table(reg: dict) -> tuple[list[str], list[list[str]]]:
    pct = lambda v: "–" if v is None else f"{(v - 1) * 100:+.1f}%"  # noqa: E731
    headers = ["Artifact", "Batch", "baseline p50 ms", "p50 ms", "change", "95% CI", "status"]
    rows = [[e["artifact"], str(e["batch"]), _f(e["baseline_p50_ms"]), _f(e["p50_ms"]), pct(e["ratio"]),
             "–" if e["low"] is None else f"{pct(e['low'])} .. {pct(e['high'])}", e["status"]] for e in reg["rows"]]
    return headers, rows


def sections(docs: list[dict]) -> list[dict]:
    """One section per machine fingerprint: title, facts, results table, notes, optional regression."""
    groups: dict[str, list[dict]] = {}
    for d in docs:
        groups.setdefault(machine_key(d), []).append(d)
    out = []
    for slug, group in groups.items():
        rows, notes = [], []
        for d in group:
            sizes = _sizes(d)
            rows += [result_row(r, sizes.get(r["artifact"])) for r in d["results"]]
            notes += d["warnings"]
        sec = {"title": slug, "facts": _facts(group), "headers": list(HEADERS), "rows": rows,
               "notes": list(dict.fromkeys(notes))}
        reg = next((d["regression"] for d in group if d.get("regression")), None)
        if reg:
            sec["regression"] = {"verdict": reg["verdict"], "threshold": reg["threshold"],
                                 "baseline": reg["baseline_machine"], "table": _regression_table(reg),
                                 "messages": reg["messages"] + reg["warnings"]}
        out.append(sec)
    return out


def _table(headers, rows) -> list[str]:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, headers)) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]


INTRO = ("Latency in milliseconds (p50/p90/p99 over every timed iteration, each `run` + device sync), "
         "throughput in images/s, memory and sizes in MiB. *speed-up* is the p50 of PyTorch eager float32 (or, "
         "when it did not run, of the first artifact) over this row's p50, in the same run and batch "
         "(interleaved, so both saw the same machine): higher is faster; *floor* is 2 x MACs over "
         "this machine's measured float32 matmul rate. Never compare timings across machines.")


def render_markdown(secs: list[dict], plots: dict[str, str] | None = None,
                    title: str = "MixFormer latency report", comparison: str | None = None) -> str:
    """The report: intro, the fleet comparison (Markdown from reports.fleet) when given, one section per machine."""
    lines = [f"# {title}", "", INTRO, ""] + ([comparison] if comparison else [])
    for s in secs:
        lines += [f"## {s['title']}", "", *_table(["", ""], [[k, v] for k, v in s["facts"]]), "",
                  *_table(s["headers"], s["rows"]), ""]
        if s.get("regression"):
            r = s["regression"]
            lines += [f"### Regression gate: {r['verdict']} (threshold +{r['threshold'] * 100:.3g}%, "
                      f"baseline {r['baseline']})", "", *_table(*r["table"]), ""]
            lines += [f"- {m}" for m in r["messages"]] + ([""] if r["messages"] else [])
        if s["notes"]:
            lines += ["Warnings:", ""] + [f"- {n}" for n in s["notes"]] + [""]
    for caption, path in (plots or {}).items():
        lines += [f"![{caption}]({path})", ""]
    return "\n".join(lines)


def bench_markdown(docs: list[dict], plots: dict[str, str] | None = None) -> str:
    """Markdown for one or several result documents (merged by machine); several documents also get the
    comparison table with a row per (machine, artifact), which one document's section already is."""
    from .fleet import comparison_markdown

    return render_markdown(sections(docs), plots, comparison=comparison_markdown(docs) if len(docs) > 1 else None)
