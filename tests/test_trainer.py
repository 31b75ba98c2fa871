"""Tests for lesft.trainer (with lesft.engine): every method of the paper's tables runs in
process on the tiny Qwen2 preset, writes its run folder, is deterministic, aggregates when
it should, and lowers the SFT loss of its own training data."""
from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from conftest import fresh_hf_model
from lesft import engine, lora, trainer
from lesft.batching import collate, encode_all, labels
from lesft.config import build_config
from lesft.methods import METHODS
from lesft.models import resolve
from lesft.split import ClientModel, FullModel, ServerModel, split_point

MODEL = "arch:tiny-qwen2"
ROUNDS = 8
ALL = ("lesft", "splitlora", "sl", "splitfrozen", "fedavg", "centralized")
AGGREGATED = tuple(m for m in ALL if METHODS[m].aggregate)


def make_config(tmp_path, method: str, run_id: str | None = None):
    return build_config(cli=dict(model=MODEL, runs_dir=str(tmp_path), run_id=run_id or method, rounds=ROUNDS,
                                 lr=1e-2, method=method, clients=2, samples_per_client=4, max_length=64,
                                 grad_accum=1, aggregate_every=2), env={})


class Run:
    """A finished run and what the trainer's clients held after every round."""

    def __init__(self, cfg, result, snapshots):
        self.cfg, self.result, self.snapshots = cfg, result, snapshots
        self.dir = result.run_dir


def run_recorded(cfg) -> Run:
    """``train_inprocess`` with every ClientParty recorded, their adapters copied each round."""
    parties: list[engine.ClientParty] = []
    snapshots: list[tuple[dict, list[dict]]] = []

    class Recorded(engine.ClientParty):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            parties.append(self)

    def on_round(record, rounds):
        held = [p.adapters() for p in parties] if parties and METHODS[cfg.train.method].client_trains else []
        snapshots.append((record, held))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "ClientParty", Recorded)
        result = trainer.train_inprocess(cfg, on_round=on_round)
    return Run(cfg, result, snapshots)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("runs")
    return {m: run_recorded(make_config(root, m)) for m in ALL}


@pytest.fixture(scope="module")
def source():
    return resolve(MODEL)


@pytest.fixture(scope="module")
def tuned(runs, tiny_folders):
    """``tuned(method)``: the HF tiny-qwen2 with the run's ``adapter/`` loaded by PEFT (eval mode)."""
    from peft import PeftModel

    cache = {}

    def load(method: str):
        if method not in cache:
            cache[method] = PeftModel.from_pretrained(fresh_hf_model(tiny_folders["tiny-qwen2"]),
                                                      str(runs[method].dir / "adapter")).eval()
        return cache[method]

    return load


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the run folder


EXPECTED_FILES = {
    "lesft": {"client-adapters.safetensors", "server-adapters.safetensors"},
    "splitlora": {"client-adapters.safetensors", "server-adapters.safetensors"},
    "sl": {"client-0-adapters.safetensors", "client-1-adapters.safetensors", "server-adapters.safetensors",
           "adapter-client0", "adapter-client1"},
    "splitfrozen": {"server-adapters.safetensors"},
    "fedavg": {"client-adapters.safetensors"},
    "centralized": {"client-adapters.safetensors"},  # one party: its adapters are the global ones
}


@pytest.mark.parametrize("method", ALL)
def test_run_folder(runs, method):
    run = runs[method]
    names = {p.name for p in run.dir.iterdir()}
    assert names == {"config.json", "trainer-0.jsonl", "adapter", "run-complete.json"} | EXPECTED_FILES[method]
    assert json.loads((run.dir / "config.json").read_text()) == run.cfg.to_dict()
    assert (run.dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run.dir / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ALL)
