"""The results page (`lesft bench accuracy --report`) from cells made up here: its verdicts
and the controls' paired contrasts are derived from the cells' per-question results."""
from pathlib import Path

from bench.experiments import stats_json, stats_rows
from bench.results import render
from lesft.config import build_config

QUESTIONS = 40


def cell(method: str, seed: int, right: int) -> dict:
    """A cell whose first ``right`` questions are answered correctly."""
    return {"method": method, "dataset": "synthetic", "seed": seed,
            "per_question": [1] * right + [0] * (QUESTIONS - right), "train_s": 1.0, "train_tokens": 100}


def page(rows: list[dict], names: list[str], seeds: list[int]) -> str:
    stats, _ = stats_rows(rows, names, seeds, "splitlora")
    cfg = build_config(cli={"model": "arch:tiny-qwen2"}, env={})
    return render(Path("cells"), rows, {"synthetic": stats_json(stats)}, names=names, seeds=seeds,
                  baseline="splitlora", limit=QUESTIONS, max_new_tokens=8, cfg=cfg)


def test_the_page_contrasts_kd_with_its_smoothing_control_and_the_frozen_teacher():
    seeds = [0, 1]
    rows = [cell("splitlora", s, 10) for s in seeds] + [cell("kd", s, 30) for s in seeds] + \
        [cell("smooth", s, 10) for s in seeds] + [cell("kd-base", s, 30) for s in seeds]
    text = page(rows, ["splitlora", "kd", "smooth", "kd-base"], seeds)
    assert "- Beat splitlora (paired 95% interval above 0): kd (+50.0 points" in text
    assert ("- kd against its label-smoothing control (same lambda), which tells the teacher's information from "
            "plain smoothing: kd - smooth = +50.0 points") in text
    assert "above 0 (paired over seeds 0, 1)" in text
    assert ("the live teacher (the adapters being trained) against the frozen base model: kd - kd-base = "
            "+0.0 points [+0.0, +0.0], contains 0") in text


def test_a_contrast_pairs_only_the_seeds_both_methods_finished():
    rows = [cell("splitlora", s, 10) for s in (0, 1, 2)] + [cell("kd", s, 20) for s in (0, 1, 2)] + \
        [cell("smooth", 1, 20)]
    text = page(rows, ["splitlora", "kd", "smooth"], [0, 1, 2])
    assert "kd - smooth = +0.0 points [+0.0, +0.0], contains 0 (paired over seeds 1)." in text
    assert "kd - kd-base" not in text  # no kd-base cell: no line
