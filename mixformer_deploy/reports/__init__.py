"""Reports: the benchmark JSON schema (bench_json), Markdown and HTML pages, PNG plots; parity as JUnit XML
(junit). Each format is one module; nothing heavy is imported here."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError


def write_bench_report(docs: list[dict], output: str | Path) -> tuple[Path, dict[str, Path]]:
    """One Markdown (.md) report with its PNG plots written beside it (``<stem>-latency.png`` etc.), or one
    self-contained HTML (.html) file with the plots embedded as data. Returns the report's path and the
    paths of the plot files written (none for HTML)."""
    import tempfile

    from .plots import report_plots

    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".md", ".html", ".htm"):
        raise UsageError(f"--output {output.name}: the report is Markdown (.md) or HTML (.html)")
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".md":
        from .markdown import bench_markdown
        plots = report_plots(docs, output.parent, output.stem)
        text = bench_markdown(docs, {caption: p.name for caption, p in plots.items()})
    else:
        from .html import bench_html
        with tempfile.TemporaryDirectory() as work:
            text = bench_html(docs, report_plots(docs, Path(work), output.stem))
        plots = {}
    from ..artifact import atomic_file

    with atomic_file(output) as tmp:
        tmp.write_text(text)
    return output, plots
