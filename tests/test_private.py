"""Tests for lesft.private (label-private rounds), in process on the tiny Qwen2 preset:
the round cut after the server's last layer gives the adapters of the standard round (the
loss on the server), for lesft, splitlora and a loss variant; the client's head is its
embedding where the model ties them; the server holds no head; the server's wait for
dL/dH (``Held``) hands a microbatch over once every part has its gradient or was given up;
with ``--client-tail-layers 1`` the client trains the last layer the server would (one client:
the same adapters), the server holds nothing of it, and unusable settings are one line."""
from __future__ import annotations

import pytest
import torch

from lesft import private
from lesft.batching import Rows
from lesft.config import ConfigError, build_config
from lesft.engine import ClientParty, ServerParty, run_fingerprint
from lesft.methods import get_method
from lesft.models import ModelError, source_for
from lesft.split import ClientTail
from lesft.trainer import client_shards, train_inprocess

MODEL = "arch:tiny-qwen2"


def make_config(tmp_path, method: str, label_private: bool, **over):
    cli = dict(model=MODEL, runs_dir=str(tmp_path), run_id=f"{method}-{label_private}", rounds=4, lr=1e-2,
               method=method, clients=2, samples_per_client=4, max_length=64, grad_accum=1, aggregate_every=2,
               label_private=label_private)
    return build_config(cli=cli | over, env={})


def relative_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)) for k in a)


@pytest.mark.parametrize("method, over", [("lesft", {}), ("splitlora", {}), ("lesft", {"loss": "kd"}),
                                          ("sl", {"microbatch_max_padding": 0.0}),
                                          ("lesft", {"model": "arch:tiny-llama"})])  # an untied head
def test_label_private_training_gives_the_standard_adapters(tmp_path, method, over):
    # Execute: the same run with the loss on the server, then on the clients
    standard = train_inprocess(make_config(tmp_path, method, False, **over))
    private_run = train_inprocess(make_config(tmp_path, method, True, **over))

    # Assert: the adapters moved, and equally (the order of operations is the standard one's)
    assert standard.server.keys() == private_run.server.keys()
    assert relative_diff(standard.server, private_run.server) <= 1e-6
    for c in standard.clients:
        assert relative_diff(standard.clients[c], private_run.clients[c]) <= 1e-6
    assert any(float(v.abs().max()) > 0 for k, v in private_run.server.items() if "lora_B" in k)
    losses = [r["loss"] for r in private_run.history]
    assert losses == pytest.approx([r["loss"] for r in standard.history], rel=1e-6)


@pytest.fixture(scope="module")
def parties():
    cfg = build_config(cli=dict(model=MODEL, method="lesft", clients=1, samples_per_client=2, max_length=64,
                                label_private=True), env={})
    source = source_for(cfg)
    tok = source.load_tokenizer()
    client = ClientParty(cfg, source, get_method("lesft"), 0, client_shards(cfg, tok)[0], tok)
    return cfg, client, ServerParty(cfg, source, get_method("lesft"))


def test_the_head_stays_on_the_client_and_is_its_embedding_when_tied(parties):
    cfg, client, server = parties
    assert source_for(cfg).config.tie_word_embeddings
    assert client.tail.lm_head.weight is client.part.body.embed_tokens.weight
    untied = cfg.replace(model="arch:tiny-llama")
    tail = ClientTail(source_for(untied), embedding=client.part.body.embed_tokens)
    assert tail.lm_head.weight is not client.part.body.embed_tokens.weight
    names = [n for n, _ in server.part.named_parameters()]
    assert not any("lm_head" in n or n.endswith("norm.weight") and ".layers." not in n for n in names)


def test_a_label_free_round_sends_no_label_ids_and_the_client_gets_dL_dS(parties):
    cfg, client, server = parties
    rows = client.forward(0)
    sent = private.without_labels(rows)
    assert sent.targets is None and "targets" not in sent.tensors()
    held = server.rows({k: v for k, v in sent.tensors().items()}, 0, 0)
    forward = private.server_forward(server, [held], want_grad=True)
    hidden, ref = forward.hidden[0]
    assert hidden.shape == (len(rows), private.width(rows), server.part.config.hidden_size) == ref.shape
    tl, grad = private.client_loss(client, 0, hidden, ref)
    assert grad.shape == hidden.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    res = private.server_backward(server, forward, [grad])
    assert res.grads[0].shape == rows.act.shape and res.grads[0].abs().sum() > 0
    assert res.valid_rows == [int((rows.y_len > 0).sum())]
    server.discard_window()
    client.pending = None


def _rows(n: int, width: int) -> Rows:
    return Rows(act=torch.zeros(n, 5, 4), lengths=torch.full((n,), 5), y_start=torch.ones(n, dtype=torch.long),
                targets=None, y_len=torch.full((n,), width), keys=torch.zeros(n, dtype=torch.long))


def test_held_forwards_wait_for_every_gradient_or_a_give_up():
    held = private.HeldForward([_rows(1, 2), _rows(2, 3)], [], [(torch.zeros(1, 2, 4), None),
                                                               (torch.zeros(2, 3, 4), None)], True)
    book = private.Held()
    book.add(held, [(0, 7), (1, 7)])
    assert book.waiting(0, 7) and book.hidden(1, 7)[0].shape == (2, 3, 4) and book.missing(7) == [0, 1]
    with pytest.raises(ValueError, match="shape"):
        book.give(0, 7, torch.zeros(1, 3, 4))
    assert book.give(0, 7, torch.ones(1, 2, 4)) is None
    assert book.give(0, 7, torch.ones(1, 2, 4)) is None  # a repeat replaces it
    assert book.waiting(1, 7) and book.missing(7) == [1]
    done, grads = book.give(1, 7, None)  # client 1 given up: the microbatch goes on without it
    assert done is held and grads[1] is None and torch.equal(grads[0], torch.ones(1, 2, 4))
    assert not book.waiting(0, 7) and book.hidden(0, 7) is None


