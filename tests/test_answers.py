"""Tests for lesft.answers: extraction rules, normalisation, scoring, Wilson interval."""

import math

import pytest

from lesft.answers import (
    CHOICE_DATASETS,
    NUMERIC_DATASETS,
    extract_answer,
    is_correct,
    normalize_number,
    truncate_continuation,
    wilson_interval,
)

NUMERIC_CASES = [
    # the training target's own sentence
    (" Natalia sold 48/2 = 24 clips in May. 48+24 = 72. The answer is 72.", "72"),
    ("The answer is 72", "72"),
    ("the answer is: 18", "18"),
    ("Answer: 18", "18"),
    ("#### 18", "18"),
    ("so the answer is $1,234.50", "1234.5"),
    ("The final answer is 18", "18"),
    ("The answer is: **42**", "42"),
    ("The answer is \\boxed{7}", "7"),
    # FIRST answer sentence wins over later numbers and later answer sentences
    ("The answer is 5. Then 5 + 3 = 8. The answer is 8.", "5"),
    ("The answer is 18 dollars, since 9 * 2 = 18 and 4 is left.", "18"),
    # an answer marker with no number right after it is not an answer sentence
    ("The answer is the sum of 5 and 3, which is 8.", "8"),
    # no answer sentence: the LAST number
    ("She has 3 apples and buys 4 more, so 7", "7"),
    ("Total: 3 + 4 = 7.", "7"),
    ("He pays 18 dollars", "18"),
    ("It costs $2.50 in total", "2.5"),
    # trailing period is not part of the number
    ("so it is 18.", "18"),
    ("The answer is 18.00.", "18"),
    # negatives: a sign only where it cannot be a binary minus
    ("The answer is -3.", "-3"),
    ("The temperature fell to -12", "-12"),
    ("5-3 = 2", "2"),
    ("The answer is -$5", "-5"),
    # thousands separators only in valid positions
    ("The answer is 5,000,000.", "5000000"),
    ("The answer is 1,000.", "1000"),
    ("The answer is 1,23", "1"),  # "1,23" reads as the numbers 1 and 23
    ("the list is 1,23", "23"),
    ("counts 1,2345", "2345"),
    ("items 1,2,3", "3"),
    # decimals and fractions
    ("The answer is 0.5", "0.5"),
    ("The answer is 3/4", "0.75"),
    ("The answer is 48/2 = 24", "24"),
    # cut at the prompt restart: the invented next example is ignored
    (" 3 + 4 = 7.\nQuestion: Tom has 99 apples. Answer: 99", "7"),
    (" 3 + 4 = 7\n\nQuestion 2 Tom has 99", "7"),
    (" 3 + 4 = 7\nQ: Tom has 99", "7"),
    (" So 7. Question: Tom has 99", "7"),
    (" 7<|endoftext|>99", "7"),
    # nothing reliable
    ("I do not know.", None),
    ("", None),
    ("\nQuestion: 5 apples", None),
]


@pytest.mark.parametrize("text,expected", NUMERIC_CASES)
def test_extract_numeric(text, expected):
    assert extract_answer(text, "gsm8k") == expected
    assert extract_answer(text, "synthetic") == expected


CHOICE_CASES = [
    ("The answer is C.", "C"),
    ("The answer is C", "C"),
    ("so the answer is (C)", "C"),
    ("answer is (C).", "C"),
    ("the answer is (c)", "C"),
    ("the answer is c.", "C"),
    ("Answer: C", "C"),
    ("**Answer:** D", "D"),
    ("the correct answer is C.", "C"),
    ("The answer is option C", "C"),
    ("The answer is: E", "E"),
    ("The answer is A.", "A"),
    ("The answer is A because doors revolve.", "A"),
    ("The answer is C bank", "C"),
    ("Revolving doors are in banks. The answer is B.", "B"),
    # the continuation itself opens with the letter (the prompt ended with "Answer:")
    (" C", "C"),
    (" C.", "C"),
    (" C) bank", "C"),
    (" (C) bank", "C"),
    (" A", "A"),
    (" A. bank", "A"),
    (" C. Because (A) and (B) are wrong", "C"),
    # "option C" anywhere
    ("I would pick option C here", "C"),
    ("choice (b) fits best", "B"),
    # a single labelled letter
    ("Banks use them, so (D) fits", "D"),
    ("Banks use them.\nD) bank", "D"),
    # first answer sentence wins
    ("The answer is B. Wait, the answer is C.", "B"),
    # article "A" / words are not option letters
    ("A revolving door is convenient for security.", None),
    ("A person would go to the bank.", None),
    ("The answer is A person at the bank.", None),
    ("the answer is a good one", None),
    ("You can answer a question by reading.", None),
    (" B and C are both places.", None),
    ("Apples are red.", None),
    # restating the options is not an answer
    (" (A) bank (B) library (C) mall", None),
    ("(A) is wrong and (C) is right", None),
    # cut at the prompt restart
    (" Banks use them.\nQuestion: Where? (A) x\nAnswer: A", None),
    (" The answer is D.\nQuestion: x\nThe answer is A.", "D"),
    ("", None),
]


