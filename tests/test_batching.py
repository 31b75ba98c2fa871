"""Tests for lesft.batching: the truncation rules of ``encode``, right-padded batches and
their labels, and the microbatch round trip ``concat_rows`` / ``split_grad``."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from lesft.batching import (Rows, collate, concat_rows, encode, encode_all, labels, padding_groups, split_grad,
                            target_positions)
from lesft.data import Example, generate_synthetic
from lesft.loss import target_index

EOS, PAD = 0, 1


class CharTokenizer:
    """One token per character (ids = code points): lengths are the strings' lengths."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True):
        return SimpleNamespace(input_ids=[ord(c) for c in text])


def example(x: str, y: str, x_ref: str, uid: str = "u") -> Example:
    return Example(uid=uid, dataset="synthetic", x=x, y=y, x_ref=x_ref, answer="1", kind="k")


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def expected_encoding(prompt: list[int], ref_prompt: list[int], target: list[int], max_length: int):
    """The module docstring's rule, written out: ``(prompt, ref_prompt, target, truncated)``."""
    keep = max_length - min(len(target), max_length // 2)
    p = prompt[len(prompt) - keep:] if len(prompt) > keep else prompt
    rp = ref_prompt[len(ref_prompt) - keep:] if len(ref_prompt) > keep else ref_prompt
    room = max_length - max(len(p), len(rp))
    t = target[:room]
    return p, rp, t, (p != prompt or rp != ref_prompt or t != target)


def check(enc, prompt, ref_prompt, target, max_length):
    p, rp, t, truncated = expected_encoding(prompt, ref_prompt, target, max_length)
    assert enc.target == tuple(t)
    assert enc.base_ids == tuple(p + t) and enc.ref_ids == tuple(rp + t)
    assert enc.base_ids[enc.base_start:] == enc.ref_ids[enc.ref_start:] == enc.target  # identical targets
    assert len(enc.base_ids) <= max_length and len(enc.ref_ids) <= max_length
    assert enc.truncated == truncated


# --------------------------------------------------------------------------- encode


@pytest.mark.parametrize("nx, nref, ny, max_length, truncated", [
    (10, 15, 10, 64, False),   # fits
    (10, 100, 20, 64, True),   # only the reference prompt is cut
    (10, 12, 100, 64, True),   # only the target is cut
    (80, 90, 100, 64, True),   # everything is cut
    (40, 40, 23, 64, False),   # exactly max_length: nothing to cut
    (41, 20, 23, 64, True),    # one token over: the prompt loses its first token
    (3, 3, 300, 8, True),      # the smallest max_length
])
def test_encode_truncation_rule(nx, nref, ny, max_length, truncated):
    # Prepare
    x, x_ref, y = text(nx, 1), text(nref, 2), text(ny, 3)
    tok = CharTokenizer()
    prompt, ref_prompt, target = tok(x).input_ids, tok(x_ref).input_ids, tok(y).input_ids + [EOS]

    # Execute
    enc = encode(tok, example(x, y, x_ref), max_length)

    # Assert
    check(enc, prompt, ref_prompt, target, max_length)
    assert enc.truncated is truncated


def test_encode_keeps_the_end_of_prompts_and_the_start_of_the_target():
    # Prepare: prompts 100 and 70, target 40 + EOS, max_length 64 -> keep 64 - 32 = 32
    x, x_ref, y = text(100, 4), text(70, 5), text(40, 6)

    # Execute
    enc = encode(CharTokenizer(), example(x, y, x_ref), 64)

    # Assert
    assert enc.base_ids[:enc.base_start] == tuple(ord(c) for c in x[-32:])
    assert enc.ref_ids[:enc.ref_start] == tuple(ord(c) for c in x_ref[-32:])
    assert enc.target == tuple(ord(c) for c in y[:32])  # cut at its end: the EOS is gone
    assert enc.truncated


def test_encode_rule_on_random_lengths():
    rng = random.Random(0)
    tok = CharTokenizer()
    for i in range(300):
        max_length = rng.randint(8, 80)
        x, x_ref, y = text(rng.randint(0, 120), i), text(rng.randint(0, 120), i + 1000), text(rng.randint(0, 120), i + 2000)
        enc = encode(tok, example(x, y, x_ref), max_length)
        check(enc, tok(x).input_ids, tok(x_ref).input_ids, tok(y).input_ids + [EOS], max_length)
        assert len(enc.target) >= 1


def test_encode_with_the_real_tokenizer(tokenizer):
    examples = generate_synthetic(8, seed=3, split="train")
    for max_length in (32, 64, 512):
        for ex, enc in zip(examples, encode_all(tokenizer, examples, max_length)):
            check(enc, list(tokenizer(ex.x).input_ids), list(tokenizer(ex.x_ref).input_ids),
                  list(tokenizer(ex.y, add_special_tokens=False).input_ids) + [tokenizer.eos_token_id], max_length)
            assert enc.uid == ex.uid


# --------------------------------------------------------------------------- collate and labels


def encoded_items(tokenizer, n=3, max_length=48):
    return encode_all(tokenizer, generate_synthetic(n, seed=5, split="train"), max_length)


def test_collate_pads_on_the_right(tokenizer):
    # Prepare
    items = encoded_items(tokenizer, max_length=80)

    # Execute
    batch = collate(items, PAD)

    # Assert
    assert len(batch) == 3 and batch.uids == [e.uid for e in items]
    for path, seqs, starts in ((batch.base, [e.base_ids for e in items], [e.base_start for e in items]),
                               (batch.ref, [e.ref_ids for e in items], [e.ref_start for e in items])):
        width = max(len(s) for s in seqs)
        assert path.input_ids.shape == path.attention_mask.shape == (3, width)
        for b, s in enumerate(seqs):
            assert path.input_ids[b].tolist() == list(s) + [PAD] * (width - len(s))
            assert path.attention_mask[b].tolist() == [1] * len(s) + [0] * (width - len(s))
        assert path.lengths.tolist() == [len(s) for s in seqs]
        assert path.y_start.tolist() == starts
    ty = max(len(e.target) for e in items)
    assert batch.targets.tolist() == [list(e.target) + [0] * (ty - len(e.target)) for e in items]
    assert batch.y_len.tolist() == [len(e.target) for e in items]


def test_labels_mark_exactly_the_targets(tokenizer):
    # Prepare
    items = encoded_items(tokenizer, max_length=80)
    batch = collate(items, PAD)

    # Execute
    base, ref = labels(batch.base, batch.targets, batch.y_len), labels(batch.ref, batch.targets, batch.y_len)

    # Assert
    for lab, ids_of, start_of in ((base, "base_ids", "base_start"), (ref, "ref_ids", "ref_start")):
        for b, e in enumerate(items):
            s, n = getattr(e, start_of), len(e.target)
            row = lab[b].tolist()
            assert row[s:s + n] == list(e.target)
            assert all(v == -100 for i, v in enumerate(row) if not s <= i < s + n)
    b_pos, b_ids, b_mask = target_index(base)
    _, r_ids, r_mask = target_index(ref)
    assert torch.equal(b_ids * b_mask, r_ids * r_mask)  # the same targets on both paths
    pos, mask = target_positions(batch.base.y_start, batch.y_len, batch.targets.shape[1])
    assert torch.equal(mask, b_mask)
    assert torch.equal(pos[mask], b_pos[mask])


# --------------------------------------------------------------------------- microbatches


def make_rows(b: int, t: int, t_ref: int | None, ty: int, seed: int, h: int = 4) -> Rows:
    g = torch.Generator().manual_seed(seed)
    return Rows(
        act=torch.randn(b, t, h, generator=g),
        lengths=torch.randint(1, t + 1, (b,), generator=g),
        y_start=torch.randint(1, t, (b,), generator=g),
        targets=torch.randint(0, 50, (b, ty), generator=g),
        y_len=torch.randint(1, ty + 1, (b,), generator=g),
        keys=torch.randint(0, 2**62, (b,), generator=g),
        ref_act=None if t_ref is None else torch.randn(b, t_ref, h, generator=g),
        ref_lengths=None if t_ref is None else torch.full((b,), t_ref),
        ref_y_start=None if t_ref is None else torch.full((b,), 2),
    )


def test_concat_rows_pads_every_width():
    # Prepare
    parts = [make_rows(2, 5, 9, 3, seed=0), make_rows(1, 8, 6, 4, seed=1), make_rows(3, 3, 7, 2, seed=2)]

    # Execute
    rows = concat_rows(parts)

    # Assert
    assert len(rows) == 6
    assert rows.act.shape == (6, 8, 4) and rows.ref_act.shape == (6, 9, 4) and rows.targets.shape == (6, 4)
    start = 0
    for p in parts:
        sl = slice(start, start + len(p))
        for name in ("act", "ref_act", "targets"):
            mine, whole = getattr(p, name), getattr(rows, name)[sl]
            assert torch.equal(whole[:, :mine.shape[1]], mine)
            assert torch.count_nonzero(whole[:, mine.shape[1]:]) == 0
        for name in ("lengths", "y_start", "y_len", "keys", "ref_lengths", "ref_y_start"):
            assert torch.equal(getattr(rows, name)[sl], getattr(p, name))
        start += len(p)


def test_split_grad_inverts_concat_rows():
    # Prepare
    parts = [make_rows(2, 5, None, 3, seed=3), make_rows(1, 8, None, 2, seed=4), make_rows(2, 6, None, 5, seed=5)]
    rows = concat_rows(parts)

    # Execute
    back = split_grad(rows.act, parts)

    # Assert
    assert [tuple(g.shape) for g in back] == [tuple(p.act.shape) for p in parts]
    assert all(torch.equal(g, p.act) for g, p in zip(back, parts))
    assert all(g.is_contiguous() for g in back)
    assert rows.ref_act is None


def test_concat_rows_of_one_part_is_that_part():
    part = make_rows(2, 5, 6, 3, seed=6)
    assert concat_rows([part]) is part
    assert torch.equal(split_grad(part.act, [part])[0], part.act)


def test_concat_rows_refuses_a_mix_of_paths():
    with pytest.raises(ValueError):
        concat_rows([make_rows(1, 4, 5, 2, seed=7), make_rows(1, 4, None, 2, seed=8)])


def test_rows_to_casts_only_floating_tensors():
    part = make_rows(2, 5, 6, 3, seed=9)
    moved = part.to("cpu", torch.float64)
    assert moved.act.dtype == moved.ref_act.dtype == torch.float64
    assert moved.lengths.dtype == part.lengths.dtype and moved.targets.dtype == part.targets.dtype
    assert torch.equal(moved.keys, part.keys)


def test_padding_groups_sort_by_width_and_bound_the_padding():
    # Prepare: widths (trained path, reference path) of five single-row parts
    widths = [(76, 106), (101, 141), (73, 101), (103, 145), (68, 92)]
    parts = [make_rows(1, w, r, 2, seed=i) for i, (w, r) in enumerate(widths)]

    # Execute
    groups = padding_groups(parts, 0.1)

    # Assert: every part once, short ones together, each group within the bound
    assert sorted(i for g in groups for i in g) == list(range(5))
    assert groups == [[4, 2, 0], [1, 3]]
    for g in groups:
        w, r = max(widths[i][0] for i in g), max(widths[i][1] for i in g)
        assert 1 - sum(sum(widths[i]) for i in g) / (len(g) * (w + r)) <= 0.1
    assert padding_groups(parts, 1.0) == [[0, 1, 2, 3, 4]]  # never split: arrival order
    assert padding_groups(parts, 0.0) == [[4], [2], [0], [1], [3]]
    assert padding_groups(parts[:1], 0.0) == [[0]]


def test_padding_groups_weigh_parts_by_their_rows():
    # a 3-row part of width 10 and a 1-row part of width 12: 2*3 padded of 48 positions
    parts = [make_rows(3, 10, None, 2, seed=1), make_rows(1, 12, None, 2, seed=2)]
    assert padding_groups(parts, 0.125) == [[0, 1]]
    assert padding_groups(parts, 0.12) == [[0], [1]]
