"""The targets table of README.md and docs/index.md, generated from the backends' specs, so that the table
users read is what the code declares. CI runs ``--check``: a table that drifted from the specs fails and
prints the command that regenerates it.

    python -m mixformer_deploy.reports.targets_table          # rewrite the tables in place
    python -m mixformer_deploy.reports.targets_table --check  # exit 1 when a table is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

START, END = "<!-- targets-table:start -->", "<!-- targets-table:end -->"
ROOT = Path(__file__).resolve().parents[2]
FILES = ("README.md", "docs/index.md")
COMMAND = "python -m mixformer_deploy.reports.targets_table"


def table() -> str:
    """One row per backend: name, key, artifact, precisions, what runs here, where it was verified."""
    from ..backends import ALIASES, all_specs

    rows = ["| target | key | artifact | precisions | runs here | verified where |", "|---|---|---|---|---|---|"]
    for s in all_specs():
        artifact = f"`{s.suffix}/`" if s.is_dir else (f"`{s.suffix}`" if s.suffix else "a weights file")
        key = f"`{s.key}`" + "".join(f" (`{a}`)" for a, k in ALIASES.items() if k == s.key)
        rows.append(f"| [{s.title or s.key}](docs/backends/{s.key}.md) | {key} | {artifact} | "
                    f"{', '.join(s.precisions)} | {s.runs_here or '-'} | {s.verified or '-'} |")
    return "\n".join(rows)


def render(text: str, name: str) -> str:
    """``text`` with the table between the markers replaced (links relative to the file's folder)."""
    body = table() if name == "README.md" else table().replace("](docs/", "](")
    head, sep, rest = text.partition(START)
    if not sep or END not in rest:
        raise SystemExit(f"{name}: no {START} ... {END} markers")
    return f"{head}{START}\n{body}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str]) -> int:
    stale = []
    for name in FILES:
        path = ROOT / name
        old = path.read_text()
        new = render(old, name)
        if new != old:
            stale.append(name)
            if "--check" not in argv:
                path.write_text(new)
    if stale and "--check" in argv:
        print(f"stale targets table in {', '.join(stale)}: run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
