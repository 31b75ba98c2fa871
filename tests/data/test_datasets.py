"""Loaders on the real files in ../shared/datasets (skipped where absent), teacher files, errors."""

import json
import re
from pathlib import Path

import pytest

from lesft.data import (
    DataError, answer_sentence, clean_gsm8k_solution, default_data_dir, load_examples,
    normalize_number, prompt_for, strip_final_answer,
)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    found = default_data_dir()
    if found is None or not (found / "gsm8k" / "train.jsonl").is_file():
        pytest.skip("../shared/datasets not found: set LESFT_DATA_DIR to run this test")
    return found


@pytest.fixture(scope="module")
def gsm8k_train(data_dir):
    return load_examples("gsm8k", "train", data_dir=data_dir)


@pytest.fixture(scope="module")
def aqua_eval(data_dir):
    return load_examples("aqua_rat", "dev", data_dir=data_dir) + load_examples("aqua_rat", "test", data_dir=data_dir)


def _check_shape(ex):
    assert ex.x.endswith("\nAnswer:") and ex.x_ref.endswith("\nAnswer:")
    assert ex.y.startswith(" ") and not ex.y.startswith("  ") and "\n" not in ex.y
    assert ex.y.endswith(answer_sentence(ex.answer))


@pytest.mark.datasets
@pytest.mark.parametrize("dataset, split, count", [
    ("gsm8k", "test", 1319), ("commonsenseqa", "dev", 1221), ("commonsenseqa", "test", 1221),
    ("commonsenseqa", "train", 9741), ("aqua_rat", "train", 2728), ("aqua_rat", "dev", 254),
    ("aqua_rat", "test", 254),
])
def test_counts_and_shape(data_dir, dataset, split, count):
    examples = load_examples(dataset, split, data_dir=data_dir)
    assert len(examples) == count
    assert len({e.uid for e in examples}) == count
    for ex in examples:
        _check_shape(ex)


@pytest.mark.datasets
def test_gsm8k_train(gsm8k_train):
    assert len(gsm8k_train) == 7473
    assert gsm8k_train[17].uid == "gsm8k-train-00017"
    for ex in gsm8k_train:
        _check_shape(ex)
        assert re.fullmatch(r"-?\d+", ex.answer), ex.answer
        assert "<<" not in ex.y and ">>" not in ex.y and "####" not in ex.y
        assert ex.kind in {f"steps-{i}" for i in range(6)}
    assert {"-7", "-47"} <= {e.answer for e in gsm8k_train}  # negatives survive
    first = gsm8k_train[0]
    assert first.x_ref.endswith("\nReference solution: 48/2=24; 48+24=72\nReference answer: 72\nAnswer:")
    assert first.y == (" Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips "
                       "altogether in April and May. The answer is 72.")


@pytest.mark.datasets
def test_gsm8k_readme_example(data_dir):
    janet = load_examples("gsm8k", "test", data_dir=data_dir)[0]
    assert janet.x.startswith("Question: Janet’s ducks lay 16 eggs per day.")
    assert "\nReference solution: 16-3-4=9; 9*2=18\nReference answer: 18\nAnswer:" in janet.x_ref
    assert janet.y == (" Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = $18 every day "
                       "at the farmer’s market. The answer is 18.")
    assert janet.kind == "steps-2"
    plain = load_examples("gsm8k", "test", data_dir=data_dir, ref_style="answer")[0]
    assert plain.x_ref == janet.x[: -len("\nAnswer:")] + "\nReference answer: 18\nAnswer:"
    assert plain.y == janet.y


def test_answer_normalisation():
    assert normalize_number("1,200") == "1200"
    assert normalize_number(" $1,080 ") == "1080"
    assert normalize_number("-3") == "-3"
    assert normalize_number("2.50") == "2.5" and normalize_number("3.0") == "3"
    steps, terse, answer = clean_gsm8k_solution("He pays 2 * $600 = $<<2*600=1200>>1,200.\n#### $1,200")
    assert (steps, terse, answer) == ("He pays 2 * $600 = $1,200.", "2*600=1200", "1200")


@pytest.mark.datasets
def test_commonsenseqa_templates(data_dir):
    ex = load_examples("commonsenseqa", "test", data_dir=data_dir)[0]
    assert ex.uid == "commonsenseqa-dev-00000"
    block = ("Question: A revolving door is convenient for two direction travel, but it also serves "
             "as a security measure at a what?\nAnswer choices: (A) bank (B) library "
             "(C) department store (D) mall (E) new york")
    assert ex.x == prompt_for("commonsenseqa", block) == block + "\nAnswer:"
    assert ex.x_ref == block + "\nReference answer: (A) bank\nAnswer:"
    assert ex.y == " The answer is A." and ex.answer == "A" and ex.kind == "A"


@pytest.mark.datasets
def test_aqua_flan_train_parsed(data_dir):
    ex = load_examples("aqua_rat", "train", data_dir=data_dir)[1]
    assert ex.x == ("Question: The edge of a cube is 7a cm. Find its surface?\nAnswer choices: "
                    "(A) 24a8 (B) 24a4 (C) 24a1 (D) 24a2 (E) 294a2\nAnswer:")
    assert ex.y == " 6a2 = 6 * 7a * 7a = 294a2. The answer is E."
    assert ex.x_ref.endswith("\nReference answer: (E) 294a2\nAnswer:")


@pytest.mark.datasets
def test_aqua_final_answer_lines_stripped(aqua_eval):
    first = aqua_eval[254]  # test line 1: "... to reach the base of the tower.\nAnswer : A"
    assert first.y.endswith("minutes to reach the base of the tower. The answer is A.")
    leftover = re.compile(r"(?i)\b(answer|ans|option|choice)\b\W{0,4}\(?[A-E]\)?\W*$")
    for ex in aqua_eval:
        body = ex.y[: -len(answer_sentence(ex.answer))]
        assert not leftover.search(body), ex.y[-80:]


