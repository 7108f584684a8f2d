"""The latency regression gate: is the new p50 slower than the baseline's beyond a threshold, beyond noise?

Why a block bootstrap: two runs of the same build never give the same median, and samples within one
round (a burst of back-to-back iterations) share that moment's machine state, so they are not
independent. Resampling whole rounds of each run (seeded, so the verdict is reproducible) gives a
confidence interval of the ratio of medians new/old that does not pretend to more evidence than there is;
a regression is declared only when even the interval's lower bound exceeds 1 + threshold.
Why the fingerprint check: timings from another machine say nothing about this change, so a baseline
from another machine fingerprint gives a warning and no verdict.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .errors import InputFileError, UsageError

log = logging.getLogger(__name__)

MAX_SAMPLES = 4000     # larger runs are subsampled (seeded): the interval only gets slightly wider
CHUNK = 250            # bootstrap resamples per vectorized step (bounds memory)


def parse_threshold(text: str | float) -> float:
    """'10%' -> 0.10; '10' -> 0.10 (a value above 1 is a percentage); '0.1' -> 0.10 (a fraction)."""
    s = str(text).strip()
    percent = s.endswith("%")
    try:
        value = float(s.rstrip("%").strip())
    except ValueError:
        raise UsageError(f"bad --max-regression {text!r}: use e.g. 10%, 10 or 0.1") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"bad --max-regression {text!r}: must be a non-negative number")
    return value / 100 if percent or value > 1 else value


def _blocks(samples, sizes) -> list[np.ndarray]:
    """Split raw samples into their rounds; without round sizes (older results) each sample is a block."""
    a = np.asarray(samples, dtype=np.float64)
    if not sizes or sum(sizes) != a.size:
        return [a[i:i + 1] for i in range(a.size)]
    return np.split(a, np.cumsum(sizes)[:-1])


def _resampled_medians(blocks: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    if all(b.size == 1 for b in blocks):  # plain bootstrap, vectorized
        a = np.concatenate(blocks)
        if a.size > MAX_SAMPLES:
            a = rng.choice(a, MAX_SAMPLES, replace=False)
        out = []
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            out.append(np.median(a[rng.integers(0, a.size, (m, a.size))], axis=1))
        return np.concatenate(out)
    picks = rng.integers(0, len(blocks), (n, len(blocks)))
    return np.array([np.median(np.concatenate([blocks[i] for i in row])) for row in picks])


def bootstrap_ratio(new, old, resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                    new_rounds=None, old_rounds=None) -> dict:
    """Ratio of medians new/old with a percentile block-bootstrap interval (two-sided, ``confidence``):
    whole rounds are resampled (``*_rounds``: the sizes of the rounds the samples came in)."""
    rng = np.random.default_rng(seed)
    new, old = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    if new.size == 0 or old.size == 0:
        raise ValueError("bootstrap needs samples on both sides")
    r = (_resampled_medians(_blocks(new, new_rounds), resamples, rng)
         / _resampled_medians(_blocks(old, old_rounds), resamples, rng))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(r, [tail, 100 - tail])
    return {"ratio": float(np.median(new) / np.median(old)), "low": float(low), "high": float(high),
            "confidence": confidence, "resamples": resamples, "seed": seed,
            "blocks": "rounds" if new_rounds and old_rounds else "samples"}


def row_key(row: dict) -> tuple:
    """What makes two rows the same measurement: variant, input size, batch, precision, runtime (and the
    torch form, so the deploy form is never compared with the reference form)."""
    return (row.get("variant"), tuple(row.get("input_size") or ()), row.get("batch"), row.get("precision"),
            row.get("runtime"), row.get("form"))


def _match(row: dict, baseline_rows: list[dict]) -> dict | None:
    same = [b for b in baseline_rows if row_key(b) == row_key(row)]
    return next((b for b in same if b.get("artifact") == row.get("artifact")), same[0] if same else None)


def compare(current: dict, baseline: dict, threshold: float, seed: int = 0) -> dict:
    """Each current row against its baseline row; verdict "regressed", "ok" or "no verdict"."""
    same_machine = current["machine"]["slug"] == baseline["machine"]["slug"]
    warnings = []
    if not same_machine:
        warnings.append(f"baseline is from another machine ({baseline['machine']['slug']}, this is "
                        f"{current['machine']['slug']}): no verdict, timings are not comparable across machines")
    rows, regressed = [], []
    for r in current["results"]:
        b = _match(r, baseline["results"])
        entry = {"artifact": r["artifact"], "batch": r["batch"], "key": list(map(str, row_key(r))),
                 "p50_ms": r["latency_ms"]["p50"], "baseline_p50_ms": None, "ratio": None, "low": None,
                 "high": None, "status": "no baseline"}
        if b is not None:
            ci = bootstrap_ratio(r["samples_ms"], b["samples_ms"], seed=seed, new_rounds=r.get("round_sizes"),
                                 old_rounds=b.get("round_sizes"))
            entry.update(baseline_p50_ms=b["latency_ms"]["p50"], ratio=ci["ratio"], low=ci["low"], high=ci["high"],
                         status="other machine" if not same_machine else
                         "regressed" if ci["low"] > 1 + threshold else "faster" if ci["high"] < 1 else "ok")
            if entry["status"] == "regressed":
                regressed.append(entry)
        rows.append(entry)
    if all(e["status"] == "no baseline" for e in rows):
        wanted = "; ".join(sorted({"/".join(e["key"]) for e in rows}))
        have = "; ".join(sorted({"/".join(map(str, row_key(b))) for b in baseline["results"]})) or "none"
        raise InputFileError(f"the baseline does not fit this run: no baseline row matches (variant/input "
                             f"size/batch/precision/runtime/form) {wanted}; the baseline has {have}")
    unjudged = [f"{e['artifact']} batch {e['batch']}" for e in rows if e["status"] == "no baseline"]
    if unjudged:  # others matched, so the baseline fits: these few are reported, not silently passed
        warnings.append(f"no baseline row for {', '.join(unjudged)}: not judged")
    verdict = "no verdict" if not same_machine else "regressed" if regressed else "ok"
    for w in warnings:
        log.warning("%s", w)
    return {"threshold": threshold, "same_machine": same_machine, "baseline_machine": baseline["machine"]["slug"],
            "baseline_created": baseline.get("created"), "verdict": verdict, "rows": rows, "warnings": warnings,
            "messages": [regression_message(e, threshold) for e in regressed]}


def regression_message(entry: dict, threshold: float) -> str:
    """One line saying by how much, e.g. 'x.onnx batch 1: p50 10.0 -> 21.0 ms (+110%, 95% CI +101..+119%)'."""
    pct = lambda v: f"{(v - 1) * 100:+.0f}%"  # noqa: E731
    return (f"{entry['artifact']} batch {entry['batch']}: p50 {entry['baseline_p50_ms']:.3g} -> "
            f"{entry['p50_ms']:.3g} ms ({pct(entry['ratio'])}, 95% CI {pct(entry['low'])}..{pct(entry['high'])}) "
            f"beyond the allowed +{threshold * 100:.3g}%")
