"""The embedded generator: reproducible, disjoint splits, correct arithmetic."""

import re
from collections import Counter

import pytest

from lesft.data import KINDS, DataError, answer_sentence, generate_synthetic, load_examples

_EQUATION = re.compile(r"(\d+)([+\-*/])(\d+)=(\d+)")


def evaluate(equation: str) -> tuple[int, int, int]:
    """Check one terse equation ``a op b = c`` with ints; returns (a, b, c)."""
    m = _EQUATION.fullmatch(equation)
    assert m, f"not a binary integer equation: {equation!r}"
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    if op == "/":
        assert b != 0 and a % b == 0, equation
        expected = a // b
    else:
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
    assert expected == c, f"wrong arithmetic: {equation!r}"
    return a, b, c


def terse_of(x_ref: str) -> list[str]:
    line = next(line for line in x_ref.splitlines() if line.startswith("Reference solution: "))
    return line.removeprefix("Reference solution: ").split("; ")


@pytest.fixture(scope="module")
def problems():
    return generate_synthetic(1000, seed=0)


def test_same_arguments_give_identical_output():
    assert generate_synthetic(200, seed=3) == generate_synthetic(200, seed=3)
    assert generate_synthetic(200, seed=3) != generate_synthetic(200, seed=4)
    # a smaller request is a prefix of a larger one
    assert generate_synthetic(50, seed=3) == generate_synthetic(200, seed=3)[:50]


def test_splits_are_disjoint():
    train = {e.x for e in generate_synthetic(2000, seed=0, split="train")}
    test = {e.x for e in generate_synthetic(500, seed=0, split="test")}
    dev = {e.x for e in generate_synthetic(500, seed=0, split="dev")}
    assert len(train) == 2000 and len(test) == 500 and len(dev) == 500
    assert not train & test and not train & dev and not dev & test


def test_arithmetic_is_correct_and_chained(problems):
    for ex in problems:
        equations = terse_of(ex.x_ref)
        assert 2 <= len(equations) <= 3, ex
        question_numbers = {int(v) for v in re.findall(r"\d+", ex.x.split("\nReference")[0])}
        results: set[int] = set()
        for eq in equations:
            a, b, c = evaluate(eq)
            # operands come from the question, earlier steps, or "twice" (perimeter)
            assert {a, b} <= question_numbers | results | {2}, (eq, ex.x)
            assert max(a, b, c) < 1000
            results.add(c)
        assert str(c) == ex.answer
        # every terse equation appears worded in the target chain
        for eq in equations:
            a, op, b, c = _EQUATION.fullmatch(eq).groups()
            assert f"{a} {op} {b} = {c}" in ex.y


def test_record_shape(problems):
    for ex in problems[:100]:
        assert ex.x.startswith("Question: ") and ex.x.endswith("\nAnswer:")
        assert ex.x_ref.endswith(f"\nReference answer: {ex.answer}\nAnswer:")
        assert ex.y.startswith(" ") and not ex.y.startswith("  ")
        assert ex.y.endswith(answer_sentence(ex.answer)) and "\n" not in ex.y
        assert ex.uid.startswith("synthetic-train-0-") and ex.dataset == "synthetic"
    assert len({ex.uid for ex in problems}) == len(problems)


def test_every_kind_present(problems):
    counts = Counter(ex.kind for ex in problems)
    assert set(counts) == set(KINDS) and len(KINDS) >= 6
    assert min(counts.values()) > 50


def test_kinds_filter_and_errors():
    only = generate_synthetic(40, seed=1, kinds=["ages", "recipe"])
    assert {ex.kind for ex in only} == {"ages", "recipe"}
    with pytest.raises(DataError, match="Unknown synthetic kind"):
        generate_synthetic(5, kinds=["poetry"])
    with pytest.raises(DataError, match="Unknown split"):
        generate_synthetic(5, split="validation")


def test_load_examples_synthetic_styles():
    default = load_examples("synthetic", "test", n=20, seed=2)
    assert default == generate_synthetic(20, seed=2, split="test")
    answer_only = load_examples("synthetic", "test", n=20, seed=2, ref_style="answer")
    assert all("Reference solution" not in e.x_ref for e in answer_only)
    assert [e.y for e in answer_only] == [e.y for e in default]
    assert len(load_examples("synthetic")) == 1000


def test_easy_level_two_steps_three_kinds_small_factors():
    easy = load_examples("synthetic_easy", "train", n=1000, seed=0)
    assert load_examples("synthetic_easy", "train", n=1000, seed=0) == easy
    assert Counter(e.kind for e in easy).keys() == {"boxes", "gift", "share"}
    assert all(e.dataset == "synthetic_easy" and e.uid.startswith("synthetic_easy-train-") for e in easy)
    for ex in easy:
        equations = terse_of(ex.x_ref)
        assert len(equations) == 2, ex
        a, b, c = evaluate(equations[0])  # the first step multiplies two numbers of the question
        assert equations[0].split("=")[0].count("*") == 1 and 2 <= a <= 12 and 2 <= b <= 12
        _, _, answer = evaluate(equations[1])
        assert ex.answer == str(answer) and ex.y.endswith(answer_sentence(ex.answer))
    test = {e.x for e in load_examples("synthetic_easy", "test", n=300)}
    assert len(test) == 300 and not test & {e.x for e in easy}
    assert not test & {e.x for e in generate_synthetic(300, seed=0, split="test")}  # another task


def test_demo_config_trains_lesft_nlft_on_the_easy_level():
    from pathlib import Path

    from lesft.config import build_config, load_toml

    cfg = build_config(cli=load_toml(Path(__file__).parents[2] / "configs" / "demo.toml"), env={})
    assert (cfg.train.method, cfg.loss.loss, cfg.data.dataset) == ("lesft", "nlft", "synthetic_easy")
    assert cfg.run.note  # the summary says why this loss
