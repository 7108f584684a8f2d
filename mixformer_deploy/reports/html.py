"""Benchmark results as one self-contained HTML page (plots embedded as PNG data), from the same sections as
the Markdown report, its text rendered as HTML (not literal Markdown)."""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path

from .markdown import INTRO, sections

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
         "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}")


def _inline(text: str) -> str:
    """The little Markdown our texts use (*emphasis*, `code`) as HTML; everything else escaped."""
    html = escape(str(text))
    html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", html)


def _table(headers, rows) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _comparison(table: dict) -> list[str]:
    """The fleet's comparison table (reports.fleet.comparison) with its explanation."""
    from .fleet import COMPARISON_INTRO

    return ["<h2>Machines side by side</h2>", f"<p>{_inline(COMPARISON_INTRO)}</p>",
            _table(table["headers"], table["rows"])]


def render_html(secs: list[dict], plots: dict[str, Path] | None = None,
                title: str = "MixFormer latency report", comparison: dict | None = None) -> str:
    """The report page: intro, the comparison table when given, one section per machine, embedded plots."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1><p>{_inline(INTRO)}</p>"]
    parts += _comparison(comparison) if comparison else []
    for s in secs:
        parts.append(f"<h2>{escape(s['title'])}</h2>")
        parts.append(_table(["", ""], s["facts"]))
        parts.append(_table(s["headers"], s["rows"]))
        if s.get("regression"):
            r = s["regression"]
            parts.append(f"<h3>Regression gate: {escape(r['verdict'])} (threshold "
                         f"+{r['threshold'] * 100:.3g}%, baseline {escape(r['baseline'])})</h3>")
            parts.append(_table(*r["table"]))
            parts += [f"<p>{_inline(m)}</p>" for m in r["messages"]]
        if s["notes"]:
            parts.append("<p>Warnings:</p><ul>" + "".join(f"<li>{_inline(n)}</li>" for n in s["notes"]) + "</ul>")
    for caption, path in (plots or {}).items():
        data = base64.b64encode(Path(path).read_bytes()).decode()
        parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{escape(caption)}'>"
                     f"<figcaption>{escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def bench_html(docs: list[dict], plots: dict[str, Path] | None = None) -> str:
    """The page for one or several documents; several also get the comparison table (see bench_markdown)."""
    from .fleet import comparison

    return render_html(sections(docs), plots, comparison=comparison(docs) if len(docs) > 1 else None)
