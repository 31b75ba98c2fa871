"""A client's own examples from a file: JSON Lines, a JSON array or CSV with a header.

The format is detected from the content, never from the file name:

- a first non-blank character ``[`` is a JSON array of objects, ``{`` JSON Lines (one
  object per line), anything else CSV with a header line (comma, tab or semicolon);
- the record kind comes from the first record's fields: ``messages`` (chat),
  ``prompt`` + ``completion`` (TRL's prompt-completion) or ``question`` + ``answer``.
  ``--data-fields prompt=q,completion=a,reference=r,final_answer=f,messages=m`` maps
  other names onto these roles.

Every record becomes the same :class:`~lesft.data.records.Example` the built-in datasets
make, so batching, the loss and the wire are unchanged:

- prompt-completion: ``x`` = the prompt, ``y`` = the completion, as written (TRL joins them
  with nothing in between);
- question-answer: the built-in template, ``x = "Question: ...\\nAnswer:"``, ``y = " " + answer``;
- chat: ``x`` = the tokenizer's chat template over every message before the *last*
  assistant turn (with the generation prompt), ``y`` = that last assistant turn as the
  template renders it. Earlier assistant turns are context, not targets: to train on
  every turn, write one record per turn. A tokenizer without a chat template gets
  ``"<Role>: <content>"`` lines and ``"Assistant:"``, and ``y = " " + content``.

The reference input ``x~`` of LESFT is the prompt joined with the ground truth: a
``reference`` field (a worked solution, a verified answer) becomes a
``Reference solution: ...`` line, a short final answer a ``Reference answer: ...`` line,
as in the built-in datasets. The lines go after the question of a question-answer record
(before its ``Answer:`` cue), at the end of the last user message of a chat, and before
the prompt of a prompt-completion record (so its prompt still leads straight into the
completion). The final answer is a ``final_answer`` field, else read off the completion
(``#### 72`` or a closing "The answer is 72."). A run that trains on the reference path
(LESFT with ``--paths dual`` or ``reference``) refuses a record that has neither.

Bad data stops the run before any round, with one line naming the file, the line and
the fix: a file that is not UTF-8, empty, in no known format, a malformed line, a missing
or empty field, or a record longer than ``--max-length`` tokens. Long records are never
cut or skipped silently (a cut target would teach the model to stop mid-answer): raise
``--max-length`` or shorten the record. A file is read whole before anything trains.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lesft.answers import normalize_number
from lesft.data.records import ANSWER_CUE, DataError, Example, one_line, question_block

ROLES = ("prompt", "completion", "reference", "final_answer", "messages")
KINDS = {"prompt-completion": "prompt-completion (TRL)", "question-answer": "question-answer", "chat": "chat messages"}
OWN_DATASET = "own"
_DEFAULTS = {"prompt": ("prompt", "question"), "completion": ("completion", "answer"), "reference": ("reference",),
             "final_answer": ("final_answer",), "messages": ("messages",)}
_CHAT_ROLES = ("system", "user", "assistant")


def parse_fields(spec: str) -> dict[str, str]:
    """``"prompt=q,completion=a"`` -> ``{"prompt": "q", "completion": "a"}`` (ConfigError-style DataError)."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        role, eq, name = (p.strip() for p in item.partition("="))
        if not eq or not name or role not in ROLES:
            raise DataError(f"data_fields item {item!r} is not valid: write role=field with a role of "
                            f"{', '.join(ROLES)}, e.g. --data-fields prompt=q,completion=a.")
        out[role] = name
    return out


def client_data_path(data: str, client_data: str, client_id: int) -> str | None:
    """This client's file: ``--data``, else ``--client-data`` with ``{id}`` filled in, else None."""
    if data:
        return data
    return client_data.replace("{id}", str(client_id)) if client_data else None


