"""A client's own data file: formats detected from the content, the Examples they become,
the reference input x~, every bad-data case as one line, and the scorer of ``lesft eval --data``."""
from __future__ import annotations

import json

import pytest

from lesft.batching import encode
from lesft.config import ConfigError, build_config
from lesft.data import DataError
from lesft.data.files import Scorer, client_data_path, final_answer, load_data_file, local_data_paths, parse_fields


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def jsonl(tmp_path, name, rows):
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


PC = [{"prompt": "What is 2+3?", "completion": " 2+3=5. The answer is 5."},
      {"prompt": "What is 4*2?", "completion": " 4*2=8.", "reference": "4*2=8", "final_answer": "8"}]


def test_prompt_completion_jsonl(tmp_path, tokenizer):
    d = load_data_file(jsonl(tmp_path, "a.jsonl", PC), tokenizer, max_length=64, need_reference=True)
    assert d.format == "JSON Lines, prompt-completion (TRL)" and d.kind == "prompt-completion"
    a, b = d.examples
    assert (a.x, a.y, a.answer) == ("What is 2+3?", " 2+3=5. The answer is 5.", "5")
    # no reference field: the final answer read off the completion, before the prompt
    assert a.x_ref == "Reference answer: 5\nWhat is 2+3?"
    assert b.x_ref == "Reference solution: 4*2=8\nReference answer: 8\nWhat is 4*2?"
    assert (a.uid, b.uid) == ("a:1", "a:2")
    # the same Example -> Encoded path as the built-in data: one target for both paths
    enc = encode(tokenizer, b, 64)
    assert enc.base_ids[enc.base_start:] == enc.ref_ids[enc.ref_start:] == enc.target
    assert not enc.truncated


def test_question_answer_json_array_and_csv_with_mapped_fields(tmp_path, tokenizer):
    arr = write(tmp_path, "b.json", '[{"question": "Sky colour?", "answer": "Blue. #### blue"},\n'
                                    ' {"question": "1+1?", "answer": "2", "reference": "one plus one"}]')
    d = load_data_file(arr, tokenizer)
    assert d.format == "JSON array, question-answer"
    assert d.examples[0].x == "Question: Sky colour?\nAnswer:" and d.examples[0].y == " Blue. #### blue"
    assert d.examples[0].x_ref == "Question: Sky colour?\nReference answer: blue\nAnswer:"
    assert d.examples[1].x_ref == "Question: 1+1?\nReference solution: one plus one\nAnswer:"
    assert d.examples[1].uid == "b:2"  # the line the item starts on
    csv_path = write(tmp_path, "c.csv", 'q,a,r\nHow many legs has a cat?,4,"cats have 4 legs, like dogs"\n')
    c = load_data_file(csv_path, tokenizer, fields="prompt=q,completion=a,reference=r", need_reference=True)
    assert c.format == "CSV, prompt-completion (TRL)"
    assert (c.examples[0].x, c.examples[0].y) == ("How many legs has a cat?", "4")
    assert c.examples[0].x_ref.startswith("Reference solution: cats have 4 legs, like dogs\n")


def test_chat_messages_last_assistant_turn_is_the_target(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "6*7?"},
                          {"role": "assistant", "content": "6*7=42. The answer is 42."}]}]
    d = load_data_file(jsonl(tmp_path, "chat.jsonl", rows), tokenizer, need_reference=True)
    ex = d.examples[0]
    assert d.kind == "chat"
    # the local tokenizer has no chat template: the documented fallback
    assert ex.x == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: 6*7?\nAssistant:"
    assert ex.y == " 6*7=42. The answer is 42." and ex.answer == "42"
    assert ex.x_ref == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: 6*7?\n\nReference answer: 42\nAssistant:"


def test_chat_template_of_the_tokenizer_is_used(tmp_path, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             "reference": "two and two"}]
    ex = load_data_file(jsonl(tmp_path, "t.jsonl", rows), tok).examples[0]
    assert ex.x == "<user>2+2?<|endoftext|>\n<assistant>"
    assert ex.y == "4"  # the template's closing EOS text is dropped: the trainer appends EOS itself
    assert ex.x_ref == "<user>2+2?\n\nReference solution: two and two<|endoftext|>\n<assistant>"


