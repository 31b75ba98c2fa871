"""Teacher chains: only correctly answered questions are kept, in the file --teacher-cot reads."""

import json

from lesft import evaluate
from lesft.cli.data import distill_chains
from lesft.data import generate_synthetic, load_examples


def fake_generate(right_every: int | None):
    """A teacher that is right on every ``right_every``-th question of each call (never: None)."""
    def gen(model, tok, prompts, max_new_tokens=256, batch_size=8, **kw):
        outs = []
        for i, p in enumerate(prompts):
            ex = next(e for e in EXAMPLES if p.startswith(e.x))
            right = right_every is not None and i % right_every == 0
            answer = ex.answer if right else str(int(ex.answer) + 1)
            outs.append(f" First we add things up. The answer is {answer}.\nQuestion: next one")
        return outs
    return gen


EXAMPLES = generate_synthetic(40, seed=3, split="train")


def test_keeps_only_correct_chains_until_n(monkeypatch):
    monkeypatch.setattr(evaluate, "generate", fake_generate(right_every=2))
    kept, tried = distill_chains(None, None, EXAMPLES, n=5, max_new_tokens=8, batch_size=4, chunk=4)
    assert len(kept) == 5
    assert tried == 12  # 2 right per chunk of 4 -> three chunks for 5
    for rec in kept:
        ex = next(e for e in EXAMPLES if e.uid == rec["uid"])
        assert rec["answer"] == ex.answer and rec["cot"].endswith(f"The answer is {ex.answer}.")
        assert "Question:" not in rec["cot"]  # cut where the teacher starts a new question


def test_written_file_is_what_teacher_cot_reads(monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "generate", fake_generate(right_every=1))
    kept, _ = distill_chains(None, None, EXAMPLES[:6], n=6, max_new_tokens=8, batch_size=4)
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    # the synthetic loader regenerates the same uids for the same seed
    examples = load_examples("synthetic", "train", n=40, seed=3, teacher_cot=path)
    assert {e.uid for e in examples} == {r["uid"] for r in kept}
    for e in examples:
        assert e.y.startswith(" First we add things up.")


def test_nothing_correct_keeps_nothing(monkeypatch):
    monkeypatch.setattr(evaluate, "generate", fake_generate(right_every=None))
    kept, tried = distill_chains(None, None, EXAMPLES[:8], n=3, max_new_tokens=8, batch_size=4, chunk=4)
    assert kept == []
    assert tried == 8
