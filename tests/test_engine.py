"""Tests for lesft.engine's parties driven directly (no processes, no trainer): one round
of rows through client forward -> server process -> client backward is the unsplit
model's step, the server reports sums and counts, both sides derive the same dropout
keys, and rows survive the wire."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from lesft import engine, lora, wire
from lesft.batching import BASE_FIELDS, FLOAT_FIELDS, REF_FIELDS, Rows
from lesft.config import build_config
from lesft.methods import METHODS
from lesft.metrics import mean_loss
from lesft.models import resolve
from lesft.trainer import client_shards


@pytest.fixture(scope="module")
def source():
    return resolve("arch:tiny-qwen2")


def make_config(tmp_path, method: str, **over):
    return build_config(cli=dict(model="arch:tiny-qwen2", runs_dir=str(tmp_path), run_id=method, rounds=4,
                                 method=method, clients=2, samples_per_client=4, max_length=64, batch_size=2,
                                 **over), env={})


def parties(cfg, source, method: str):
    """Both clients of ``cfg`` (their shards of the built-in data) and, for split methods, the server."""
    tok = source.load_tokenizer()
    m = METHODS[method]
    clients = [engine.ClientParty(cfg, source, m, i, shard, tok) for i, shard in enumerate(client_shards(cfg))]
    return clients, engine.ServerParty(cfg, source, m) if m.split else None


def grads(*parts) -> dict[str, torch.Tensor]:
    """The LoRA gradients of model parts, by canonical (global-layer) name."""
    return {k: p.grad.clone() for part in parts for k, p in lora.adapter_params(part).items() if p.grad is not None}


def test_a_split_round_is_the_unsplit_models_step(tmp_path, source):
    """Client forward -> server process -> client backward leaves the same LoRA gradients,
    on both sides together, as one forward and backward of the whole model (same rows,
    same dropout masks, same sum-of-rows loss)."""
    # Prepare
    cfg = make_config(tmp_path, "splitlora")
    (client, _), server = parties(cfg, source, "splitlora")
    (whole, _), _ = parties(cfg, source, "fedavg")

    # Execute
    rows = client.forward(0)
    res = server.process([rows], want_grad=True)
    client.backward(res.grads[0], res.valid_rows[0])
    tl = whole.local_step(0)

    # Assert
    split, full = grads(client.part, server.part), grads(whole.part)
    assert split.keys() == full.keys() and split
    for k in full:
        assert_close(split[k], full[k], atol=1e-6, rtol=1e-4)
    assert res.loss_sums[0] == pytest.approx(float(tl.total.detach()), rel=1e-5)
    assert client.window_rows == server.window_rows == whole.window_rows == res.valid_rows[0]


def test_process_reports_loss_sums_and_valid_rows(tmp_path, source):
    """Per part: the sum of its rows' losses and how many rows had targets; a part whose rows
    have no target tokens adds nothing. The mean is taken once, by whoever reports it."""
    # Prepare
    cfg = make_config(tmp_path, "lesft")
    clients, server = parties(cfg, source, "lesft")
    parts = [c.forward(0) for c in clients]
    empty = dataclasses.replace(parts[1], y_len=torch.zeros_like(parts[1].y_len))

    # Execute
    together = server.process(parts, want_grad=False)
    alone = [server.process([p], want_grad=False) for p in parts]
    with_empty = server.process([parts[0], empty], want_grad=False)

    # Assert
    assert together.valid_rows == [len(p) for p in parts]
    assert together.loss_sums == pytest.approx([a.loss_sums[0] for a in alone], rel=1e-5)
    assert all(s > 0 for s in together.loss_sums)
    assert with_empty.valid_rows == [len(parts[0]), 0] and with_empty.loss_sums[1] == 0.0
    assert with_empty.loss_sums[0] == pytest.approx(together.loss_sums[0], rel=1e-5)
    assert together.stats["rows"] == sum(len(p) for p in parts)
    assert mean_loss(6.0, 4) == 1.5 and mean_loss(0.0, 0) == 0.0


def test_dropout_keys_are_the_same_on_both_sides(tmp_path, source):
    # Prepare
    cfg = make_config(tmp_path, "lesft")
    clients, server = parties(cfg, source, "lesft")

    # Execute
    sent = {(c.client_id, r): c.forward(r) for c in clients for r in (0, 1)}
    derived = {(cid, r): server.rows(rows.tensors(), cid, r) for (cid, r), rows in sent.items()}

    # Assert
    for key, rows in sent.items():
        assert torch.equal(derived[key].keys, rows.keys), key
    keys = [tuple(rows.keys.tolist()) for rows in sent.values()]
    assert len(set(keys)) == len(keys), "every client and round draws its own masks"


@pytest.mark.parametrize("method", ["lesft", "splitlora"])
def test_rows_round_trip_through_the_wire(tmp_path, source, method):
    """The row schema is the FORWARD: rows -> wire.forward -> frames -> checked message -> rows."""
    # Prepare
    cfg = make_config(tmp_path, method)
    (client, _), server = parties(cfg, source, method)
    rows = client.forward(0)
    knows = wire.Knows(model=wire.ModelLimits(hidden_size=int(source.config.hidden_size), max_length=64,
                                              max_rows=2, vocab_size=int(source.config.vocab_size)),
                       reference=engine.sends_reference(METHODS[method], cfg))

    # Execute
    msg = wire.decode(wire.encode(wire.forward(wire.Origin("client", 0, "run", "s" * 16), 0, 1, rows)))
    wire.check(msg, knows)
    back = server.rows(msg.tensors, msg.sender, msg.round)

    # Assert
    sent = BASE_FIELDS + (REF_FIELDS if method == "lesft" else ())
    assert list(msg.tensors) == list(sent)
    for f in dataclasses.fields(Rows):
        a, b = getattr(rows, f.name), getattr(back, f.name)
        assert (a is None) == (b is None), f.name
        if a is not None:
            assert torch.equal(a.to(b.dtype), b), f.name
            assert b.dtype == (torch.float32 if f.name in FLOAT_FIELDS else torch.int64), f.name


def test_row_schema_is_the_rows_fields():
    names = [f.name for f in dataclasses.fields(Rows)]
    assert set(BASE_FIELDS) | set(REF_FIELDS) | {"keys"} == set(names)
    assert FLOAT_FIELDS == {"act", "ref_act"}
    assert not set(BASE_FIELDS) & set(REF_FIELDS)
