"""Seeded grids: the statistics of bench/stats.py, the method-variant table, and resuming a
grid with seeds (the train-and-evaluate step is a stub here; the CLI test on a tiny model
is in test_bench_runs.py)."""

import json
import math

import numpy as np
import pytest

from bench import stats
from bench.experiments import VARIANTS, Cell, cell_config, resolve_method, run_grid
from lesft.config import Config


def test_mean_std_is_the_sample_statistic():
    assert stats.mean_std([0.1, 0.2, 0.3]) == pytest.approx((0.2, 0.1))
    assert stats.mean_std([0.4]) == (0.4, 0.0)


def test_paired_bootstrap_on_a_known_case():
    # 400 pairs: the method is right where the baseline is, plus 40 more questions.
    base = np.array([1] * 100 + [0] * 300)
    method = base.copy()
    method[100:140] = 1
    diff, lo, hi = stats.paired_bootstrap(method, base)
    assert diff == pytest.approx(0.10)
    # d is 1 on 40 of 400 units: bootstrap sd = sqrt(0.1 * 0.9 / 400) = 0.015
    sd = math.sqrt(0.1 * 0.9 / 400)
    assert lo == pytest.approx(0.10 - 1.96 * sd, abs=0.006)
    assert hi == pytest.approx(0.10 + 1.96 * sd, abs=0.006)
    assert lo > 0
    # unpaired, the same accuracies would give an interval about twice as wide
    ulo, uhi = stats.bootstrap_mean_ci(method)
    blo, bhi = stats.bootstrap_mean_ci(base)
    assert (hi - lo) < 0.5 * ((uhi - ulo) + (bhi - blo))


def test_paired_bootstrap_is_deterministic_and_checks_sizes():
    a, b = np.array([1, 0, 1, 1, 0]), np.array([0, 0, 1, 0, 1])
    assert stats.paired_bootstrap(a, b) == stats.paired_bootstrap(a, b)
    with pytest.raises(ValueError):
        stats.paired_bootstrap(a, b[:3])


def _row(method, seed, correct):
    return {"method": method, "seed": seed, "per_question": list(correct), "dataset": "synthetic",
            "accuracy": sum(correct) / len(correct)}


def test_method_equal_to_baseline_gives_zero_difference():
    rng = np.random.default_rng(1)
    rows = []
    for s in (0, 1, 2):
        v = rng.integers(0, 2, size=50).tolist()
        rows += [_row("splitlora", s, v), _row("copy", s, v)]
    got = {st.method: st for st in stats.method_stats(rows, ["splitlora", "copy"], [0, 1, 2], baseline="splitlora")}
    st = got["copy"]
    assert st.diff == 0.0 and st.diff_low <= 0.0 <= st.diff_high
    assert st.beats_baseline is None
    assert st.diff_values == [0.0, 0.0, 0.0]
    assert st.mean == pytest.approx(got["splitlora"].mean)


def test_method_stats_per_seed_values_mean_std_and_seedless_base():
    rows = [_row("splitlora", 0, [1, 0, 0, 0]), _row("splitlora", 1, [1, 1, 0, 0]),
            _row("kd", 0, [1, 1, 1, 0]), _row("kd", 1, [1, 1, 1, 1]),
            _row("base", None, [0, 0, 0, 1])]
    got = {st.method: st for st in stats.method_stats(rows, ["base", "splitlora", "kd"], [0, 1],
                                                       baseline="splitlora")}
    kd = got["kd"]
    assert kd.seeds == [0, 1] and kd.values == [0.75, 1.0]
    assert kd.mean == pytest.approx(0.875) and kd.std == pytest.approx(math.sqrt(0.03125))
    assert kd.diff == pytest.approx(0.5) and kd.diff_values == [0.5, 0.5]
    assert kd.n_pairs == 8 and kd.ci_low <= kd.mean <= kd.ci_high
    base = got["base"]  # one untrained cell pairs with every seed
    assert base.values == [0.25] and base.std == 0.0 and base.n_pairs == 8
    assert base.diff == pytest.approx(0.25 - 0.375)


