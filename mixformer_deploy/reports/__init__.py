"""Reports: the benchmark JSON schema (bench_json), Markdown and HTML pages, PNG plots; parity as JUnit XML
(junit). Each format is one module; nothing heavy is imported here."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError


def write_bench_report(docs: list[dict], output: str | Path) -> tuple[Path, dict[str, Path]]:
    """One Markdown (.md) or HTML (.html) report of benchmark results, with its PNG plots written beside it
    as ``<stem>-latency.png`` etc. Returns the report's path and the plots' paths."""
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".md", ".html", ".htm"):
        raise UsageError(f"--output {output.name}: the report is Markdown (.md) or HTML (.html)")
    from .plots import report_plots
    plots = report_plots(docs, output.parent, output.stem)
    relative = {caption: p.name for caption, p in plots.items()}
    if suffix == ".md":
        from .markdown import bench_markdown
        text = bench_markdown(docs, relative)
    else:
        from .html import bench_html
        text = bench_html(docs, relative)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text)
    tmp.replace(output)
    return output, plots