def local_data_paths(data: str, client_data: str, clients: int) -> list[str] | None:
    """Every client's file for a run on this machine (``lesft train``), or None (built-in data)."""
    if data and client_data:
        raise DataError("both --data and --client-data are set: a local run takes --client-data 'file{id}.jsonl' "
                        "(--data is one client's own file, for lesft-worker --role client).")
    if data and clients > 1:
        raise DataError(f"--data names one client's file but the run has --clients {clients}: pass "
                        "--client-data 'data/client{id}.jsonl' (one file per client) or --clients 1.")
    if data:
        return [data]
    return [client_data.replace("{id}", str(i)) for i in range(clients)] if client_data else None


@dataclass
class DataFile:
    """One loaded file: its examples (file order), what was detected, and its path."""

    path: Path
    format: str
    kind: str
    examples: list[Example]

    def describe(self) -> str:
        return f"{self.path}: {len(self.examples)} examples, {self.format}"


# ----------------------------------------------------------------------------- reading


def _where(path: Path, line: int | None) -> str:
    return f"{path} line {line}" if line else str(path)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: data file not found: pass --data (or --client-data) with the path of this "
                        "client's JSON Lines, JSON or CSV file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}): save the file as UTF-8."
                        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty: add one example per line, e.g. "
                        '{"prompt": "...", "completion": "..."}.')
    return text


def _json_lines(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}): write one JSON "
                            "object per line.") from None


def _json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """The items of a top-level array, each with the line it starts on."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip(p: int) -> int:
        while p < len(text) and text[p].isspace():
            p += 1
        return p

    def fail(p: int, what: str):
        raise DataError(f"{path} line {text.count(chr(10), 0, p) + 1}: not a valid JSON array ({what}): "
                        "write [ {...}, {...} ] or one object per line.")

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            item, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        yield line, item
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if text[skip(pos + 1):].strip():
                fail(skip(pos + 1), "text after the closing ]")
            return
        fail(pos, "expected , or ]")


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    first = text.lstrip("\n").split("\n", 1)[0]
    delimiter = max(",\t;", key=first.count)
    if first.count(delimiter) == 0 and not re.fullmatch(r"\s*[A-Za-z_][\w ]*\s*", first):
        raise DataError(f"{path} line 1: unknown format: use JSON Lines ({{\"prompt\": ..., \"completion\": ...}} "
                        "per line), a JSON array of such objects, or CSV with a header line.")
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(reader)
        header = [h.strip() for h in header]
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path} line {reader.line_num}: {len(row)} columns where the header has "
                                f"{len(header)}: quote cells that hold a {delimiter!r}.")
            yield reader.line_num, dict(zip(header, row))
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({e}): fix the quoting.") from None


def _records(path: Path, text: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    head = text.lstrip()[0]
    if head == "[":
        return "JSON array", _json_array(path, text)
    if head == "{":
        return "JSON Lines", _json_lines(path, text)
    return "CSV", _csv_rows(path, text)


# ----------------------------------------------------------------------------- records


def _names(fields: dict[str, str], role: str) -> tuple[str, ...]:
    return (fields[role],) if role in fields else _DEFAULTS[role]


def _detect_kind(obj: dict, fields: dict[str, str]) -> tuple[str, dict[str, str]] | None:
    """The record kind and the field name of each role, from the first record (None: unknown)."""
    def first(role: str) -> str | None:
        return next((n for n in _names(fields, role) if n in obj), None)

    names = {r: n for r in ROLES if (n := first(r)) is not None}
    for optional in ("reference", "final_answer"):  # may be absent from the first record only
        names.setdefault(optional, _names(fields, optional)[0])
    if "messages" in names:
        return "chat", names
    if "prompt" in names and "completion" in names:
        kind = "question-answer" if (names["prompt"], names["completion"]) == ("question", "answer") else \
            "prompt-completion"
        return kind, names
    return None


def final_answer(text: str) -> str | None:
    """The short final answer a completion states: ``#### 72`` or a closing "The answer is 72."."""
    m = re.search(r"####\s*([^\n]+?)\s*$", text)
    if m is None:
        m = re.search(r"(?i)\bthe\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]{1,80}?)\s*\.?\s*$", text.strip())
    answer = m.group(1).strip().rstrip(".").strip() if m else ""
    return answer or None