def test_method_stats_uses_the_seeds_a_method_has():
    rows = [_row("splitlora", 0, [1, 0]), _row("splitlora", 1, [0, 0]), _row("kd", 1, [1, 1])]
    (kd,) = stats.method_stats(rows, ["kd"], [0, 1], baseline="splitlora")
    assert kd.seeds == [1] and kd.diff == pytest.approx(1.0)


def test_variants_resolve_to_method_lesft_with_their_overrides():
    assert resolve_method("splitlora") == ("splitlora", {})
    assert resolve_method("kd-base") == ("lesft", {"loss": "kd", "ref_teacher": "base"})
    assert resolve_method("power")[1]["power_alpha"] == 1.0
    assert set(VARIANTS) >= {"nlft", "kd", "kd-base", "smooth", "kd-smooth", "excess", "power"}


def test_cell_seed_sets_training_and_data_seed(tmp_path):
    c = cell_config(Config(), Cell("splitlora", {"dataset": "synthetic"}, seed=3), tmp_path)
    assert (c.train.seed, c.data.data_seed, c.train.method) == (3, 3, "splitlora")
    keys = {Cell("kd", {"dataset": "synthetic"}, seed=s).key for s in (0, 1)}
    assert len(keys) == 2
    # a seedless cell keeps the key it had before seeds existed (old grids still resume)
    assert "seed" not in Cell("splitlora", {"dataset": "synthetic"}).key


def test_grid_with_seeds_resumes_without_recomputing(tmp_path):
    calls = []

    def fake_run(cfg, cell, out_dir, **kw):  # stands in for train + evaluate
        calls.append(cell.key)
        if cell.key == "boom":
            raise RuntimeError
        correct = [(i + (cell.seed or 0)) % 2 for i in range(6)]
        return {"key": cell.key, "method": cell.method, "seed": cell.seed, "per_question": correct,
                "accuracy": sum(correct) / 6}

    cells = [Cell("base", {"dataset": "synthetic"})] + [Cell(m, {"dataset": "synthetic"}, seed=s)
                                                        for m in ("splitlora", "kd") for s in (0, 1, 2)]
    seen = []
    first = run_grid(Config(), cells[:4], tmp_path, run=fake_run, progress=lambda c, r, cached: seen.append(cached))
    assert len(calls) == 4 and seen == [False] * 4
    calls.clear()
    seen.clear()
    rows = run_grid(Config(), cells, tmp_path, run=fake_run, progress=lambda c, r, cached: seen.append(cached))
    assert calls == [c.key for c in cells[4:]]  # only the unfinished cells ran
    assert seen == [True] * 4 + [False] * 3 and rows[:4] == first
    stored = json.loads((tmp_path / "cells" / f"{cells[1].key}.json").read_text())
    assert stored["per_question"] == [0, 1, 0, 1, 0, 1]
    calls.clear()
    assert len(run_grid(Config(), cells, tmp_path, run=fake_run, finished_only=True)) == 7 and not calls


def test_grid_refuses_cells_evaluated_otherwise(tmp_path):
    from lesft.config import ConfigError

    def fake_run(cfg, cell, out_dir, **kw):
        return {"key": cell.key, "method": cell.method, "n": kw["limit"], "max_new_tokens": kw["max_new_tokens"],
                "per_question": [1] * kw["limit"], "accuracy": 1.0}

    cells = [Cell("splitlora", {"dataset": "synthetic"}, seed=0)]
    run_grid(Config(), cells, tmp_path, run=fake_run, limit=4, max_new_tokens=8)
    run_grid(Config(), cells, tmp_path, run=fake_run, limit=4, max_new_tokens=8)  # same evaluation: reused
    with pytest.raises(ConfigError, match="--limit 4"):
        run_grid(Config(), cells, tmp_path, run=fake_run, limit=5, max_new_tokens=8)