def test_a_part_given_up_and_sent_again_is_not_forgotten_with_its_old_microbatch():
    def forward(*widths):
        return private.HeldForward([_rows(1, w) for w in widths], [], [(torch.zeros(1, w, 4), None) for w in widths],
                                   True)

    old, new = forward(2, 2), forward(3)
    book = private.Held()
    book.add(old, [(0, 7), (1, 7)])
    assert book.give(1, 7, None) is None  # client 1 given up while client 0's dL/dH is still awaited
    book.add(new, [(1, 7)])  # client 1 sent round 7 again: a microbatch of its own
    assert book.give(0, 7, torch.ones(1, 2, 4))[0] is old
    assert book.waiting(1, 7) and book.hidden(1, 7)[0].shape == (1, 3, 4)
    assert book.give(1, 7, torch.ones(1, 3, 4))[0] is new


# --------------------------------------------------------------------------- client tail layers


def combined(run) -> dict[str, torch.Tensor]:
    """A finished in-process run's adapters by global name, client's and server's together."""
    return {**next(iter(run.clients.values())), **run.server}


@pytest.mark.parametrize("method", ["lesft", "splitlora"])
def test_a_client_keeping_the_last_layer_trains_what_the_server_trains_in_a_standard_run(tmp_path, method):
    # Prepare: one client, so its tail learns from the rows the server's last layer would
    over = dict(clients=1, grad_accum=2)
    standard = train_inprocess(make_config(tmp_path, method, False, **over))

    # Execute
    private_run = train_inprocess(make_config(tmp_path / "tail", method, True, client_tail_layers=1, **over))

    # Assert: the last layer's adapters are the client's now, and every adapter is the standard run's
    last = source_for(make_config(tmp_path, method, False)).n_layers - 1
    assert {int(k.split(".")[1]) for k in private_run.server}.isdisjoint({last})
    assert last in {int(k.split(".")[1]) for k in next(iter(private_run.clients.values()))}
    assert relative_diff(combined(standard), combined(private_run)) <= 1e-6
    assert any(float(v.abs().max()) > 0 for k, v in private_run.clients[-1].items()
               if "lora_B" in k and k.startswith(f"layers.{last}."))
    assert [r["loss"] for r in private_run.history] == pytest.approx([r["loss"] for r in standard.history], rel=1e-6)


def test_the_server_holds_nothing_of_the_client_tail_and_returns_every_position(tmp_path):
    # Prepare
    cfg = make_config(tmp_path, "lesft", True, clients=1, client_tail_layers=1)
    source = source_for(cfg)
    tok = source.load_tokenizer()
    client = ClientParty(cfg, source, get_method("lesft"), 0, client_shards(cfg, tok)[0], tok)
    server = ServerParty(cfg, source, get_method("lesft"))
    last = source.n_layers - 1

    # Execute
    rows = client.forward(0)
    forward = private.server_forward(server, [server.rows(private.without_labels(rows).tensors(), 0, 0)], True)
    hidden, ref = forward.hidden[0]
    tl, grad = private.client_loss(client, 0, hidden, ref)

    # Assert: the server's part ends before the last layer (no weight, no adapter of it); its
    # HIDDEN covers every position of both paths; the client's tail adapters got gradients
    assert server.part.config.num_hidden_layers == source.n_layers - 1 - server.k
    assert all(f"layers.{last}." not in k for k in server.adapters())
    assert hidden.shape[:2] == rows.act.shape[:2] and ref.shape[:2] == rows.ref_act.shape[:2]
    assert grad.shape == hidden.shape
    tail_grads = [p.grad for k, p in client.adapter_params().items() if k.startswith(f"layers.{last}.")]
    assert tail_grads and all(g is not None for g in tail_grads)


@pytest.mark.parametrize("over, problem", [
    (dict(client_tail_layers=1), "add --label-private"),
    (dict(client_tail_layers=1, label_private=True, method="splitfrozen"), "trains no client layer"),
    (dict(client_tail_layers=-1, label_private=True), "client_tail_layers=-1")])
def test_client_tail_layers_it_cannot_use_are_refused_in_one_line(over, problem):
    with pytest.raises(ConfigError) as e:
        build_config(cli=dict(model=MODEL) | over, env={})
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_client_tail_layers_that_leave_the_server_no_layer_are_refused_in_one_line(tmp_path):
    cfg = make_config(tmp_path, "lesft", True, client_tail_layers=3)  # tiny-qwen2: 4 layers, 1 on the client
    with pytest.raises(ModelError) as e:
        ServerParty(cfg, source_for(cfg), get_method("lesft"))
    assert "--client-tail-layers 3 leaves the server no layer" in str(e.value) and "at most 2" in str(e.value)


def test_client_tail_layers_enter_the_fingerprint_only_when_set(tmp_path):
    cfg = make_config(tmp_path, "lesft", True)
    fp, parts = run_fingerprint(cfg, source_for(cfg))
    fp_tail, parts_tail = run_fingerprint(cfg.replace(client_tail_layers=1), source_for(cfg))
    assert "client_tail_layers" not in parts and parts_tail["client_tail_layers"] == 1 and fp != fp_tail
