"""Two exports of the same weights with the same options give the same bytes, with SOURCE_DATE_EPOCH set:
the second one in another process (another pid for the temporary names, another hash seed) with another
thread count (the manifest inside carries a measured error; except where the plan says why the thread count
is part of the artifact), through the CLI as users run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import EPOCH, artifact_bytes, backends, costly, plan_of, run_cli


def _option_flags(options: dict) -> list[str]:
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [] if value is False else [flag, str(value)]
    return flags


@pytest.mark.parametrize("spec", backends("reproducible", slow=costly))
def test_two_exports_give_the_same_bytes(spec, exported, weights_of, tmp_path):
    first = exported(spec).path           # in this process, one torch thread
    plan = plan_of(spec)
    threads = "1" if plan.threads_shape_bytes else "2"
    r = run_cli("-q", "export", "--target", spec.key, "--weights", weights_of(spec), "--img-size", plan.size,
                "--no-check", "--output", tmp_path, *_option_flags(plan.target_options),
                env={"SOURCE_DATE_EPOCH": EPOCH, "OMP_NUM_THREADS": threads, "PYTHONHASHSEED": "7"})
    assert r.code == 0, r.stderr[-800:]
    second = Path(r.stdout.strip().splitlines()[-1])
    assert second.name == first.name
    a, b = artifact_bytes(spec, first), artifact_bytes(spec, second)
    assert sorted(a) == sorted(b), "not the same files"
    assert [name for name in a if a[name] != b[name]] == [], "files that differ"