def test_round_log(runs, method):
    records = [json.loads(line) for line in (runs[method].dir / "trainer-0.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert all(r["rounds"] == ROUNDS and torch.isfinite(torch.tensor(r["loss"])) for r in rounds)
    assert records[-1]["event"] == "final" and records[-1]["rounds"] == ROUNDS
    assert len(records) == ROUNDS + 1
    aggregated = [r["round"] for r in rounds if r["aggregated"]]
    assert aggregated == ([1, 3, 5, 7] if method in AGGREGATED else [])


def test_lesft_logs_the_token_classes(runs):
    for record, _ in runs["lesft"].snapshots:
        fractions = [record[f"frac_{c}"] for c in ("salient", "subsalient", "irrelevant")]
        assert sum(fractions) == pytest.approx(1.0)


# --------------------------------------------------------------------------- the adapters written


def parts_from_files(run: Run, source, client_file: str | None):
    """The run's model rebuilt by lesft from its per-side adapter files (eval mode)."""
    method = METHODS[run.cfg.train.method]
    settings = run.cfg.lora
    if not method.split:
        full = lora.add_lora(FullModel(source), settings)
        lora.set_adapters(full, lora.load_adapters(run.dir / client_file))
        return lambda ids, mask: full.eval()(ids, mask)
    k = split_point(source.n_layers, run.cfg.model.split_ratio)
    client, server = ClientModel(source, k), lora.add_lora(ServerModel(source, k), settings)
    lora.set_adapters(server, lora.load_adapters(run.dir / "server-adapters.safetensors"))
    if client_file is not None:
        lora.add_lora(client, settings)
        lora.set_adapters(client, lora.load_adapters(run.dir / client_file))
    return lambda ids, mask: server.eval()(client.eval()(ids, mask), mask)


CLIENT_FILE = {"lesft": "client-adapters.safetensors", "splitlora": "client-adapters.safetensors",
               "sl": "client-0-adapters.safetensors", "splitfrozen": None,
               "fedavg": "client-adapters.safetensors", "centralized": "client-adapters.safetensors"}


@pytest.mark.parametrize("method", ALL)
def test_peft_adapter_folder_reproduces_the_trained_model(runs, method, source, tuned):
    # Prepare
    run = runs[method]
    ids = torch.randint(2, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    real = mask.bool()
    ours = parts_from_files(run, source, CLIENT_FILE[method])

    # Execute
    with torch.no_grad():
        got = tuned(method)(input_ids=ids, attention_mask=mask).logits
        expected = ours(ids, mask)

    # Assert
    assert_close(got[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ALL)
def test_result_matches_the_files(runs, method):
    run = runs[method]
    if run.result.server is not None:
        assert same(run.result.server, lora.load_adapters(run.dir / "server-adapters.safetensors"))
    for cid, adapters in run.result.clients.items():
        name = "client-adapters.safetensors" if cid < 0 else f"client-{cid}-adapters.safetensors"
        assert same(adapters, lora.load_adapters(run.dir / name))
    combined = lora.load_peft_adapter(run.dir / "adapter")
    first = run.result.clients[min(run.result.clients)] if run.result.clients else {}
    assert same(combined, {**first, **(run.result.server or {})})


def test_splitfrozen_trains_only_the_server(runs, source):
    # Prepare
    run = runs["splitfrozen"]
    k = split_point(source.n_layers, run.cfg.model.split_ratio)
    initial = lora.get_adapters(lora.add_lora(ServerModel(source, k), run.cfg.lora, seed=run.cfg.train.seed))

    # Assert
    assert run.result.clients == {}
    assert not list(run.dir.glob("client*"))
    trained = run.result.server
    assert trained.keys() == initial.keys()
    assert {int(n.split(".")[1]) for n in trained} == set(range(k, source.n_layers))
    changed = [n for n in trained if not torch.equal(trained[n], initial[n])]
    assert any(n.endswith("lora_B") for n in changed) and any(n.endswith("lora_A") for n in changed)
    assert json.loads((run.dir / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] \
        == list(range(k, source.n_layers))


def test_sl_keeps_one_adapter_per_client(runs):
    run = runs["sl"]
    c0 = lora.load_adapters(run.dir / "client-0-adapters.safetensors")
    c1 = lora.load_adapters(run.dir / "client-1-adapters.safetensors")
    assert c0.keys() == c1.keys()
    assert not any(torch.equal(c0[k], c1[k]) for k in c0 if k.endswith("lora_B"))
    assert same(lora.load_peft_adapter(run.dir / "adapter-client1"),
                {**c1, **lora.load_adapters(run.dir / "server-adapters.safetensors")})


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("method", AGGREGATED)
def test_clients_hold_identical_adapters_after_an_aggregation_round(runs, method):
    run = runs[method]
    assert len(run.snapshots) == ROUNDS
    for record, held in run.snapshots:
        assert len(held) == 2
        identical = same(held[0], held[1])
        assert identical == record["aggregated"], f"round {record['round']}"
    assert same(run.snapshots[-1][1][0], lora.load_adapters(run.dir / "client-adapters.safetensors"))


def test_sl_clients_never_align(runs):
    for record, held in runs["sl"].snapshots:
        assert not record["aggregated"] and not same(held[0], held[1])


def test_aggregation_is_the_sample_weighted_average(tmp_path, source):
    """One round of the engine by hand: two clients step, then fedavg gives each the average."""
    from lesft.aggregate import fedavg
    from lesft.trainer import client_shards

    # Prepare
    cfg = make_config(tmp_path, "splitlora")
    tok = source.load_tokenizer()
    method = METHODS["splitlora"]
    shards = client_shards(cfg)
    shards = [shards[0][:1], shards[1][:3]]  # |D| = 1 and 3
    clients = [engine.ClientParty(cfg, source, method, i, s, tok) for i, s in enumerate(shards)]
    server = engine.ServerParty(cfg, source, method)

    # Execute
    res = server.process([c.forward(0) for c in clients], want_grad=True)
    for c, g, v in zip(clients, res.grads, res.valid_rows):
        c.backward(g, v)
        c.step()
    before = [c.adapters() for c in clients]
    avg = fedavg([(c.adapters(), c.n_samples) for c in clients])
    for c in clients:
        c.load_adapters(avg)

    # Assert
    assert not same(before[0], before[1])
    for key in avg:
        assert_close(clients[0].adapters()[key], 0.25 * before[0][key] + 0.75 * before[1][key], atol=1e-7, rtol=0)
    assert same(clients[0].adapters(), clients[1].adapters())


def _server_grads(server) -> dict:
    return {k: p.grad.clone() for k, p in lora.adapter_params(server.part).items() if p.grad is not None}


@pytest.mark.parametrize("how", ["one at a time", "length groups"])
def test_grouping_of_a_microbatch_changes_no_result(tmp_path, source, how):
    """Sums and counts: the server's gradients, each client's dL/dS, its loss and the round's
    statistics are those of one microbatch whether the rows run together, one client at a
    time, or as length-sorted groups (--microbatch-max-padding)."""
    from lesft.batching import padding_groups
    from lesft.trainer import client_shards

    # Prepare
    cfg = make_config(tmp_path, "lesft").replace(clients=4, max_length=512)
    tok = source.load_tokenizer()
    method = METHODS["lesft"]
    clients = [engine.ClientParty(cfg, source, method, i, s, tok) for i, s in enumerate(client_shards(cfg))]
    parts = [c.forward(0) for c in clients]
    assert len({p.act.shape[1] for p in parts}) > 1, "the clients' rows must differ in width"
    whole = engine.ServerParty(cfg, source, method)
    split_cfg = cfg.replace(microbatch_max_padding=0.1 if how == "length groups" else 1.0)
    split = engine.ServerParty(split_cfg, source, method)

    # Execute
    ref = whole.process(parts, want_grad=True)
    if how == "one at a time":
        outs = [split.process([p], want_grad=True) for p in parts]
        grads, losses = [o.grads[0] for o in outs], [o.loss_sums[0] for o in outs]
        tokens = sum(o.stats["tokens"] for o in outs)
    else:
        groups = padding_groups(parts, 0.1)
        assert 1 < len(groups) < len(parts), "groups of several parts"
        assert [i for g in groups for i in g] != list(range(len(parts))), "groups reorder the parts"
        out = split.process(parts, want_grad=True)
        grads, losses, tokens = out.grads, out.loss_sums, out.stats["tokens"]
        for k in ("nll", "frac_salient", "frac_subsalient", "weight_mean"):
            assert out.stats[k] == pytest.approx(ref.stats[k], rel=1e-5), k

    # Assert
    assert len(padding_groups(parts, 1.0)) == 1
    assert tokens == ref.stats["tokens"]
    assert losses == pytest.approx(ref.loss_sums, rel=1e-5)
    for g, r in zip(grads, ref.grads):
        assert g.shape == r.shape
        assert_close(g, r, atol=1e-6, rtol=1e-4)
    assert split.window_rows == whole.window_rows == len(parts)
    mine, theirs = _server_grads(split), _server_grads(whole)
    assert mine.keys() == theirs.keys() and mine
    for k in theirs:
        assert_close(mine[k], theirs[k], atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- determinism and learning


def test_same_seed_same_adapters(runs, tmp_path):
    # Prepare
    first = runs["lesft"]

    # Execute
    again = trainer.train_inprocess(make_config(tmp_path, "lesft", run_id="again"))

    # Assert
    assert same(again.server, first.result.server)
    assert again.clients.keys() == first.result.clients.keys()
    assert all(same(again.clients[c], first.result.clients[c]) for c in again.clients)
    assert [r["loss"] for r in again.history] == [r["loss"] for r, _ in first.snapshots]


def sft_probe(model, examples, tokenizer, max_length: int) -> float:
    """Mean over examples of the mean target-token NLL, with a plain HF-style causal LM."""
    batch = collate(encode_all(tokenizer, examples, max_length), tokenizer.pad_token_id)
    lab = labels(batch.base, batch.targets, batch.y_len)
    with torch.no_grad():
        logits = model(input_ids=batch.base.input_ids, attention_mask=batch.base.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = lab[:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * keep
    return float((nll.sum(-1) / keep.sum(-1)).mean())


@pytest.mark.parametrize("method", ALL)
def test_training_lowers_the_sft_loss_of_the_training_data(runs, method, hf_reference, tiny_folders, tokenizer, tuned):
    # Prepare
    run = runs[method]
    examples = [ex for shard in trainer.client_shards(run.cfg) for ex in shard]

    # Execute
    before = sft_probe(hf_reference(tiny_folders["tiny-qwen2"]), examples, tokenizer, run.cfg.data.max_length)
    after = sft_probe(tuned(method), examples, tokenizer, run.cfg.data.max_length)

    # Assert
    assert after < before - 0.05, (before, after)
