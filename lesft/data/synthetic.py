"""Embedded generator of multi-step arithmetic word problems (no download needed).

Each problem has 2-3 steps over small integers (every number below 1000) and comes in
two wordings of one reasoning, as LESFT wants: a worded chain of thought for ``y``
("Tom buys 3 pens at $4 each, so he spends 3 * 4 = 12 dollars. ...") and terse
equations for ``x~`` ("3*4=12; 20-12=8").
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Sequence

from lesft.data.records import DataError, Example, SourceRecord, assemble, question_block

SPLITS = ("train", "dev", "test")

# A question belongs to exactly one split, decided by a hash of its text, so splits
# stay disjoint for any sizes and seeds (train 80%, dev 10%, test 10% of the space).
_BUCKETS = 20
_SPLIT_BUCKETS = {"train": range(0, 16), "dev": range(16, 18), "test": range(18, 20)}
_MAX_NUMBER = 999

_PEOPLE = [
    ("Tom", "he", "his"), ("Maria", "she", "her"), ("Ali", "he", "his"), ("Priya", "she", "her"),
    ("Chen", "he", "his"), ("Sofia", "she", "her"), ("Kofi", "he", "his"), ("Emma", "she", "her"),
    ("Lucas", "he", "his"), ("Aisha", "she", "her"), ("Mateo", "he", "his"), ("Yuki", "she", "her"),
    ("Omar", "he", "his"), ("Grace", "she", "her"), ("Ivan", "he", "his"), ("Leila", "she", "her"),
    ("Noah", "he", "his"), ("Zara", "she", "her"), ("Diego", "he", "his"), ("Hannah", "she", "her"),
]
_ITEMS = ["pens", "notebooks", "apples", "stickers", "marbles", "cookies", "pencils", "oranges",
          "cards", "candles", "bottles of juice", "comic books", "plants", "batteries"]
_THINGS = ["bicycle", "game", "jacket", "book", "lamp", "backpack", "guitar", "watch"]
_VEHICLES = ["train", "bus", "car", "cyclist", "boat", "truck"]
_PLACES = ["garden", "room", "yard", "field", "playground", "patio"]
_INGREDIENTS = [("cups", "flour"), ("spoons", "sugar"), ("cups", "milk"), ("eggs", ""),
                ("grams", "butter"), ("cups", "rice")]
_DISHES = ["cakes", "pancakes", "muffins", "servings of soup", "pies", "loaves of bread"]


class _Retry(Exception):
    """The drawn numbers broke a constraint; draw again."""


class _Chain:
    """Collects the equations of one solution and formats them both ways."""

    def __init__(self) -> None:
        self.terse: list[str] = []

    def calc(self, a: int, op: str, b: int) -> tuple[int, str]:
        """Apply ``op``; returns the result and the worded form "a op b = c"."""
        if op == "/":
            if b == 0 or a % b:
                raise _Retry
            c = a // b
        else:
            c = {"+": a + b, "-": a - b, "*": a * b}[op]
        if not (0 < c <= _MAX_NUMBER and 0 < a <= _MAX_NUMBER and 0 < b <= _MAX_NUMBER):
            raise _Retry
        self.terse.append(f"{a}{op}{b}={c}")
        return c, f"{a} {op} {b} = {c}"


def _person(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(_PEOPLE)


def _shopping(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    name, he, his = _person(rng)
    a, p = rng.randint(2, 9), rng.randint(2, 15)
    items = rng.choice(_ITEMS)
    if rng.random() < 0.5:
        cost, e1 = ch.calc(a, "*", p)
        bill = next(b for b in (20, 50, 100, 200) if b > cost)
        change, e2 = ch.calc(bill, "-", cost)
        q = (f"{name} buys {a} {items} at ${p} each and pays with a ${bill} bill. "
             f"How much change does {he} get in dollars?")
        s = (f"{name} buys {a} {items} at ${p} each, so {he} spends {e1} dollars. "
             f"{he.capitalize()} pays with a ${bill} bill, so {his} change is {e2} dollars.")
        return q, s, change
    items2 = rng.choice([i for i in _ITEMS if i != items])
    b, r = rng.randint(2, 9), rng.randint(2, 15)
    c1, e1 = ch.calc(a, "*", p)
    c2, e2 = ch.calc(b, "*", r)
    total, e3 = ch.calc(c1, "+", c2)
    q = (f"{name} buys {a} {items} at ${p} each and {b} {items2} at ${r} each. "
         f"How many dollars does {he} spend in total?")
    s = (f"The {items} cost {e1} dollars. The {items2} cost {e2} dollars. "
         f"Together {he} spends {e3} dollars.")
    return q, s, total


def _travel(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    vehicle = rng.choice(_VEHICLES)
    variant = rng.randrange(3)
    if variant == 0:
        v, t, extra = rng.randint(10, 90), rng.randint(2, 8), rng.randint(5, 120)
        d1, e1 = ch.calc(v, "*", t)
        total, e2 = ch.calc(d1, "+", extra)
        q = (f"A {vehicle} travels at {v} km per hour for {t} hours, then travels {extra} more "
             f"kilometres. How many kilometres does it travel in total?")
        s = (f"In {t} hours at {v} km per hour the {vehicle} covers {e1} km. "
             f"Adding the last {extra} km gives {e2} km.")
        return q, s, total
    if variant == 1:
        v1, t1, v2, t2 = rng.randint(10, 80), rng.randint(2, 6), rng.randint(10, 80), rng.randint(2, 6)
        d1, e1 = ch.calc(v1, "*", t1)
        d2, e2 = ch.calc(v2, "*", t2)
        total, e3 = ch.calc(d1, "+", d2)
        q = (f"A {vehicle} goes at {v1} km per hour for {t1} hours and then at {v2} km per hour "
             f"for {t2} hours. How many kilometres does it go in total?")
        s = (f"The first part is {e1} km. The second part is {e2} km. "
             f"In total it goes {e3} km.")
        return q, s, total
    v, t, t2 = rng.randint(5, 30), rng.randint(2, 8), rng.randint(2, 12)
    if t2 == t:
        raise _Retry
    d, d2 = v * t, v * t2
    speed, e1 = ch.calc(d, "/", t)
    hours, e2 = ch.calc(d2, "/", speed)
    q = (f"A {vehicle} covers {d} km in {t} hours at a steady speed. How many hours does it "
         f"need to cover {d2} km at the same speed?")
    s = (f"Its speed is {e1} km per hour. At that speed, {d2} km takes {e2} hours.")
    return q, s, hours


def _sharing(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    name, he, _ = _person(rng)
    items = rng.choice(_ITEMS)
    each, k = rng.randint(2, 20), rng.randint(2, 9)
    keep = rng.randint(1, 12) if rng.random() < 0.5 else 0
    total = each * k + keep
    divisors = [d for d in range(2, total) if total % d == 0 and total // d >= 2]
    if not divisors:
        raise _Retry
    bags = rng.choice(divisors)
    t, e1 = ch.calc(bags, "*", total // bags)
    if keep:
        rest, e2 = ch.calc(t, "-", keep)
        share, e3 = ch.calc(rest, "/", k)
        q = (f"{name} has {bags} bags with {total // bags} {items} in each bag. {he.capitalize()} "
             f"keeps {keep} {items} and shares the rest equally among {k} friends. "
             f"How many {items} does each friend get?")
        s = (f"{name} has {e1} {items}. After keeping {keep}, {he} has {e2} left. "
             f"Each of the {k} friends gets {e3} {items}.")
        return q, s, share
    share, e2 = ch.calc(t, "/", k)
    q = (f"{name} has {bags} bags with {total // bags} {items} in each bag. {he.capitalize()} "
         f"shares all the {items} equally among {k} friends. How many {items} does each friend get?")
    s = f"{name} has {e1} {items} in all. Each of the {k} friends gets {e2} {items}."
    return q, s, share


def _ages(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    (a_name, _, _), (b_name, _, _), (c_name, _, _) = rng.sample(_PEOPLE, 3)
    a = rng.randint(3, 30)
    if rng.random() < 0.5:
        k, d = rng.randint(2, 4), rng.randint(2, 15)
        b, e1 = ch.calc(a, "*", k)
        later, e2 = ch.calc(b, "+", d)
        q = (f"{a_name} is {a} years old. {b_name} is {k} times as old as {a_name}. "
             f"How old will {b_name} be in {d} years?")
        s = (f"{b_name} is {e1} years old now. In {d} years {b_name} will be {e2} years old.")
        return q, s, later
    d, k, e = rng.randint(2, 12), rng.randint(2, 3), rng.randint(2, 10)
    b, e1 = ch.calc(a, "+", d)
    c, e2 = ch.calc(b, "*", k)
    later, e3 = ch.calc(c, "+", e)
    q = (f"{a_name} is {a} years old. {b_name} is {d} years older than {a_name}. {c_name} is "
         f"{k} times as old as {b_name}. How old will {c_name} be in {e} years?")
    s = (f"{b_name} is {e1} years old. {c_name} is {e2} years old. "
         f"In {e} years {c_name} will be {e3} years old.")
    return q, s, later


def _savings(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    name, he, _ = _person(rng)
    thing = rng.choice(_THINGS)
    per, weeks = rng.randint(3, 40), rng.randint(2, 12)
    if rng.random() < 0.5:
        saved, e1 = ch.calc(per, "*", weeks)
        price = rng.randint(1, saved - 1) if saved > 1 else 0
        left, e2 = ch.calc(saved, "-", price)
        q = (f"{name} saves ${per} every week. After {weeks} weeks, {he} spends ${price} on a "
             f"{thing}. How many dollars does {he} have left?")
        s = (f"In {weeks} weeks {name} saves {e1} dollars. After buying the {thing} for ${price}, "
             f"{he} has {e2} dollars left.")
        return q, s, left
    start = rng.randint(5, 200)
    saved, e1 = ch.calc(per, "*", weeks)
    have, e2 = ch.calc(start, "+", saved)
    price = rng.randint(1, have - 1)
    left, e3 = ch.calc(have, "-", price)
    q = (f"{name} has ${start}. {he.capitalize()} saves ${per} every week for {weeks} weeks, then "
         f"spends ${price} on a {thing}. How many dollars does {he} have left?")
    s = (f"{name} saves {e1} dollars, so {he} has {e2} dollars. "
         f"After buying the {thing}, {he} has {e3} dollars left.")
    return q, s, left


def _rectangle(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    place = rng.choice(_PLACES)
    length, width = rng.randint(5, 40), rng.randint(3, 24)
    if rng.random() < 0.5:
        half, e1 = ch.calc(length, "+", width)
        perimeter, e2 = ch.calc(half, "*", 2)
        q = (f"A rectangular {place} is {length} metres long and {width} metres wide. "
             f"What is its perimeter in metres?")
        s = (f"One length and one width add up to {e1} metres. The perimeter is twice that: "
             f"{e2} metres.")
        return q, s, perimeter
    side = rng.randint(2, max(2, min(length, width) - 1))
    area, e1 = ch.calc(length, "*", width)
    covered, e2 = ch.calc(side, "*", side)
    free, e3 = ch.calc(area, "-", covered)
    q = (f"A rectangular {place} is {length} metres long and {width} metres wide. A square mat "
         f"with sides of {side} metres lies on it. How many square metres are not covered?")
    s = (f"The {place} has an area of {e1} square metres. The mat covers {e2} square metres, "
         f"so {e3} square metres are not covered.")
    return q, s, free


def _recipe(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    name, he, _ = _person(rng)
    unit, ingredient = rng.choice(_INGREDIENTS)
    dish = rng.choice(_DISHES)
    what = f"{unit} of {ingredient}" if ingredient else unit
    per, batch, want = rng.randint(2, 9), rng.randint(2, 8), rng.randint(2, 30)
    if want == batch:
        raise _Retry
    amount = per * batch
    one, e1 = ch.calc(amount, "/", batch)
    need, e2 = ch.calc(one, "*", want)
    q = f"A recipe for {batch} {dish} needs {amount} {what}. "
    s = f"One of the {dish} needs {e1} {unit}. For {want} {dish} it takes {e2} {unit}."
    if rng.random() < 0.5:
        have = rng.randint(1, need - 1)
        more, e3 = ch.calc(need, "-", have)
        q += (f"{name} wants to make {want} {dish} and has {have} {unit}. "
              f"How many more {unit} does {he} need?")
        s += f" {name} has {have}, so {he} needs {e3} more {unit}."
        return q, s, more
    q += f"How many {unit} are needed for {want} {dish}?"
    return q, s, need


def _wages(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    name, he, _ = _person(rng)
    rate, hours, days = rng.randint(5, 25), rng.randint(2, 8), rng.randint(2, 6)
    daily, e1 = ch.calc(rate, "*", hours)
    total, e2 = ch.calc(daily, "*", days)
    q = f"{name} earns ${rate} per hour and works {hours} hours a day. "
    s = f"{name} earns {e1} dollars a day, so in {days} days {he} earns {e2} dollars."
    if rng.random() < 0.5:
        spent = rng.randint(1, total - 1)
        left, e3 = ch.calc(total, "-", spent)
        q += (f"After {days} days {he} spends ${spent} on a {rng.choice(_THINGS)}. "
              f"How many dollars does {he} have left?")
        s += f" After spending ${spent}, {he} has {e3} dollars left."
        return q, s, left
    q += f"How many dollars does {he} earn in {days} days?"
    return q, s, total


# --------------------------------------------------------------------------- easy level
# Two steps, three kinds, every factor and addend in 2..12: a task a 135M model can
# learn from 40 examples in a few CPU minutes (the demo's task, dataset synthetic_easy).


def _easy_boxes(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    name, he, _ = _person(rng)
    items = rng.choice(_ITEMS)
    a, k, b = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 12)
    t, e1 = ch.calc(a, "*", k)
    total, e2 = ch.calc(t, "+", b)
    q = f"{name} has {a} boxes with {k} {items} in each box and {b} more {items}. How many {items} does {he} have?"
    s = f"The boxes hold {e1} {items}. With {b} more, {he} has {e2} {items}."
    return q, s, total


def _easy_gift(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    name, _, _ = _person(rng)
    items = rng.choice(_ITEMS)
    a, k = rng.randint(2, 12), rng.randint(2, 12)
    g = rng.randint(2, min(12, a * k - 1))
    t, e1 = ch.calc(a, "*", k)
    left, e2 = ch.calc(t, "-", g)
    q = f"{name} buys {a} packs of {k} {items} and gives away {g} {items}. How many {items} are left?"
    s = f"{name} buys {e1} {items}. After giving away {g}, {e2} {items} are left."
    return q, s, left


def _easy_share(rng: random.Random, ch: _Chain) -> tuple[str, str, int]:
    name, _, _ = _person(rng)
    items = rng.choice(_ITEMS)
    a, k = rng.randint(2, 12), rng.randint(2, 12)
    friends = [m for m in range(2, 13) if (a * k) % m == 0 and a * k // m >= 2]
    if not friends:
        raise _Retry
    m = rng.choice(friends)
    t, e1 = ch.calc(a, "*", k)
    share, e2 = ch.calc(t, "/", m)
    q = (f"{name} has {a} bags with {k} {items} in each bag and shares them equally among {m} friends. "
         f"How many {items} does each friend get?")
    s = f"{name} has {e1} {items}. Each of the {m} friends gets {e2} {items}."
    return q, s, share


EASY_KINDS: dict[str, Callable[[random.Random, _Chain], tuple[str, str, int]]] = {
    "boxes": _easy_boxes,
    "gift": _easy_gift,
    "share": _easy_share,
}


KINDS: dict[str, Callable[[random.Random, _Chain], tuple[str, str, int]]] = {
    "shopping": _shopping,
    "travel": _travel,
    "sharing": _sharing,
    "ages": _ages,
    "savings": _savings,
    "rectangle": _rectangle,
    "recipe": _recipe,
    "wages": _wages,
}


LEVELS = {"standard": KINDS, "easy": EASY_KINDS}


def _bucket(question: str) -> int:
    return int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big") % _BUCKETS


def synthetic_records(n: int, seed: int = 0, split: str = "train",
                      kinds: Sequence[str] | None = None, level: str = "standard") -> list[SourceRecord]:
    """Generate ``n`` distinct problems of ``split`` as source records (see ``generate_synthetic``).

    ``level`` "standard" draws from ``KINDS``; "easy" from ``EASY_KINDS`` (dataset
    ``synthetic_easy``: records say ``dataset="synthetic_easy"``).
    """
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r} for synthetic. Choose one of: {', '.join(SPLITS)}.")
    if n < 0:
        raise DataError(f"Number of synthetic problems must be >= 0, got {n}. Pass a positive --n.")
    if level not in LEVELS:
        raise DataError(f"Unknown synthetic level {level!r}. Choose one of: {', '.join(LEVELS)}.")
    table = LEVELS[level]
    names = list(table) if kinds is None else list(kinds)
    unknown = [k for k in names if k not in table]
    if unknown or not names:
        raise DataError(f"Unknown synthetic kind(s) {unknown or names}. Choose from: {', '.join(table)}.")
    dataset = "synthetic" if level == "standard" else f"synthetic_{level}"
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and
    # Python versions, and a different stream per split (and per level).
    rng = random.Random(f"lesft-synthetic:{split}:{seed}" if level == "standard"
                        else f"lesft-synthetic-{level}:{split}:{seed}")
    records: list[SourceRecord] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise DataError(f"Could only generate {len(records)} distinct synthetic {split} problems "
                            f"of kinds {names}; ask for fewer (--n) or allow more kinds.")
        kind = rng.choice(names)
        chain = _Chain()
        try:
            question, steps, answer = table[kind](rng, chain)
        except _Retry:
            continue
        if question in seen or _bucket(question) not in _SPLIT_BUCKETS[split]:
            continue
        seen.add(question)
        records.append(SourceRecord(
            uid=f"{dataset}-{split}-{seed}-{len(records):05d}",
            dataset=dataset,
            block=question_block(question),
            steps=steps,
            terse="; ".join(chain.terse),
            answer=str(answer),
            kind=kind,
        ))
    return records


def generate_synthetic(n: int, seed: int = 0, split: str = "train",
                       kinds: Sequence[str] | None = None) -> list[Example]:
    """Generate ``n`` distinct arithmetic word problems, reproducible for ``(n, seed, split)``.

    Kinds are drawn uniformly from ``kinds`` (default: all of ``KINDS``). The splits
    "train", "dev" and "test" use separate random streams and never share a question
    text. ``x_ref`` holds the terse equations; ``Example.kind`` is the problem kind.
    """
    return [assemble(r) for r in synthetic_records(n, seed, split, kinds)]