def _ref_lines(reference: str | None, final: str | None) -> str:
    lines = []
    if reference:
        lines.append(f"Reference solution: {one_line(reference)}")
    if final:
        lines.append(f"Reference answer: {one_line(final)}")
    return "\n".join(lines)


def _render_chat(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """``(x, y)``: the context with the generation prompt, and the last assistant turn."""
    *context, last = messages
    if getattr(tokenizer, "chat_template", None):
        x = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        y = full[len(x):] if full.startswith(x) else last["content"]
        y = y.rstrip()
        eos = getattr(tokenizer, "eos_token", None)
        if eos and y.endswith(eos):  # the trainer appends EOS itself
            y = y[:-len(eos)]
        return x, y
    x = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in context) + "Assistant:"
    return x, " " + last["content"].strip()


def _text(obj: dict, name: str, where: str, required: bool) -> str | None:
    value = obj.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"{where}: the field {name!r} is {'missing' if value is None else 'empty'}: "
                            f"give every record a non-empty {name!r}.")
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise DataError(f"{where}: the field {name!r} is not text: write it as a string.")
    return str(value)


def _messages(obj: dict, name: str, where: str) -> list[dict]:
    msgs = obj.get(name)
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: the field {name!r} is {'missing' if msgs is None else 'not a non-empty list'}: "
                        'write "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}].')
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _CHAT_ROLES or not isinstance(m.get("content"), str) \
                or not m["content"].strip():
            raise DataError(f"{where}: message {i} needs a role ({'/'.join(_CHAT_ROLES)}) and non-empty text "
                            "content: fix that message.")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant" or len(out) < 2:
        raise DataError(f"{where}: the last message must be the assistant's answer (the target), after at least "
                        "one user message: end each record with the assistant turn to learn.")
    return out


def _example(kind: str, obj: dict, names: dict[str, str], tokenizer, uid: str, where: str) -> tuple[Example, bool]:
    """One record as an Example, and whether it holds a reference (field or final answer)."""
    reference = _text(obj, names["reference"], where, False)
    final = _text(obj, names["final_answer"], where, False)
    if kind == "chat":
        msgs = _messages(obj, names["messages"], where)
        x, y = _render_chat(tokenizer, msgs)
        final = final or final_answer(msgs[-1]["content"])
        extra = _ref_lines(reference, final)
        if extra:
            ref_msgs = [dict(m) for m in msgs[:-1]]
            ref_msgs[-1]["content"] = ref_msgs[-1]["content"] + "\n\n" + extra
            x_ref = _render_chat(tokenizer, ref_msgs + [msgs[-1]])[0]
        else:
            x_ref = x
        gold = final or msgs[-1]["content"].strip()
    else:
        prompt = _text(obj, names["prompt"], where, True)
        completion = _text(obj, names["completion"], where, True)
        final = final or final_answer(completion)
        extra = _ref_lines(reference, final)
        if kind == "question-answer":
            block = question_block(prompt)
            x, y = f"{block}{ANSWER_CUE}", " " + completion.strip()
            x_ref = f"{block}\n{extra}{ANSWER_CUE}" if extra else x
        else:
            x, y = prompt, completion
            x_ref = f"{extra}\n{prompt}" if extra else x
        gold = final or completion.strip()
    return Example(uid=uid, dataset=OWN_DATASET, x=x, y=y, x_ref=x_ref, answer=gold, kind=kind), bool(extra)