@pytest.mark.parametrize("rationale, expected", [
    ("x = 5\nAnswer : A", "x = 5"),
    ("x = 5\nANSWER:C", "x = 5"),
    ("x = 5\nThe answer is (B).", "x = 5"),
    ("x = 5\nCorrect Option: D", "x = 5"),
    ("x = 5\nAnswer: D) 109 rolls", "x = 5"),
    ("covered 48 more km (ANSWER B)", "covered 48 more km"),
    ("x = 5\nHence (C) is correct answer.", "x = 5"),
    ("x = 5\nE", "x = 5"),
    ("x = 5\nAnswer: Option C\nANSWER: C", "x = 5"),
    ("x = 5. So choice E is correct.", "x = 5."),
    ("x = 250=D", "x = 250=D"),  # not a closing statement: kept
    ("Total is 50.", "Total is 50."),
    ("the answer is 2.5", "the answer is 2.5"),
])
def test_strip_final_answer(rationale, expected):
    assert strip_final_answer(rationale) == expected


@pytest.mark.datasets
def test_seeded_sampling(data_dir):
    a = load_examples("gsm8k", "test", data_dir=data_dir, n=50, seed=1)
    assert a == load_examples("gsm8k", "test", data_dir=data_dir, n=50, seed=1)
    assert a != load_examples("gsm8k", "test", data_dir=data_dir, n=50, seed=2)
    assert len({e.uid for e in a}) == 50
    assert load_examples("gsm8k", "test", data_dir=data_dir, n=80, seed=1)[:50] == a
    with pytest.raises(DataError, match="only 1319 are available. Lower --n"):
        load_examples("gsm8k", "test", data_dir=data_dir, n=5000)


def test_error_messages(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"GSM8K file not found: .*gsm8k/train.jsonl\. Pass --data-dir"):
        load_examples("gsm8k", data_dir=tmp_path)
    with pytest.raises(DataError, match="Dataset folder not found"):
        load_examples("gsm8k", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match="Unknown dataset 'mnist'"):
        load_examples("mnist")
    with pytest.raises(DataError, match="Unknown split 'dev' for gsm8k"):
        load_examples("gsm8k", "dev", data_dir=tmp_path)
    with pytest.raises(DataError, match="Unknown ref_style"):
        load_examples("synthetic", ref_style="both")
    monkeypatch.setenv("LESFT_DATA_DIR", str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"


def _teacher(tmp_path, lines) -> Path:
    path = tmp_path / "teacher.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _chain(uid, cot, answer, dataset="synthetic"):
    return {"dataset": dataset, "uid": uid, "question": "q", "cot": cot, "answer": answer}


def test_teacher_chains(tmp_path):
    gold = load_examples("synthetic", "train", n=3, seed=0)
    path = _teacher(tmp_path, [
        _chain(gold[0].uid, "First step.\nSecond step. The answer is " + gold[0].answer + ".", gold[0].answer),
        _chain(gold[1].uid, "Wrong reasoning.", "-99999"),  # dropped: teacher answer is wrong
        _chain(gold[2].uid, "Only steps", gold[2].answer),
    ])
    got = load_examples("synthetic", "train", n=3, seed=0, teacher_cot=path)
    assert [e.uid for e in got] == [gold[0].uid, gold[2].uid]
    assert got[0].y == " First step. Second step." + answer_sentence(gold[0].answer)
    assert got[1].y == " Only steps." + answer_sentence(gold[2].answer)
    # x_ref carries the dataset's own worded solution, then the answer
    own_steps = gold[0].y[1: -len(answer_sentence(gold[0].answer))]
    assert got[0].x_ref == (gold[0].x[: -len("\nAnswer:")] + f"\nReference solution: {own_steps}"
                            f"\nReference answer: {gold[0].answer}\nAnswer:")
    assert got[0].x == gold[0].x


@pytest.mark.parametrize("lines, message", [
    (["{not json"], "line 1: not valid JSON"),
    ([_chain("synthetic-train-0-00000", "c", "1"), {"uid": "x"}], "line 2: missing or non-string dataset, cot, answer"),
    ([_chain("gsm8k-train-00000", "c", "1", dataset="gsm8k")], "line 1: dataset is 'gsm8k' but 'synthetic'"),
    ([_chain("u", "c", "1"), _chain("u", "c", "1")], "line 2: uid 'u' appears twice"),
    ([_chain("no-such-uid", "c", "1")], "has no correct chain for any synthetic train uid"),
])
def test_bad_teacher_files(tmp_path, lines, message):
    with pytest.raises(DataError, match=re.escape(message)):
        load_examples("synthetic", n=5, teacher_cot=_teacher(tmp_path, lines))


def test_missing_teacher_file(tmp_path):
    with pytest.raises(DataError, match="Teacher CoT file not found: .*--teacher-cot"):
        load_examples("synthetic", n=5, teacher_cot=tmp_path / "absent.jsonl")


@pytest.mark.datasets
def test_gsm8k_teacher_reference_holds_worded_solution(data_dir, tmp_path):
    path = _teacher(tmp_path, [_chain("gsm8k-test-00000", "She keeps 16-3-4 = 9 eggs and earns 9*2 = 18.",
                                      "$18", dataset="gsm8k")])
    [ex] = load_examples("gsm8k", "test", data_dir=data_dir, teacher_cot=path)
    assert ex.y == " She keeps 16-3-4 = 9 eggs and earns 9*2 = 18. The answer is 18."
    assert ("\nReference solution: Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = $18 "
            "every day at the farmer’s market.\nReference answer: 18\nAnswer:") in ex.x_ref
