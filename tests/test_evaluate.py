"""Tests for lesft.evaluate and ``lesft eval``: greedy generation (batching, left padding,
EOS, restarts) against a slow cache-free reference, adapter loading against PEFT, scoring,
the loss probe, and the command. Tiny random presets only: their text is garbage, the
mechanics are not.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lesft import evaluate as ev
from lesft import lora
from lesft.answers import wilson_interval
from lesft.config import LoraSettings
from lesft.data import load_examples
from lesft.lora import AdapterError
from lesft.models import RandomWeights, resolve
from lesft.split import FullModel

SETTINGS = LoraSettings(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=("gate_proj", "down_proj"))


@pytest.fixture(scope="module")
def source():
    return resolve("arch:tiny-llama")


@pytest.fixture(scope="module")
def sharp_source():
    """tiny-llama with large random weights: peaked attention and varied greedy tokens,
    so masking mistakes change the output (with std 0.02 attention is nearly uniform)."""
    src = resolve("arch:tiny-llama")
    src.weights = RandomWeights(std=0.3, tied=False)
    return src


@pytest.fixture(scope="module")
def tok(source):
    return source.load_tokenizer()


@pytest.fixture(scope="module")
def examples():
    return load_examples("synthetic", "test", n=6, seed=3)


def prompts_of(examples):
    prompts = [ex.x for ex in examples]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths are needed to exercise padding"
    return prompts


def reference_greedy(model: FullModel, tok, prompt: str, max_new_tokens: int) -> list[int]:
    """Slow and obvious: the whole sequence through the model at every step, no cache, no padding."""
    ids = list(tok(prompt).input_ids)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + out])
            t = int(model(x, torch.ones_like(x))[0, -1].argmax())
            if t in tok.all_special_ids:  # EOS and the other special tokens end a row
                break
            out.append(t)
    return out


# --------------------------------------------------------------------------- generation


def test_greedy_matches_a_cache_free_reference(sharp_source, tok, examples):
    model = ev.load_for_eval(sharp_source, None, dtype=torch.float64)
    prompts = prompts_of(examples)[:3]

    stats: dict = {}
    got = ev.generate(model, tok, prompts, max_new_tokens=12, batch_size=3, stop_at_newline_question=False,
                      stats=stats)

    want = [tok.decode(reference_greedy(model, tok, p, 12), skip_special_tokens=True) for p in prompts]
    assert got == want
    assert stats["new_tokens"] == [12, 12, 12]
    assert len(set("".join(got))) > 5  # varied text, not one repeated token


def test_greedy_outputs_do_not_depend_on_batch_size(source, tok, examples):
    model = ev.load_for_eval(source, None)
    prompts = prompts_of(examples)

    one = ev.generate(model, tok, prompts, max_new_tokens=10, batch_size=1)
    four = ev.generate(model, tok, prompts, max_new_tokens=10, batch_size=4)

    assert one == four
    assert all(isinstance(o, str) for o in one) and len(one) == len(prompts)


def test_left_padding_does_not_change_a_row(sharp_source, tok, examples):
    model = ev.load_for_eval(sharp_source, None, dtype=torch.float64)
    prompts = prompts_of(examples)
    shortest = min(prompts, key=len)

    alone = ev.generate(model, tok, [shortest], max_new_tokens=15, batch_size=1)
    padded = ev.generate(model, tok, prompts, max_new_tokens=15, batch_size=len(prompts))

    assert padded[prompts.index(shortest)] == alone[0]
    assert padded == ev.generate(model, tok, prompts, max_new_tokens=15, batch_size=1)


def test_rows_joining_a_running_batch_match_the_reference(sharp_source, tok, monkeypatch):
    """Rows end at different steps, so new prompts join a running batch (cache merges)."""
    model = ev.load_for_eval(sharp_source, None, dtype=torch.float64)
    prompts = [ex.x for ex in load_examples("synthetic", "test", n=8, seed=1)]
    free = [reference_greedy(model, tok, p, 16) for p in prompts]
    # an end token that stops some rows, at different steps, and not the others
    rows_with = {t: sum(t in r for r in free) for r in free for t in r}
    eos = max((t for t, k in rows_with.items() if k < len(prompts)), key=rows_with.get)
    assert 0 < sum(eos in r for r in free) < len(prompts)
    merges = []
    concat = ev._concat
    monkeypatch.setattr(ev, "_concat", lambda a, b: merges.append(1) or concat(a, b))

    got = ev.generate(model, tok, prompts, max_new_tokens=16, batch_size=3, stop_at_newline_question=False,
                      end_ids=[eos])

    assert merges, "no prompt joined a running batch"
    want = [tok.decode(r[:r.index(eos)] if eos in r else r, skip_special_tokens=True) for r in free]
    assert got == want


def test_generation_stops_a_row_at_eos(sharp_source, tok, examples):
    model = ev.load_for_eval(sharp_source, None, dtype=torch.float64)
    prompts = prompts_of(examples)[:2]
    free = [reference_greedy(model, tok, p, 10) for p in prompts]
    eos = free[0][3]  # declare the 4th token of the first row an end token
    assert eos not in free[0][:3]

    stats: dict = {}
    got = ev.generate(model, tok, prompts, max_new_tokens=10, batch_size=2, stop_at_newline_question=False,
                      stats=stats, end_ids=[eos])

    assert got[0] == tok.decode(free[0][:3], skip_special_tokens=True)
    assert stats["new_tokens"][0] == 3
    cut = free[1].index(eos) if eos in free[1] else 10
    assert got[1] == tok.decode(free[1][:cut], skip_special_tokens=True)  # the other row runs on


def test_end_tokens_are_eos_and_the_other_special_tokens(tok):
    assert ev._end_ids(tok) == {tok.eos_token_id, *tok.all_special_ids}
    assert ev._end_ids(tok, [7]) == ev._end_ids(tok) | {7}


def test_generation_stops_once_the_model_restarts_the_prompt(source, tok, examples, monkeypatch):
    model = ev.load_for_eval(source, None)
    prompt = examples[0].x
    free = ev.generate(model, tok, [prompt], max_new_tokens=12, stop_at_newline_question=False)[0]
    monkeypatch.setattr(ev, "_restarted", lambda text: len(text) >= 5)

    got = ev.generate(model, tok, [prompt], max_new_tokens=12)[0]

    assert len(got) >= 5 and free.startswith(got)
    assert len(free) < 5 or len(got) < len(free)


def test_restart_detection_waits_until_the_cut_is_settled():
    assert ev._restarted(" The answer is 72.\nQuestion: how")
    assert ev._restarted(" 5 apples.\n\nQuestion 2: x")
    assert not ev._restarted(" The answer is 72.")
    assert not ev._restarted(" 72.\n\nQuestion")  # "\n\nQuestions..." would not be a restart
    assert ev._restarted(" 72.\n\nQuestion ")


# --------------------------------------------------------------------------- adapters


def _trained_adapters(source, seed: int) -> dict[str, torch.Tensor]:
    from conftest import random_adapters

    model = lora.add_lora(FullModel(source), SETTINGS)
    return random_adapters(lora.get_adapters(model), seed)


def test_load_for_eval_reproduces_directly_set_adapters_and_peft(source, tmp_path):
    from peft import PeftModel

    adapters = _trained_adapters(source, seed=1)
    folder = lora.save_peft_adapter(adapters, SETTINGS, tmp_path / "adapter")
    direct = lora.add_lora(FullModel(source), SETTINGS)
    lora.set_adapters(direct, adapters)
    direct.eval()
    peft_model = PeftModel.from_pretrained(FullModel(source).lm, str(folder)).eval()
    ids = torch.randint(2, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    loaded = ev.load_for_eval(source, folder)

    assert not loaded.training
    with torch.no_grad():
        got = loaded(ids, mask)
        torch.testing.assert_close(got, direct(ids, mask), atol=0.0, rtol=0.0)
        torch.testing.assert_close(got, peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert (got - FullModel(source)(ids, mask)).abs().max() > 1e-3  # the adapter does something


def test_load_for_eval_honours_layers_to_transform(source, tmp_path):
    from peft import PeftModel

    adapters = {k: v for k, v in _trained_adapters(source, seed=2).items() if int(k.split(".")[1]) >= 2}
    folder = lora.save_peft_adapter(adapters, SETTINGS, tmp_path / "adapter", n_layers=source.n_layers)
    assert json.loads((folder / "adapter_config.json").read_text())["layers_to_transform"] == [2, 3]
    peft_model = PeftModel.from_pretrained(FullModel(source).lm, str(folder)).eval()
    ids = torch.randint(2, 500, (1, 9), generator=torch.Generator().manual_seed(1))

    loaded = ev.load_for_eval(source, folder)

    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, torch.ones_like(ids)), peft_model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_missing_or_broken_adapter_is_one_clear_error(source, tmp_path):
    with pytest.raises(AdapterError, match="adapter folder not found"):
        ev.load_for_eval(source, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        ev.load_for_eval(source, tmp_path / "empty")
    folder = lora.save_peft_adapter(_trained_adapters(source, seed=3), SETTINGS, tmp_path / "adapter")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8)))
    with pytest.raises(AdapterError, match="rank"):
        ev.load_for_eval(source, folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        ev.load_for_eval(source, folder)


# --------------------------------------------------------------------------- scoring


def test_evaluate_scores_known_outputs(monkeypatch, examples):
    exs = examples[:3]
    replies = {exs[0].x: f" 3 + 4 = 7. The answer is {exs[0].answer}.\nQuestion: next one is 5",
               exs[1].x: f" The answer is {exs[1].answer}.",
               exs[2].x: " I do not know."}

    def fake_generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=8, stats=None, on_output=None, **_):
        if stats is not None:
            stats["new_tokens"] = [len(replies[p].split()) for p in prompts]
        for i, p in enumerate(prompts):
            on_output(i, replies[p])
        return [replies[p] for p in prompts]

    monkeypatch.setattr(ev, "generate", fake_generate)
    calls = []

    result = ev.evaluate(None, None, exs, batch_size=2, progress=lambda *a: calls.append(a))

    assert (result.dataset, result.n, result.correct) == ("synthetic", 3, 2)
    assert result.accuracy == pytest.approx(2 / 3)
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(2, 3))
    assert [r["uid"] for r in result.records] == [ex.uid for ex in exs]
    first = result.records[0]
    assert {"uid", "prompt", "output", "extracted", "gold", "correct"} <= set(first)
    assert first["output"] == replies[exs[0].x]  # raw text kept; the cut is only for extraction
    assert (first["extracted"], first["gold"], first["correct"]) == (exs[0].answer, exs[0].answer, True)
    assert result.records[2]["extracted"] is None and result.records[2]["correct"] is False
    assert calls[-1] == (3, 3, 2)
    assert result.new_tokens == sum(r["new_tokens"] for r in result.records)


def test_write_records_is_one_json_object_per_question(monkeypatch, examples, tmp_path):
    monkeypatch.setattr(ev, "generate", lambda m, t, prompts, **_: [" The answer is 72."] * len(prompts))
    result = ev.evaluate(None, None, examples[:4])

    path = ev.write_records(result, tmp_path / "sub" / "eval.jsonl")

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == result.records
    assert "records" not in result.summary() and result.summary()["n"] == 4


def test_evaluate_refuses_nothing_to_do():
    from lesft.data import DataError

    with pytest.raises(DataError):
        ev.evaluate(None, None, [])


# --------------------------------------------------------------------------- loss probe


def reference_probe(model: FullModel, tok, examples) -> float:
    """Per example, unpadded: mean NLL of ``y`` + EOS given ``x``; then the mean over examples."""
    losses = []
    with torch.no_grad():
        for ex in examples:
            prompt = list(tok(ex.x).input_ids)
            target = list(tok(ex.y, add_special_tokens=False).input_ids) + [tok.eos_token_id]
            ids = torch.tensor([prompt + target])
            logp = torch.log_softmax(model(ids, torch.ones_like(ids))[0].float(), -1)
            nll = [-logp[len(prompt) + j - 1, t] for j, t in enumerate(target)]
            losses.append(torch.stack(nll).mean())
    return float(torch.stack(losses).mean())


def test_probe_loss_matches_a_reference_and_drops_after_training(source, tok, examples):
    settings = LoraSettings(lora_r=4, lora_alpha=8.0, lora_dropout=0.2, lora_targets=("gate_proj", "down_proj"))
    model = lora.add_lora(FullModel(source), settings).train()
    exs = examples[:4]
    before = ev.probe_loss(model, tok, exs, batch_size=3)
    assert model.training  # the probe restores the mode it found
    assert ev.probe_loss(model, tok, exs, batch_size=1) == pytest.approx(before, abs=1e-5)  # no dropout, no padding effect
    model.eval()
    assert before == pytest.approx(reference_probe(model, tok, exs), abs=1e-5)
    model.train()

    from lesft.batching import collate, encode_all
    from lesft.loss import head_logprobs
    from lesft.loss import sft_token_loss

    batch = collate(encode_all(tok, exs, 256), tok.pad_token_id)
    opt = torch.optim.Adam(lora.adapter_params(model).values(), lr=1e-2)
    for _ in range(5):
        hidden = model.hidden(batch.base.input_ids, batch.base.attention_mask)
        lp, mask, _ = head_logprobs(model.head, hidden, batch.base.y_start, batch.y_len, batch.targets)
        opt.zero_grad()
        sft_token_loss(lp, mask).loss.backward()
        opt.step()

    after = ev.probe_loss(model, tok, exs)
    assert after < before - 0.05


# --------------------------------------------------------------------------- command


def _cli(args, tmp_path, monkeypatch):
    from lesft.cli import app

    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(app, ["eval", "--model", "arch:tiny-llama", "--device", "cpu", *args])


def test_cli_writes_records_and_summary(tmp_path, monkeypatch):
    result = _cli(["--dataset", "synthetic", "--limit", "3", "--max-new-tokens", "8", "--batch-size", "2"],
                  tmp_path, monkeypatch)

    assert result.exit_code == 0, result.output
    records = tmp_path / "runs" / "eval-synthetic-test.jsonl"
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 3 and all(r["new_tokens"] <= 8 for r in rows)
    summary = json.loads(records.with_suffix(".json").read_text())
    assert summary["n"] == 3 and summary["batch_size"] == 2 and summary["random_weights"] is True
    assert summary["config"]["train"]["batch_size"] == 1  # --batch-size is the generation batch here
    assert "random weights" in result.output and "accuracy" in result.output


def test_cli_with_an_adapter_writes_beside_it(source, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r1"
    lora.save_peft_adapter(_trained_adapters(source, seed=4), SETTINGS, run / "adapter")

    result = _cli(["--adapter", str(run / "adapter"), "--dataset", "synthetic", "--limit", "2",
                   "--max-new-tokens", "4"], tmp_path, monkeypatch)

    assert result.exit_code == 0, result.output
    assert (run / "eval-synthetic-test.jsonl").is_file() and (run / "eval-synthetic-test.json").is_file()


def test_cli_user_errors_are_one_line(tmp_path, monkeypatch):
    result = _cli(["--adapter", str(tmp_path / "missing"), "--dataset", "synthetic", "--limit", "2"],
                  tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert "adapter folder not found" in result.output and "Traceback" not in result.output

    result = _cli(["--dataset", "synthetic", "--limit", "0"], tmp_path, monkeypatch)
    assert result.exit_code == 2 and "--limit" in result.output
