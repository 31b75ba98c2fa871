"""Loaders for GSM8K, CommonsenseQA and AQuA-RAT from local files, plus the generator.

Files are read from a data folder laid out as ``../shared/datasets`` (see its README):
nothing is downloaded. Every loader yields ``SourceRecord``s; ``load_examples`` renders
them into ``Example``s in the requested reference style, optionally with teacher chains.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from pathlib import Path
from typing import Iterator

from lesft.answers import normalize_number
from lesft.data.records import (
    DATASETS, REF_STYLES, DataError, Example, SourceRecord, answer_sentence, assemble,
    assemble_with_teacher, join_lines, one_line, prompt_for, question_block,
)
from lesft.data.synthetic import synthetic_records

__all__ = ["default_data_dir", "load_examples", "prompt_for", "answer_sentence",
           "clean_gsm8k_solution", "strip_final_answer", "load_teacher_cot", "SPLITS"]

SYNTHETIC_DEFAULT_N = 1000

# split -> (file under the data dir, the file's own split name used in uids)
SPLITS: dict[str, dict[str, tuple[str, str]]] = {
    "synthetic": {"train": ("", "train"), "dev": ("", "dev"), "test": ("", "test")},
    "synthetic_easy": {"train": ("", "train"), "dev": ("", "dev"), "test": ("", "test")},
    "gsm8k": {"train": ("gsm8k/train.jsonl", "train"), "test": ("gsm8k/test.jsonl", "test")},
    # The official CSQA test labels were never released, so "test" is the labelled dev
    # set (1221 questions), as CoT papers report it; "dev" is the same file.
    "commonsenseqa": {"train": ("commonsenseqa/train_rand_split.jsonl", "train"),
                      "dev": ("commonsenseqa/dev_rand_split.jsonl", "dev"),
                      "test": ("commonsenseqa/dev_rand_split.jsonl", "dev")},
    # The official AQuA train (97k) is not available offline; "train" is FLAN v2's
    # 2728-problem CoT subset of it.
    "aqua_rat": {"train": ("aqua_rat/flan_v2_cot_aqua_train.tsv", "train"),
                 "dev": ("aqua_rat/dev.json", "dev"),
                 "test": ("aqua_rat/test.json", "test")},
}
_NAMES = {"gsm8k": "GSM8K", "commonsenseqa": "CommonsenseQA", "aqua_rat": "AQuA-RAT"}


def default_data_dir() -> Path | None:
    """The folder holding the datasets: ``$LESFT_DATA_DIR``, else the first existing of
    ``<repo root>/../shared/datasets`` and ``<cwd>/../shared/datasets``, else None."""
    env = os.environ.get("LESFT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (repo_root.parent / "shared" / "datasets", Path.cwd().parent / "shared" / "datasets"):
        if candidate.is_dir():
            return candidate
    return None


# ----------------------------------------------------------------------------- cleaning

_CALC = re.compile(r"<<(.*?)>>")


def clean_gsm8k_solution(solution: str) -> tuple[str, str, str]:
    """Split a GSM8K ``answer`` field into (worded steps, terse equations, answer).

    The steps lose their ``<<expr=result>>`` marks and the ``#### n`` line and are
    joined on one line; the terse equations are the marks' contents joined by "; "
    ("16-3-4=9; 9*2=18"); the answer is normalised ("1,200" -> "1200").
    """
    body, _, final = solution.rpartition("####")
    terse = "; ".join(m.strip() for m in _CALC.findall(body))
    steps = join_lines(_CALC.sub("", body))
    return steps, terse, normalize_number(final) or final.strip()


_LETTER = r"\(?\s*[A-E]\s*\)?"
_LEAD = r"(?i:(?:so|hence|thus|therefore)\b[\s,]*)?"
# "Answer: C", "ANSWER:C", "The answer is (B).", "Correct Option: D", "Answer: D) 109 rolls",
# "(ANSWER B)", "ANSWER A 8000": an answer word, separators, one letter, an optional echo.
_ANSWER_FIRST = re.compile(
    r"(?:^|(?<=[\s(.,;:=>]))\(?" + _LEAD
    + r"(?i:(?:the\s+)?(?:(?:correct|right|final)\s+)?(?:answer|ans|option|choice)"
      r"(?:\s+(?:is|will\s+be|should\s+be|must\s+be))?)"
    + r"\s*[:\-=.,]*\s*(?i:option\s*[:\-]?\s*)?" + _LETTER
    + r"(?:(?<=\))[^\n]{0,40}|\s+[\d.,%/ ]{1,20})?[\s.)!]*$"
)
# "C is the answer.", "Hence (C) is correct answer.", "Option B is correct".
_LETTER_FIRST = re.compile(
    r"(?:^|(?<=[\s.,;:]))" + _LEAD + r"(?i:(?:option|choice)\s*)?" + _LETTER
    + r"\s+(?i:is\s+(?:the\s+)?(?:(?:correct|right)\s+)?(?:answer|choice|option)|is\s+correct(?:\s+answer)?)"
    + r"[\s.!]*$"
)
# A last line holding only the letter: "C", "Thus B".
_BARE_LETTER = re.compile(r"(?:^|\n)[ \t]*" + _LEAD + _LETTER + r"[ \t.]*$")
# A dangling last line "Answer:" whose letter was lost.
_DANGLING = re.compile(r"(?:^|\n)[ \t]*(?i:(?:the\s+)?(?:correct\s+)?(?:answer|ans))[ \t]*[:.\-]?[ \t]*$")


def strip_final_answer(rationale: str) -> str:
    """An AQuA rationale without its closing answer statement ("Answer: C" and kin).

    The target ends with the fixed sentence instead, so the letter is not stated twice.
    """
    text = rationale.strip()
    for _ in range(3):  # "... Answer: C\nANSWER: C" has two
        stripped = text
        for pattern in (_ANSWER_FIRST, _LETTER_FIRST, _BARE_LETTER, _DANGLING):
            stripped = pattern.sub("", stripped).rstrip()
        if stripped == text:
            break
        text = stripped
    return text


# ----------------------------------------------------------------------------- readers


def _require_file(data_dir: Path, dataset: str, rel: str) -> Path:
    path = data_dir / rel
    if not path.is_file():
        raise DataError(f"{_NAMES[dataset]} file not found: {path}. Pass --data-dir pointing at a "
                        f"folder that holds {rel} (or set LESFT_DATA_DIR).")
    return path


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg}). "
                                f"Restore the file from its source.") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {lineno}: expected a JSON object. Restore the file.")
            yield lineno, obj


def _field(obj: dict, key: str, path: Path, lineno: int):
    if key not in obj:
        raise DataError(f"{path} line {lineno}: missing field {key!r}. Restore the file from its source.")
    return obj[key]


def _mc_label(letter: str, choices: list[tuple[str, str]]) -> str:
    text = dict(choices).get(letter, "")
    return f"({letter}) {one_line(text)}".rstrip()


def _read_gsm8k(path: Path, uid_split: str) -> list[SourceRecord]:
    records = []
    for i, (lineno, obj) in enumerate(_json_lines(path)):
        question, solution = _field(obj, "question", path, lineno), _field(obj, "answer", path, lineno)
        steps, terse, answer = clean_gsm8k_solution(solution)
        n_calc = min(len(_CALC.findall(solution)), 5)
        records.append(SourceRecord(
            uid=f"gsm8k-{uid_split}-{i:05d}", dataset="gsm8k", block=question_block(question),
            steps=steps, terse=terse or None, answer=answer, kind=f"steps-{n_calc}"))
    return records


def _read_csqa(path: Path, uid_split: str) -> list[SourceRecord]:
    records = []
    for i, (lineno, obj) in enumerate(_json_lines(path)):
        if "answerKey" not in obj:
            raise DataError(f"{path} line {lineno}: no answerKey (unlabelled test file?). "
                            f"Use split 'dev'/'test', which read the labelled dev file.")
        q = _field(obj, "question", path, lineno)
        choices = [(c["label"], c["text"]) for c in _field(q, "choices", path, lineno)]
        letter = obj["answerKey"].strip()
        records.append(SourceRecord(
            uid=f"commonsenseqa-{uid_split}-{i:05d}", dataset="commonsenseqa",
            block=question_block(_field(q, "stem", path, lineno), choices), steps="", terse=None,
            answer=letter, kind=letter, answer_label=_mc_label(letter, choices)))
    return records


def _aqua_record(i: int, uid_split: str, question: str, choices: list[tuple[str, str]],
                 letter: str, rationale: str) -> SourceRecord:
    return SourceRecord(
        uid=f"aqua_rat-{uid_split}-{i:05d}", dataset="aqua_rat", block=question_block(question, choices),
        steps=join_lines(strip_final_answer(rationale)), terse=None, answer=letter, kind=letter,
        answer_label=_mc_label(letter, choices))


def _read_aqua_json(path: Path, uid_split: str) -> list[SourceRecord]:
    records = []
    for i, (lineno, obj) in enumerate(_json_lines(path)):
        options = _field(obj, "options", path, lineno)
        choices = []
        for opt in options:
            label, _, text = opt.partition(")")
            choices.append((label.strip(), text.strip()))
        records.append(_aqua_record(i, uid_split, _field(obj, "question", path, lineno), choices,
                                    _field(obj, "correct", path, lineno).strip(),
                                    _field(obj, "rationale", path, lineno)))
    return records


def _read_aqua_flan(path: Path, uid_split: str) -> list[SourceRecord]:
    records = []
    with path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if len(row) != 3:
                raise DataError(f"{path} row {i + 1}: expected 3 tab-separated fields, got {len(row)}. "
                                f"Restore the file from its source.")
            question, answer, rationale = (col.replace("\\n", "\n") for col in row)
            stem, _, options = question.partition("\nOptions:\n")
            choices = []
            for line in options.splitlines():
                m = re.match(r"\s*\(([A-E])\)\s*(.*)", line)
                if m:
                    choices.append((m.group(1), m.group(2)))
            records.append(_aqua_record(i, uid_split, stem, choices, answer.strip("() \t"), rationale))
    return records


_READERS = {"gsm8k": _read_gsm8k, "commonsenseqa": _read_csqa}


def _read_source(dataset: str, split: str, data_dir: Path) -> list[SourceRecord]:
    rel, uid_split = SPLITS[dataset][split]
    path = _require_file(data_dir, dataset, rel)
    if dataset == "aqua_rat":
        reader = _read_aqua_flan if rel.endswith(".tsv") else _read_aqua_json
    else:
        reader = _READERS[dataset]
    return reader(path, uid_split)


# ----------------------------------------------------------------------------- teacher

_TEACHER_KEYS = ("dataset", "uid", "cot", "answer")


def load_teacher_cot(path: str | Path, dataset: str) -> dict[str, tuple[str, str]]:
    """Read a teacher-chain file into ``{uid: (cot, normalised answer)}``.

    The file is JSON Lines, one ``{"dataset", "uid", "question", "cot", "answer"}``
    object per line ("question" is optional and informational); every line must name
    ``dataset``. Any problem raises DataError naming the line.
    """
    path = Path(path)
    hint = 'Each line must be a JSON object with keys "dataset", "uid", "question", "cot", "answer".'
    if not path.is_file():
        raise DataError(f"Teacher CoT file not found: {path}. Pass --teacher-cot pointing at a JSON Lines file.")
    chains: dict[str, tuple[str, str]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"Teacher CoT file {path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}). {hint}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: not a JSON object. {hint}")
            bad = [k for k in _TEACHER_KEYS if not isinstance(obj.get(k), str)]
            if bad:
                raise DataError(f"{where}: missing or non-string {', '.join(bad)}. {hint}")
            if obj["dataset"] != dataset:
                raise DataError(f"{where}: dataset is {obj['dataset']!r} but {dataset!r} is being "
                                f"loaded. Pass a teacher file made for {dataset}.")
            if obj["uid"] in chains:
                raise DataError(f"{where}: uid {obj['uid']!r} appears twice. Keep one chain per uid.")
            answer = obj["answer"].strip().strip("()").strip()
            answer = answer if re.fullmatch(r"[A-E]", answer) else (normalize_number(answer) or answer)
            chains[obj["uid"]] = (obj["cot"], answer)
    if not chains:
        raise DataError(f"Teacher CoT file {path} holds no chains. {hint}")
    return chains


# ----------------------------------------------------------------------------- entry point


def load_examples(dataset: str, split: str = "train", *, data_dir: str | Path | None = None,
                  ref_style: str = "solution", teacher_cot: str | Path | None = None,
                  n: int | None = None, seed: int = 0) -> list[Example]:
    """Load one split of a dataset as Examples ready for tokenisation.

    ``n=None`` gives every record in file order (synthetic: ``SYNTHETIC_DEFAULT_N``
    generated problems); ``n`` gives a uniform random sample without replacement,
    reproducible for ``seed``, and a prefix of the sample for any larger ``n``.
    With ``teacher_cot``, ``y`` is the teacher's chain, ``x_ref`` carries the dataset's
    own solution, and records without a chain, or whose teacher answer differs from
    the gold one (the paper keeps only correctly answered samples), are dropped before
    sampling. ``ref_style`` is "solution" (terse solution in ``x_ref`` where one exists)
    or "answer" (question + answer only); it is ignored with a teacher.
    """
    if dataset not in DATASETS:
        raise DataError(f"Unknown dataset {dataset!r}. Choose one of: {', '.join(DATASETS)}.")
    if split not in SPLITS[dataset]:
        raise DataError(f"Unknown split {split!r} for {dataset}. Choose one of: {', '.join(SPLITS[dataset])}.")
    if ref_style not in REF_STYLES:
        raise DataError(f"Unknown ref_style {ref_style!r}. Choose one of: {', '.join(REF_STYLES)}.")
    if n is not None and n < 0:
        raise DataError(f"Sample size must be >= 0, got {n}. Pass a non-negative --n.")

    if dataset in ("synthetic", "synthetic_easy"):
        records = synthetic_records(SYNTHETIC_DEFAULT_N if n is None else n, seed=seed, split=split,
                                    level="standard" if dataset == "synthetic" else "easy")
    else:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        if root is None:
            raise DataError("No dataset folder found (looked for ../shared/datasets). Pass --data-dir "
                            "pointing at it, or set LESFT_DATA_DIR.")
        if not root.is_dir():
            raise DataError(f"Dataset folder not found: {root}. Pass --data-dir pointing at an existing "
                            f"folder (or set LESFT_DATA_DIR).")
        records = _read_source(dataset, split, root)

    if teacher_cot is not None:
        chains = load_teacher_cot(teacher_cot, dataset)
        examples = [assemble_with_teacher(r, chains[r.uid][0]) for r in records
                    if r.uid in chains and chains[r.uid][1] == r.answer]
        if not examples:
            raise DataError(f"Teacher CoT file {teacher_cot} has no correct chain for any {dataset} "
                            f"{split} uid (uids look like {records[0].uid if records else '?'}). "
                            f"Pass the teacher file made for this split.")
    else:
        examples = [assemble(r, ref_style) for r in records]

    if n is None or dataset in ("synthetic", "synthetic_easy"):
        return examples
    if n > len(examples):
        raise DataError(f"Asked for {n} {dataset} {split} examples but only {len(examples)} are "
                        f"available. Lower --n to at most {len(examples)}.")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:n]]