@pytest.mark.parametrize("text,expected", CHOICE_CASES)
def test_extract_choice(text, expected):
    assert extract_answer(text, "commonsenseqa") == expected
    assert extract_answer(text, "aqua_rat") == expected


def test_truncate_continuation_keeps_text_without_restart():
    text = " 48/2 = 24. The answer is 72."
    assert truncate_continuation(text) == text
    assert truncate_continuation(text + "\nQuestion: next") == text


@pytest.mark.parametrize(
    "s,expected",
    [
        ("1,234", "1234"),
        ("$18", "18"),
        ("18.00", "18"),
        ("-3", "-3"),
        ("2.50", "2.5"),
        ("18.", "18"),
        (" 72 ", "72"),
        ("5,000,000", "5000000"),
        ("1,234.50", "1234.5"),
        ("-$5", "-5"),
        ("$-5", "-5"),
        ("+7", "7"),
        ("50%", "50"),
        (".5", "0.5"),
        ("0.000", "0"),
        ("-0", "0"),
        ("100", "100"),  # never exponent form
        ("1/2", "0.5"),
        ("-3/4", "-0.75"),
        ("6/3", "2"),
        ("1/3", None),  # no exact decimal form
        ("1/0", None),
        ("1,23", None),
        ("12,34,567", None),
        ("18 dollars", None),
        ("1 2", None),
        ("abc", None),
        ("", None),
        ("1e5", None),
    ],
)
def test_normalize_number(s, expected):
    assert normalize_number(s) == expected


@pytest.mark.parametrize(
    "pred,gold,dataset,expected",
    [
        ("18.0", "18", "gsm8k", True),
        ("1,000", "1000", "gsm8k", True),
        ("$18", "18", "synthetic", True),
        ("18.0000001", "18", "gsm8k", True),  # within 1e-6
        ("18.00001", "18", "gsm8k", False),
        ("17", "18", "gsm8k", False),
        ("-18", "18", "gsm8k", False),
        ("5000000", "5,000,000", "gsm8k", True),
        ("123456789012345678", "123456789012345679", "gsm8k", False),  # no float rounding
        (None, "18", "gsm8k", False),
        ("abc", "18", "gsm8k", False),
        ("C", "C", "commonsenseqa", True),
        ("c", "C", "commonsenseqa", True),
        ("(C)", "C", "aqua_rat", True),
        ("B", "C", "aqua_rat", False),
        (None, "C", "aqua_rat", False),
        ("F", "F", "aqua_rat", False),  # not an option letter
    ],
)
def test_is_correct(pred, gold, dataset, expected):
    assert is_correct(pred, gold, dataset) is expected


def test_extract_then_score_round_trip():
    pred = extract_answer(" 600 * 2 = 1,200. The answer is $1,200.", "gsm8k")
    assert pred == "1200"
    assert is_correct(pred, "1200", "gsm8k")


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset"):
        extract_answer("The answer is 3", "mmlu")
    with pytest.raises(ValueError, match="unknown dataset"):
        is_correct("3", "3", "mmlu")


def test_dataset_families_are_disjoint():
    assert not set(NUMERIC_DATASETS) & set(CHOICE_DATASETS)


# Reference bounds: roots of (1 + z^2/n) p^2 - (2 p_hat + z^2/n) p + p_hat^2 = 0,
# computed by hand with 50-digit decimals (an independent form of the closed form).
@pytest.mark.parametrize(
    "k,n,lo,hi",
    [
        (0, 10, 0.0, 0.27754016876661657611836781874927754),
        (5, 10, 0.23658959361548727144488377527040657, 0.76341040638451272855511622472959343),
        (10, 10, 0.72245983123338342388163218125072245, 1.0),
        (41, 50, 0.69203680545297392592680452595693970, 0.90229917267546207894675049469623554),
        (0, 1, 0.0, 0.79345670852610707204230006609385327),
        (1, 1, 0.20654329147389292795769993390614673, 1.0),
        (7, 200, 0.017055324637357101703871388814990845, 0.070471460866681328135768802392299522),
    ],
)
def test_wilson_interval_hand_values(k, n, lo, hi):
    got_lo, got_hi = wilson_interval(k, n)
    assert got_lo == pytest.approx(lo, abs=1e-9)
    assert got_hi == pytest.approx(hi, abs=1e-9)


def test_wilson_interval_matches_quadratic_roots_for_other_z():
    k, n, z = 3, 17, 2.576
    p = k / n
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    disc = math.sqrt(b * b - 4 * a * c)
    expected = ((-b - disc) / (2 * a), (-b + disc) / (2 * a))
    assert wilson_interval(k, n, z) == pytest.approx(expected, abs=1e-12)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.0 < hi < 1.0
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and 0.0 < lo < 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)