def load_data_file(path: str | Path, tokenizer, *, fields: str | dict[str, str] = "", max_length: int | None = None,
                   need_reference: bool = False) -> DataFile:
    """Read, check and convert one file (see the module docstring); DataError names the first problem.

    ``max_length`` checks every record fits (prompt or reference prompt + target + EOS);
    ``need_reference`` refuses records without a reference or final answer.
    """
    path = Path(path).expanduser()
    fields = parse_fields(fields) if isinstance(fields, str) else dict(fields)
    text = _read_text(path)
    container, records = _records(path, text)
    kind = names = None
    examples: list[Example] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for line, obj in records:
        where = _where(path, line)
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a record must be a JSON object, not {type(obj).__name__}: "
                            'write {"prompt": ..., "completion": ...}.')
        if kind is None:
            detected = _detect_kind(obj, fields)
            if detected is None:
                found = ", ".join(map(repr, obj)) or "none"
                raise DataError(f"{where}: unknown format (fields {found}): use prompt+completion, messages or "
                                "question+answer, or map your names with --data-fields prompt=...,completion=...")
            kind, names = detected
        ex, has_ref = _example(kind, obj, names, tokenizer, f"{path.stem}:{line}", where)
        if need_reference and not has_ref:
            raise DataError(f"{where}: LESFT needs a reference input x~ but this record has no "
                            f"{names['reference']!r} field and no final answer: add a {names['reference']!r} "
                            f"field (worked solution or verified answer) or a {names['final_answer']!r} field, or "
                            "train with --paths base.")
        if max_length is not None:
            target = len(tokenizer(ex.y, add_special_tokens=False).input_ids) + len(eos)
            n = max(len(tokenizer(ex.x).input_ids), len(tokenizer(ex.x_ref).input_ids)) + target
            if n > max_length:
                raise DataError(f"{where}: the record is {n} tokens, longer than --max-length {max_length}: raise "
                                f"--max-length to at least {n}, or shorten or remove the record.")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: the file holds no records: add one example per line.")
    return DataFile(path, f"{container}, {KINDS[kind]}", kind, examples)


# ----------------------------------------------------------------------------- scoring


def _canonical(answer: str | None) -> str | None:
    if answer is None:
        return None
    text = one_line(answer).strip().rstrip(".").strip().casefold()
    return normalize_number(text) or text


def answer_of(output: str) -> str | None:
    """What a model output answers: its stated final answer, else its first non-empty line."""
    stated = final_answer(output)
    if stated is not None:
        return stated
    return next((line.strip() for line in output.splitlines() if line.strip()), None)


class Scorer:
    """Scores a model output against an Example of a user's file.

    ``exact`` (default): the output's final answer (``#### x``, "The answer is x", else its
    first line) equals the record's (``final_answer`` field, else read off the completion,
    else the whole completion), ignoring case, spaces, a closing full stop and number
    formatting. ``regex``: the pattern's first group (or whole match) in the output equals
    that in the completion (else the final answer). ``extract``: a built-in extractor
    (``gsm8k`` numbers, ``choice`` letters A-E) on both sides.
    """

    EXTRACTORS = {"gsm8k": "gsm8k", "choice": "commonsenseqa"}

    def __init__(self, answer_regex: str | None = None, extract: str | None = None) -> None:
        if answer_regex and extract:
            raise DataError("pass --answer-regex or --extract, not both.")
        if extract is not None and extract not in self.EXTRACTORS:
            raise DataError(f"--extract {extract!r} is not valid: use one of {', '.join(self.EXTRACTORS)}.")
        try:
            self.regex = re.compile(answer_regex) if answer_regex else None
        except re.error as e:
            raise DataError(f"--answer-regex {answer_regex!r} is not a valid regular expression ({e}).") from None
        self.extract = extract
        self.mode = "regex" if self.regex else (f"extract:{extract}" if extract else "exact")

    def _search(self, text: str) -> str | None:
        m = self.regex.search(text)
        if m is None:
            return None
        return (m.group(1) if self.regex.groups else m.group(0)).strip()

    def __call__(self, output: str, ex: Example) -> tuple[str | None, bool]:
        """``(the prediction, whether it is correct)``."""
        if self.extract:
            from lesft.answers import extract_answer, is_correct

            ds = self.EXTRACTORS[self.extract]
            pred = extract_answer(output, ds)
            gold = extract_answer(ex.answer, ds) or ex.answer
            return pred, is_correct(pred, gold, ds)
        if self.regex is not None:
            pred = self._search(output)
            gold = self._search(ex.y) or ex.answer
            return pred, pred is not None and _canonical(pred) == _canonical(gold)
        pred = answer_of(output)
        return pred, pred is not None and _canonical(pred) == _canonical(ex.answer)

