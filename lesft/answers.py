"""Answer extraction and scoring for evaluation: pure text, no torch.

Callers pass only the model's own continuation of a prompt that ends with "Answer:".
Training targets end with the fixed sentence " The answer is 72." (multiple choice:
" The answer is C."), so a trained model usually states its answer that way; the rules
below also accept the common variants a base model produces, and return None rather
than guess when nothing reliable is found.

Rules, in short (the tests pin each one):

- The continuation is first cut at the first prompt restart ("\\nQuestion:",
  "\\n\\nQuestion", "\\nQ:", "Question:" after a sentence, end-of-text tokens), since
  models often go on to invent the next example.
- Numbers: the number right after the FIRST answer sentence ("The answer is",
  "answer:", "The final answer is", "#### "); else the LAST number in the text.
  A comma is a thousands separator only in valid positions: "5,000,000" is 5000000,
  while "1,23" reads as the two numbers 1 and 23 (a list, not 123). A trailing period
  ends a sentence, not the number. Simple fractions become exact decimals when they
  terminate ("3/4" -> "0.75"); "1/3" has no exact decimal form and normalises to None.
  Numbers written in words ("eighteen") are not read.
- Choices: the option letter A-E after the first answer sentence, else a letter that
  opens the continuation (the prompt ended with "Answer:"; not when it opens a restated
  option list "(A) bank (B) ..."), else "option C" / "choice C", else a single
  distinct labelled letter "(C)" / "C)" (several distinct ones: None). A bare "A" or a
  lowercase letter is taken only where it cannot be the article or a word: bracketed,
  or followed by punctuation or the end of the line ("The answer is A.").
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

NUMERIC_DATASETS = ("gsm8k", "synthetic", "synthetic_easy")
CHOICE_DATASETS = ("commonsenseqa", "aqua_rat")
CHOICES = "ABCDE"

# Where a model starts writing the next example (or emits an end token as text).
_RESTART = re.compile(
    # "\nQuestion:", "\nQ:", "\nQuestion 2:"
    r"(?:^|\n)[ \t]*(?:question|q|problem)[ \t]*\d*[ \t]*:"
    r"|\n[ \t]*\n[ \t]*question\b"  # a blank line, then "Question" in any form
    r"|(?<=[.!?])[ \t]+question[ \t]*:"  # "... is 72. Question: ..." on one line
    r"|<\|endoftext\|>|<\|im_end\|>|<\|im_start\|>|</s>",
    re.IGNORECASE,
)

# One number token. The sign counts only where it cannot be a binary minus ("5-3").
# Comma groups must be exactly three digits and not followed by more digits or another
# short group, so "1,23" and "1,2345" are not read as one number.
_NUMBER = (
    r"(?:(?<![\w).\]])[-\u2212])?\$?"
    r"(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)(?!,\d)|\d+)"
    r"(?:\.\d+|/\d+(?![\d/.]))?(?!\d)"
)
_NUMBER_RE = re.compile(_NUMBER)

# An answer sentence followed directly (only filler between) by a number.
_NUM_MARKER = re.compile(
    r"(?:\banswer\b[ \t]*(?:is|was|would[ \t]+be|will[ \t]+be|should[ \t]+be|=|:)|####)"
    r"[ \t]*:?[ \t]*"
    r"(?:(?:\*\*|\\boxed\{|\$(?=[-\u2212\d])|\(|=|approximately\b|about\b|around\b)[ \t]*)*"
    r"(?P<num>" + _NUMBER + r")",
    re.IGNORECASE,
)

_STRICT_WHOLE = re.compile(
    r"(?P<sign>[-+]?)\$?(?P<body>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)"
)
_STRICT_FRACTION = re.compile(r"(?P<sign>[-+]?)(?P<num>\d+)/(?P<den>\d+)")

# The letter slot after a choice marker: "(C)", "[C]", "C", "C)".
_LETTER = r"(?P<open>[(\[])?[ \t]*(?P<letter>[A-Ea-e])[ \t]*(?P<close>[)\]])?(?![A-Za-z])"
_CHOICE_MARKER = re.compile(
    r"(?:\banswer\b[ \t]*"
    r"(?:is|was|would[ \t]+be|will[ \t]+be|should[ \t]+be|must[ \t]+be)?[ \t]*[:=]?|####)"
    r"[ \t]*(?:\*\*)?[ \t]*(?:(?:option|choice)\b[ \t]*:?[ \t]*)?" + _LETTER,
    re.IGNORECASE,
)
_CHOICE_START = re.compile(r"^[ \t\n]*(?:\*\*)?[ \t]*" + _LETTER)
_OPTION_WORD = re.compile(r"\b(?:option|choice)\b[ \t]*:?[ \t]*" + _LETTER, re.IGNORECASE)
_LABELLED = re.compile(r"(?<![A-Za-z0-9])\((?P<a>[A-Ea-e])\)|(?:^|(?<=\s))(?P<b>[A-E])\)")
# Words after a bare letter that show it was meant as an option ("The answer is A because").
_AFTER_LETTER = re.compile(r"[ \t]+(?:is|was|because|since|as|which)\b", re.IGNORECASE)


def truncate_continuation(text: str) -> str:
    """Cut a continuation at the first place the model starts a new prompt."""
    m = _RESTART.search(text)
    return text[: m.start()] if m else text


def normalize_number(s: str) -> str | None:
    """Canonical decimal string of one number written as text, or None if it is not one.

    "1,234" -> "1234", "$18" -> "18", "18.00" -> "18", "-3" -> "-3", "2.50" -> "2.5",
    "18." -> "18", "50%" -> "50", "1/2" -> "0.5", "1/3" -> None (no exact decimal),
    "1,23" -> None (a comma only separates thousands), "abc" -> None.
    """
    if s is None:
        return None
    t = s.strip().replace("\u2212", "-")
    t = t.rstrip(".").removesuffix("%").strip()
    if t.startswith("$") and len(t) > 1 and t[1] in "+-":
        t = t[1] + "$" + t[2:]  # "$-5" -> "-$5"
    m = _STRICT_FRACTION.fullmatch(t)
    if m:
        den = int(m["den"])
        if den == 0:
            return None
        value = Fraction(int(m["num"]), den)
        if m["sign"] == "-":
            value = -value
        return _fraction_to_decimal(value)
    m = _STRICT_WHOLE.fullmatch(t)
    if not m:
        return None
    try:
        value = Decimal(m["sign"] + m["body"].replace(",", ""))
    except InvalidOperation:
        return None
    return _format_decimal(value)


def _fraction_to_decimal(value: Fraction) -> str | None:
    """Exact decimal string of a fraction whose denominator has only factors 2 and 5."""
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return None
    return _format_decimal(Decimal(value.numerator) / Decimal(value.denominator))


def _format_decimal(value: Decimal) -> str:
    """Plain (never exponent) form without trailing zeros; "-0" becomes "0"."""
    text = format(value.normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _extract_number(text: str) -> str | None:
    """Number after the first answer sentence, else the last number in the text."""
    for m in _NUM_MARKER.finditer(text):
        value = normalize_number(m["num"])
        if value is not None:
            return value
    for m in reversed(list(_NUMBER_RE.finditer(text))):
        value = normalize_number(m.group())
        if value is not None:
            return value
    return None


def _letter_if_reliable(m: re.Match, text: str, relaxed: bool) -> str | None:
    """The matched option letter, or None where it could be an article or a word.

    Bracketed or followed by punctuation / end of line is always an option. With
    ``relaxed`` (after an explicit answer marker) an upper-case B-E followed by a space
    also counts, and so does any letter followed by "is", "because", ...
    """
    letter, rest = m["letter"], text[m.end():]
    if m["close"] or (m["open"] and re.match(r"[ \t]*(?:[.,;:!?]|$)", rest, re.M)):
        return letter.upper()
    if m["open"]:
        return None
    if re.match(r"[ \t]*(?:[.,;:!?]|$)", rest, re.M):
        return letter.upper()
    if relaxed and letter in "BCDE" and re.match(r"[ \t]", rest):
        return letter
    if relaxed and _AFTER_LETTER.match(rest):
        return letter.upper()
    return None


def _extract_choice(text: str) -> str | None:
    """Option letter A-E, by the priority given in the module docstring."""
    for m in _CHOICE_MARKER.finditer(text):
        letter = _letter_if_reliable(m, text, relaxed=True)
        if letter:
            return letter
    labelled = {(m["a"] or m["b"]).upper() for m in _LABELLED.finditer(text)}
    m = _CHOICE_START.match(text)
    # "(A) bank (B) library ..." opens with a label but restates the options.
    restating = m is not None and bool(m["close"]) and len(labelled) > 1
    if m and not restating:
        letter = _letter_if_reliable(m, text, relaxed=False)
        if letter:
            return letter
    for m in _OPTION_WORD.finditer(text):
        letter = _letter_if_reliable(m, text, relaxed=True)
        if letter:
            return letter
    # Several different labels usually mean the model is restating the options.
    return labelled.pop() if len(labelled) == 1 else None


def extract_answer(text: str, dataset: str) -> str | None:
    """The answer a model's continuation states, normalised, or None if none is reliable.

    Numeric datasets give a canonical number string ("1234.5"); choice datasets give
    an upper-case letter "A".."E".
    """
    if text is None:
        return None
    text = truncate_continuation(text)
    if dataset in NUMERIC_DATASETS:
        return _extract_number(text)
    if dataset in CHOICE_DATASETS:
        return _extract_choice(text)
    raise ValueError(
        f"unknown dataset {dataset!r}: expected one of {NUMERIC_DATASETS + CHOICE_DATASETS}"
    )


def _normalize_choice(s: str | None) -> str | None:
    """"c", "(C)", "C." -> "C"; anything that is not one letter A-E -> None."""
    if s is None:
        return None
    t = s.strip().strip("()[].").strip().upper()
    return t if len(t) == 1 and t in CHOICES else None


def is_correct(pred: str | None, gold: str, dataset: str) -> bool:
    """Whether a prediction matches the gold answer.

    Numeric datasets compare values with absolute tolerance 1e-6 ("18.0" == "18",
    "1,000" == "1000"); choice datasets compare the letter exactly (case-insensitive).
    A missing or unparsable prediction is wrong.
    """
    if dataset in NUMERIC_DATASETS:
        p, g = normalize_number(pred) if pred is not None else None, normalize_number(gold)
        if p is None or g is None:
            return False
        # Decimal keeps big integers exact where float would round them.
        return abs(Decimal(p) - Decimal(g)) <= Decimal("1e-6")
    if dataset in CHOICE_DATASETS:
        p, g = _normalize_choice(pred), _normalize_choice(gold)
        return p is not None and p == g
    raise ValueError(
        f"unknown dataset {dataset!r}: expected one of {NUMERIC_DATASETS + CHOICE_DATASETS}"
    )


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n trials (95% for z=1.96).

    Unlike the normal interval it stays inside [0, 1] and is not empty at k=0 or k=n,
    which matters for the small test sets of a quick evaluation. n == 0 -> (0.0, 1.0).
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))