def test_final_answer_forms():
    assert final_answer("so 3+4=7\n#### 7") == "7"
    assert final_answer("3+4=7. The answer is 7.") == "7"
    assert final_answer("Thus the final answer is: (B) bank.") == "(B) bank"
    assert final_answer("no marker here") is None


GOOD = b'{"prompt": "a", "completion": "The answer is b."}\n'
BAD = {
    "malformed line": (GOOD + b'{"prompt": "a", "completion": \n', "line 2", "JSON"),
    "missing field": (GOOD + b'{"prompt": "c"}\n', "line 2", "'completion' is missing"),
    "empty field": (GOOD + b'\n{"prompt": "  ", "completion": "d"}\n', "line 3",
                    "'prompt' is empty"),
    "empty file": (b"\n  \n", "empty", "add one example"),
    "not utf-8": (GOOD + b'{"prompt": "caf\xe9", "completion": "d"}\n', "line 2",
                  "UTF-8"),
    "unknown format": (b'{"input": "a", "output": "b"}\n', "line 1", "--data-fields"),
    "unknown text format": (b"just some words\nand more\n", "line 2", "unknown format"),
    "bad message": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1", "last message"),
    "ragged csv": (b"prompt,completion\na,The answer is b.\nc,d,e\n", "line 3", "columns"),
    "no reference": (b'{"prompt": "a", "completion": "b"}\n', "line 1", "reference"),
    "too long": (GOOD + b'{"prompt": "' + b"word " * 80 + b'", "completion": "The answer is d."}\n',
                 "line 2", "--max-length 32"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_one_line_naming_file_line_and_fix(tmp_path, tokenizer, case):
    body, where, words = BAD[case]
    path = write(tmp_path, "bad.jsonl", body)
    with pytest.raises(DataError) as err:
        load_data_file(path, tokenizer, max_length=32, need_reference=True)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and where in msg and words in msg, msg


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        load_data_file(tmp_path / "nope.jsonl", tokenizer)


def test_data_is_a_toml_key_at_the_top_level_and_in_its_group(tmp_path):
    top = write(tmp_path, "a.toml", 'data = "mine.jsonl"\n')
    grouped = write(tmp_path, "b.toml", '[data]\ndata = "mine.jsonl"\nclients = 3\n')
    assert build_config(toml=top, env={}).data.data == "mine.jsonl"
    cfg = build_config(toml=grouped, env={})
    assert (cfg.data.data, cfg.data.clients) == ("mine.jsonl", 3)
    assert build_config(toml=write(tmp_path, "c.toml", cfg.to_toml()), env={}).data.data == "mine.jsonl"


def test_settings_and_paths():
    assert parse_fields("prompt=q, completion=a") == {"prompt": "q", "completion": "a"}
    with pytest.raises(DataError, match="role=field"):
        parse_fields("question=q")
    with pytest.raises(ConfigError, match="data_fields"):
        build_config(cli={"data_fields": "prompt"}, env={})
    with pytest.raises(ConfigError, match="needs {id}"):
        build_config(cli={"client_data": "data/all.jsonl", "clients": 2}, env={})
    with pytest.raises(ConfigError, match="no other braces"):
        build_config(cli={"client_data": "data/{name}{id}.jsonl"}, env={})
    cfg = build_config(cli={"client_data": "d/c{id}.jsonl", "data": "mine.jsonl"}, env={"LESFT_DATA": "env.jsonl"})
    assert cfg.data.data == "mine.jsonl"  # the flag beats the env var; the `data` group does not clash
    assert build_config(cli={}, env={"LESFT_DATA": "env.jsonl"}).data.data == "env.jsonl"
    assert client_data_path("", "d/c{id}.jsonl", 3) == "d/c3.jsonl"
    assert client_data_path("mine.jsonl", "d/c{id}.jsonl", 3) == "mine.jsonl"
    assert local_data_paths("", "d/c{id}.jsonl", 2) == ["d/c0.jsonl", "d/c1.jsonl"]
    assert local_data_paths("", "", 2) is None
    with pytest.raises(DataError, match="--client-data"):
        local_data_paths("one.jsonl", "", 2)
    toml = build_config(cli={"client_data": "d/c{id}.jsonl"}, env={}).to_toml()
    assert 'client_data = "d/c{id}.jsonl"' in toml


def test_scorer_modes(tmp_path, tokenizer):
    rows = [{"prompt": "2+3?", "completion": " 2+3=5. The answer is 5."},
            {"prompt": "Capital?", "completion": "Paris"},
            {"prompt": "Pick", "completion": "I pick (C) library.", "final_answer": "C"},
            {"prompt": "Price?", "completion": " It costs $1,200.00 in all. #### 1200"}]
    exs = load_data_file(jsonl(tmp_path, "e.jsonl", rows), tokenizer).examples
    exact = Scorer()
    assert exact(" so 5. The answer is 5.", exs[0]) == ("5", True)
    assert exact(" The answer is 6.", exs[0]) == ("6", False)
    assert exact("paris.\nmore text", exs[1]) == ("paris.", True)  # first line, case and full stop ignored
    assert exact("#### 1,200", exs[3])[1] is True  # number formatting ignored
    assert exact("", exs[1]) == (None, False)
    regex = Scorer(answer_regex=r"costs \$([\d,.]+)")
    assert regex("it costs $1200 total", exs[3]) == ("1200", True)
    assert regex("no price", exs[3]) == (None, False)
    choice = Scorer(extract="choice")
    assert choice("The answer is (C).", exs[2]) == ("C", True)
    assert choice("The answer is (B).", exs[2])[1] is False
    assert Scorer(extract="gsm8k")("so it is 1200 dollars. The answer is 1200.", exs[3])[1] is True
    with pytest.raises(DataError, match="not both"):
        Scorer(answer_regex="x", extract="gsm8k")
    with pytest.raises(DataError, match="--extract"):
        Scorer(extract="letters")
    with pytest.raises(DataError, match="regular expression"):
        Scorer(answer_regex="(")


def test_evaluate_uses_the_scorer_on_a_fake_model(tmp_path, tokenizer, monkeypatch):
    """The accuracy of a file of known answers, with generation replaced by known outputs."""
    from lesft import evaluate as ev

    rows = [{"prompt": f"q{i}?", "completion": f" The answer is {i}."} for i in range(5)]
    exs = load_data_file(jsonl(tmp_path, "k.jsonl", rows), tokenizer).examples
    outputs = [" The answer is 0.", " The answer is 1.", " The answer is 7.", " The answer is 3.", " I do not know"]

    def fake_generate(model, tok, prompts, **kw):
        assert prompts == [e.x for e in exs]
        for i, text in enumerate(outputs):
            kw["on_output"](i, text)
        return outputs

    monkeypatch.setattr(ev, "generate", fake_generate)
    res = ev.evaluate(None, tokenizer, exs, scorer=Scorer())
    assert (res.n, res.correct, res.accuracy) == (5, 3, 0.6)
    assert [r["correct"] for r in res.records] == [True, True, False, True, False]
    assert res.records[2]["extracted"] == "7" and res.records[2]["gold"] == "2"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_ends_lesft_train_in_one_line(tmp_path, case):
    """Every bad-data case through the CLI: non-zero exit, one line naming the file and the
    line, no traceback, and nothing written to the run (the check comes before any party)."""
    from typer.testing import CliRunner

    from lesft.cli import app

    write(tmp_path, "c0.jsonl", GOOD * 2)
    path = write(tmp_path, "c1.jsonl", BAD[case][0])
    res = CliRunner().invoke(app, ["train", "--inprocess", "--model", "arch:tiny-qwen2", "--clients", "2",
                                   "--max-length", "32", "--runs-dir", str(tmp_path / "runs"), "--run-id", "r",
                                   "--client-data", str(tmp_path / "c{id}.jsonl")])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert str(path) in lines[0] and BAD[case][1] in lines[0] and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not (tmp_path / "runs").exists()
