"""Statistics of a seeded accuracy grid: per-method mean / std over seeds and the paired
bootstrap of a method's difference to a baseline.

Every trained cell stores ``per_question``: one 0/1 per evaluation question, in question
order. The evaluation questions are the same for every seed and method (the grid's
settings fix them), so two methods' results pair up on ``(seed, question)``: the unit
of the paired bootstrap is one such pair, and resampling pairs keeps both methods'
outcomes on it together. A cell that is not trained (``base``) has one vector, which
pairs with every seed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


@dataclass
class MethodStats:
    """One method over seeds: the seeds' accuracies, their mean and sample std, and a
    bootstrap 95% interval of the mean over ``(seed, question)`` pairs."""

    method: str
    seeds: list[int]
    values: list[float]
    mean: float
    std: float
    ci_low: float
    ci_high: float
    n_pairs: int
    diff: float | None = None  # paired difference to the baseline (mean over pairs)
    diff_low: float | None = None
    diff_high: float | None = None
    diff_values: list[float] = field(default_factory=list)  # per seed
    diff_seeds: list[int] = field(default_factory=list)  # the seeds it pairs over: those both finished

    @property
    def beats_baseline(self) -> bool | None:
        """True when the whole 95% interval of the difference lies above 0, False when
        it lies below, None when it contains 0 (or there is no baseline)."""
        if self.diff_low is None or self.diff_high is None:
            return None
        if self.diff_low > 0:
            return True
        if self.diff_high < 0:
            return False
        return None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def bootstrap_mean_ci(x: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the units ``x`` (resampled with
    replacement, ``resamples`` times, with a fixed generator: the same data give the
    same interval)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // x.size)  # bounded memory for large grids
    for s in range(0, resamples, chunk):
        k = min(chunk, resamples - s)
        idx = rng.integers(0, x.size, size=(k, x.size))
        means[s:s + k] = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, **kwargs) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired units and its bootstrap 95% interval."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in size: {a.size} vs {b.size}")
    d = a - b
    lo, hi = bootstrap_mean_ci(d, **kwargs)
    return float(d.mean()) if d.size else math.nan, lo, hi


def _vectors(rows: Sequence[Mapping], method: str) -> dict[int | None, list[int]]:
    """``seed -> per_question`` of one method's cells (``None`` for a seedless cell)."""
    out: dict[int | None, list[int]] = {}
    for r in rows:
        if r.get("method") == method and r.get("per_question") is not None:
            out[r.get("seed")] = [int(v) for v in r["per_question"]]
    return out


def _stack(vecs: Mapping[int | None, list[int]], seeds: Sequence[int]) -> np.ndarray | None:
    """Rows = seeds (a seedless vector repeats for each), columns = questions."""
    if None in vecs:
        return np.array([vecs[None]] * len(seeds))
    if any(s not in vecs for s in seeds):
        return None
    return np.array([vecs[s] for s in seeds])


def method_stats(rows: Sequence[Mapping], methods: Sequence[str], seeds: Sequence[int],
                 baseline: str | None = None, resamples: int = BOOTSTRAP_RESAMPLES) -> list[MethodStats]:
    """Statistics of each method over the ``seeds`` it has finished cells for; the paired
    difference to ``baseline`` over the seeds both have (questions must match)."""
    vecs = {m: _vectors(rows, m) for m in set(methods) | ({baseline} if baseline else set())}
    out = []
    for m in methods:
        v = vecs[m]
        done = list(seeds) if None in v else [s for s in seeds if s in v]
        if not done:
            continue
        mat = _stack(v, done)
        accs = [float(row.mean()) for row in mat]
        lo, hi = bootstrap_mean_ci(mat, resamples=resamples)
        if None in v:  # one untrained cell: the same result for every seed
            st = MethodStats(m, [], accs[:1], accs[0], 0.0, lo, hi, int(mat.size))
        else:
            mean, std = mean_std(accs)
            st = MethodStats(m, done, accs, mean, std, lo, hi, int(mat.size))
        if baseline:
            common = [s for s in done if s in vecs[baseline] or None in vecs[baseline]]
            base_mat = _stack(vecs[baseline], common) if common else None
            own = _stack(v, common) if common else None
            if base_mat is not None and own is not None and base_mat.shape == own.shape:
                st.diff, st.diff_low, st.diff_high = paired_bootstrap(own, base_mat, resamples=resamples)
                st.diff_values = [float(a.mean() - b.mean()) for a, b in zip(own, base_mat)]
                st.diff_seeds = common
        out.append(st)
    return out
