"""The training record and the prompt templates shared by every dataset.

A record is the paper's ``(x, y, x~, y~)`` with ``y~ == y`` (sec. 3.2): ``x`` the base
prompt, ``y`` the target chain of thought, ``x_ref`` the reference prompt (the question
joined with the ground truth). Every template lives here so that training, evaluation
and the generator build exactly the same strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

DATASETS = ("synthetic", "synthetic_easy", "gsm8k", "commonsenseqa", "aqua_rat")
REF_STYLES = ("solution", "answer")

ANSWER_CUE = "\nAnswer:"


class DataError(ValueError):
    """A problem the user can fix (bad path, dataset, split, file or size); one clear line."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation record; ``y`` is the target of both paths.

    ``x`` and ``x_ref`` end with ``"\\nAnswer:"``; ``y`` starts with one space, holds no
    newline and ends with ``answer_sentence(answer)``.
    """

    uid: str
    dataset: str
    x: str
    y: str
    x_ref: str
    answer: str
    kind: str


@dataclass(frozen=True)
class SourceRecord:
    """A dataset item before templating, so one item can be rendered in every style.

    ``steps`` is the dataset's own worded solution on one line ("" when it has none),
    ``terse`` a terse solution distinct from ``steps`` (GSM8K calculator annotations,
    the generator's equations) or None, ``answer_label`` what the reference shows as the
    answer ("(C) library" for multiple choice; None means ``answer``).
    """

    uid: str
    dataset: str
    block: str
    steps: str
    terse: str | None
    answer: str
    kind: str
    answer_label: str | None = None


def one_line(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space."""
    return " ".join(text.split())


def join_lines(text: str) -> str:
    """Multi-line solution text on one line: each line ends in punctuation, then a space.

    A line without a closing mark gets a full stop, so "2:2:1" and "1/5*5600 = 1120"
    on two lines do not run together into "2:2:1 1/5*5600". Targets stay newline-free,
    so generation can stop at the first newline.
    """
    lines = [one_line(line) for line in text.splitlines()]
    return " ".join(line if line[-1] in ".!?:;," else line + "." for line in lines if line)


def question_block(question: str, choices: Sequence[tuple[str, str]] | None = None) -> str:
    """The question as every prompt shows it: ``Question: ...`` plus one line of choices.

    ``choices`` are ``(label, text)`` pairs, e.g. ``[("A", "bank"), ("B", "library")]``.
    """
    block = f"Question: {one_line(question)}"
    if choices:
        listed = " ".join(f"({label}) {one_line(text)}" for label, text in choices)
        block += f"\nAnswer choices: {listed}"
    return block


def prompt_for(dataset: str, question_block: str) -> str:
    """The base-model prompt ``x`` for a question block (see ``question_block``).

    Every dataset shares one template today; ``dataset`` is checked so that a
    per-dataset template can be added here without touching callers.
    """
    if dataset not in DATASETS:
        raise DataError(f"Unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
    return f"{question_block}{ANSWER_CUE}"


def answer_sentence(answer: str) -> str:
    """The fixed sentence every target ends with, e.g. ``" The answer is 72."``."""
    return f" The answer is {answer}."


def reference_prompt(block: str, answer_label: str, solution: str | None = None) -> str:
    """The reference input ``x~``: the question joined with the ground truth.

    With ``solution`` it carries a ``Reference solution:`` line before the answer.
    """
    text = block
    if solution:
        text += f"\nReference solution: {solution}"
    return f"{text}\nReference answer: {answer_label}{ANSWER_CUE}"


def target_for(steps: str, answer: str) -> str:
    """The target ``y``: the worded steps (may be empty) then the answer sentence."""
    steps = join_lines(steps)
    return (f" {steps}" if steps else "") + answer_sentence(answer)


def assemble(record: SourceRecord, ref_style: str = "solution") -> Example:
    """Render a source record into an Example without a teacher chain.

    ``ref_style="solution"`` puts the terse solution in ``x_ref`` where one exists;
    ``"answer"`` (and datasets without a terse solution) give question + answer only.
    """
    if ref_style not in REF_STYLES:
        raise DataError(f"Unknown ref_style {ref_style!r}. Choose one of: {', '.join(REF_STYLES)}.")
    label = record.answer_label or record.answer
    solution = record.terse if ref_style == "solution" else None
    return Example(
        uid=record.uid,
        dataset=record.dataset,
        x=prompt_for(record.dataset, record.block),
        y=target_for(record.steps, record.answer),
        x_ref=reference_prompt(record.block, label, solution),
        answer=record.answer,
        kind=record.kind,
    )


_FINAL_ANSWER_SENTENCE = re.compile(
    r"\s*(?i:(?:\b(?:so|thus|therefore|hence)\b[\s,]*)?\bthe\s+(?:final\s+)?answer\s+is)[^\n]{0,60}$"
)


def assemble_with_teacher(record: SourceRecord, cot: str) -> Example:
    """Render a record whose ``y`` is a teacher's chain and whose ``x_ref`` holds the
    dataset's own worded solution (paper sec. 4.1), falling back to the terse one.

    A trailing "The answer is ..." of the chain is replaced by the fixed sentence so
    that every target ends the same way.
    """
    chain = _FINAL_ANSWER_SENTENCE.sub("", join_lines(cot))
    solution = record.steps or record.terse
    return Example(
        uid=record.uid,
        dataset=record.dataset,
        x=prompt_for(record.dataset, record.block),
        y=target_for(chain, record.answer),
        x_ref=reference_prompt(record.block, record.answer_label or record.answer, solution),
        answer=record.answer,
        kind=record.kind,
    )
