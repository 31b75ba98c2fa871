"""All six methods of the paper's tables through the same transport: each runs once as real
processes (tiny Qwen2, 2 clients, 4 rounds, accumulation over 2 rounds, FedAvg every 2)
and must reproduce the in-process reference trainer bit for bit, write a PEFT adapter
that loads on the Hugging Face model, and show what distinguishes it on the wire and in
its files: who runs, who trains, which loss, whether client adapters are averaged.

Runs are launched lazily, once per method, and shared by every test of the module.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import fresh_hf_model
from lesft import lora
from lesft.config import build_config
from lesft.metrics import read_jsonl
from lesft.models import source_for
from lesft.split import ServerModel, split_point
from lesft.runs import GLOBAL_CLIENT_FILE, SERVER_FILE, client_file
from lesft.trainer import train_inprocess
from workers.launch import launch

pytestmark = pytest.mark.e2e

MODEL = "arch:tiny-qwen2"
CLIENTS = 2
ROUNDS = 4
N_LAYERS = 4  # of the tiny preset
ALL = ("lesft", "splitlora", "sl", "splitfrozen", "fedavg", "centralized")
LAUNCH_TIMEOUT_S = 420

PROCESSES = {
    "lesft": {"broker-0", "server-0", "aggregator-0", "client-0", "client-1"},
    "splitlora": {"broker-0", "server-0", "aggregator-0", "client-0", "client-1"},
    "sl": {"broker-0", "server-0", "client-0", "client-1"},
    "splitfrozen": {"broker-0", "server-0", "client-0", "client-1"},
    "fedavg": {"aggregator-0", "client-0", "client-1"},
    "centralized": {"server-0"},
}
ADAPTER_FILES = {
    "lesft": {SERVER_FILE, GLOBAL_CLIENT_FILE},
    "splitlora": {SERVER_FILE, GLOBAL_CLIENT_FILE},
    "sl": {SERVER_FILE, client_file(0), client_file(1)},
    "splitfrozen": {SERVER_FILE},
    "fedavg": {GLOBAL_CLIENT_FILE},
    "centralized": {GLOBAL_CLIENT_FILE},
}


# loss variants of method lesft (README "Loss variants") run as extra cases: case -> settings
# (power sends no reference path: the FORWARD differs)
LOSS_CASES = {"lesft+kd": dict(loss="kd", ref_teacher="base", kd_tau=2.0), "lesft+excess": dict(loss="excess"),
              "lesft+power": dict(loss="power", power_alpha=0.5)}


def make_config(root: Path, method: str, run_id: str):
    extra = LOSS_CASES.get(method, {})
    return build_config(cli=dict(model=MODEL, method=method.split("+")[0], runs_dir=str(root), run_id=run_id,
                                 rounds=ROUNDS, clients=CLIENTS, samples_per_client=4, max_length=64, lr=1e-2,
                                 grad_accum=2, aggregate_every=2, microbatch_wait_ms=60000, device="cpu",
                                 done_linger_s=0.5, **extra),
                        env={})


class Runs:
    """Each method's pipeline run and in-process run, made on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pipeline: dict = {}
        self._inprocess: dict = {}

    def pipeline(self, method: str):
        if method not in self._pipeline:
            cfg = make_config(self.root, method, f"{method}-pipeline")
            self._pipeline[method] = launch(cfg, timeout_s=LAUNCH_TIMEOUT_S)
        return self._pipeline[method]

    def inprocess(self, method: str):
        if method not in self._inprocess:
            self._inprocess[method] = train_inprocess(make_config(self.root, method, f"{method}-inprocess"))
        return self._inprocess[method]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("method-runs"))


def worker(result, name: str) -> dict:
    return result.summary["workers"][name]


def adapter_names(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("*adapters.safetensors")}


def layers_of(adapters: dict) -> set[int]:
    return {int(re.match(r"layers\.(\d+)\.", k).group(1)) for k in adapters}


def round_records(path: Path) -> list[dict]:
    return [r for r in read_jsonl(path) if r.get("event") == "round"]


# --------------------------------------------------------------------------- every method


# power's FORWARD (no reference path) is splitlora's: its launch is a `slow` case (make test-slow)
SLOW_CASES = {"lesft+power"}


def cases(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in names]


@pytest.mark.parametrize("method", cases(ALL + tuple(LOSS_CASES)))
def test_pipeline_reproduces_the_inprocess_trainer(runs, method):
    # Execute
    result = runs.pipeline(method)
    expected = runs.inprocess(method)
    kind = method.split("+")[0]

    # Assert: the processes of the method ran and ended well, and wrote what the trainer writes
    assert set(result.returncodes) == PROCESSES[kind]
    assert all(code == 0 for code in result.returncodes.values()), result.returncodes
    assert set(result.summary["workers"]) == PROCESSES[kind]
    assert adapter_names(result.run_dir) == adapter_names(expected.run_dir) == ADAPTER_FILES[kind]
    for name in ADAPTER_FILES[kind]:
        got, want = lora.load_adapters(result.run_dir / name), lora.load_adapters(expected.run_dir / name)
        assert got.keys() == want.keys(), name
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)


WITH_FOLDERS = list(ALL)


@pytest.mark.parametrize("method", WITH_FOLDERS)
def test_pipeline_writes_the_combined_adapter_folders(runs, method):
    result, expected = runs.pipeline(method), runs.inprocess(method)
    folders = {p.name for p in result.run_dir.glob("adapter*") if p.is_dir()}
    assert folders == {p.name for p in expected.run_dir.glob("adapter*") if p.is_dir()}
    assert "adapter" in folders
    got, want = lora.load_peft_adapter(result.run_dir / "adapter"), lora.load_peft_adapter(expected.run_dir / "adapter")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method", WITH_FOLDERS)
def test_adapter_folder_loads_with_peft(runs, method, tiny_folders):
    # Prepare
    from peft import PeftModel

    result = runs.pipeline(method)
    ids = torch.randint(2, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    # Execute
    base = fresh_hf_model(tiny_folders["tiny-qwen2"])
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=mask).logits
    tuned = PeftModel.from_pretrained(base, str(result.run_dir / "adapter")).eval()
    with torch.no_grad():
        after = tuned(input_ids=ids, attention_mask=mask).logits

    # Assert: the adapters load onto the plain model and change what it computes
    assert torch.isfinite(after).all()
    assert not torch.allclose(after, before, atol=1e-6)


# --------------------------------------------------------------------------- what distinguishes each


def test_splitfrozen_clients_hold_no_lora_and_receive_no_gradient(runs):
    # Prepare
    result = runs.pipeline("splitfrozen")
    cfg = make_config(runs.root, "splitfrozen", "init")
    source = source_for(cfg)
    k = split_point(source.n_layers, cfg.model.split_ratio)
    init = lora.get_adapters(lora.add_lora(ServerModel(source, k), cfg.lora, seed=cfg.train.seed))
    server = worker(result, "server-0")

    # Assert: no client adapter file, no client training, BACKWARD carries no tensor
    assert not list(result.run_dir.glob("client*adapters.safetensors"))
    for i in range(CLIENTS):
        rec = worker(result, f"client-{i}")
        assert rec["msgs_sent"]["forward"] == ROUNDS
        assert rec["compute_s"].get("forward", 0) > 0
        assert rec["compute_s"].get("backward", 0) == 0 and rec["compute_s"].get("optimizer", 0) == 0
        assert rec["steps"] == 0
    assert server["msgs_sent"]["backward"] == CLIENTS * ROUNDS
    assert server["bytes_sent"]["backward"] / server["msgs_sent"]["backward"] < 200
    # ... while the server trains its own adapters
    trained = lora.load_adapters(result.run_dir / SERVER_FILE)
    assert trained.keys() == init.keys()
    assert any(not torch.equal(trained[key], init[key]) for key in init)


def test_sl_keeps_one_adapter_per_client_without_an_aggregator(runs):
    result = runs.pipeline("sl")
    assert "aggregator-0" not in result.returncodes
    assert not (result.run_dir / "aggregator-0.jsonl").exists()
    assert not (result.run_dir / GLOBAL_CLIENT_FILE).exists()
    first, second = (lora.load_adapters(result.run_dir / client_file(i)) for i in range(CLIENTS))
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[key], second[key]) for key in first)
    for i in range(CLIENTS):
        assert (result.run_dir / f"adapter-client{i}" / "adapter_model.safetensors").is_file()
        assert not any(k.startswith("agg.") for k in worker(result, f"client-{i}")["bytes_sent"])


def test_splitlora_trains_with_sft_and_averages_the_client_adapters(runs):
    result = runs.pipeline("splitlora")
    rounds = round_records(result.run_dir / "server-0.jsonl")
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert all("frac_salient" not in r and "weight_mean" not in r for r in rounds)
    assert all(r["loss"] > 0 for r in rounds)
    aggregations = [r["round"] for r in read_jsonl(result.run_dir / "aggregator-0.jsonl")
                    if r["event"] == "aggregation"]
    assert aggregations == [1, 3]
    for i in range(CLIENTS):
        assert [r["round"] for r in round_records(result.run_dir / f"client-{i}.jsonl") if r["aggregated"]] == [1, 3]
        assert worker(result, f"client-{i}")["msgs_sent"]["agg.upload"] == 2
    assert (result.run_dir / GLOBAL_CLIENT_FILE).is_file()


def test_lesft_weights_tokens_and_sends_the_reference_path(runs):
    result = runs.pipeline("lesft")
    rounds = round_records(result.run_dir / "server-0.jsonl")
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    for r in rounds:
        fractions = [r["frac_salient"], r["frac_subsalient"], r["frac_irrelevant"]]
        assert all(0 <= f <= 1 for f in fractions)
        assert sum(fractions) == pytest.approx(1.0)
        assert r["weight_mean"] > 0
    # the same data as splitlora, plus the reference activations on every FORWARD
    lesft_fwd = worker(result, "server-0")["bytes_received"]["forward"]
    sft_fwd = worker(runs.pipeline("splitlora"), "server-0")["bytes_received"]["forward"]
    assert lesft_fwd > 1.5 * sft_fwd
    # ... but the reference path gets no gradient: BACKWARD is the same size
    lesft_bwd = worker(result, "server-0")["bytes_sent"]["backward"]
    sft_bwd = worker(runs.pipeline("splitlora"), "server-0")["bytes_sent"]["backward"]
    assert abs(lesft_bwd - sft_bwd) < 100 * CLIENTS * ROUNDS


@pytest.mark.parametrize("case,stat", [("lesft+kd", "kl"), ("lesft+excess", "weight_mean"),
                                       pytest.param("lesft+power", "weight_mean", marks=pytest.mark.slow)])
def test_loss_variants_log_their_statistics_every_round(runs, case, stat):
    rounds = round_records(runs.pipeline(case).run_dir / "server-0.jsonl")
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    low, high = {"lesft+kd": (0.0, float("inf")), "lesft+excess": (1.0, 2.0), "lesft+power": (0.0, 1.0)}[case]
    assert all(low <= r[stat] <= high for r in rounds)
    assert all(("ref_nll" in r) == (case != "lesft+power") and "frac_salient" not in r for r in rounds)
    if case == "lesft+power":  # no reference path on the wire: the FORWARDs are splitlora's size
        power_fwd = worker(runs.pipeline(case), "server-0")["bytes_received"]["forward"]
        sft_fwd = worker(runs.pipeline("splitlora"), "server-0")["bytes_received"]["forward"]
        assert abs(power_fwd - sft_fwd) < 200 * CLIENTS * ROUNDS
    # the server's per-round figures are the trainer's
    trainer_rounds = round_records(runs.inprocess(case).run_dir / "trainer-0.jsonl")
    assert [r[stat] for r in rounds] == pytest.approx([r[stat] for r in trainer_rounds], rel=1e-6)


def test_fedavg_sends_no_activations_and_trains_every_layer(runs):
    result = runs.pipeline("fedavg")
    assert not (result.run_dir / "broker-0.jsonl").exists() and not (result.run_dir / "server-0.jsonl").exists()
    for i in range(CLIENTS):
        rec = worker(result, f"client-{i}")
        assert rec["total_sent"] > 0
        assert all(k.startswith("agg.") for k in rec["bytes_sent"]), rec["bytes_sent"]
        assert all(k.startswith("agg.") for k in rec["bytes_received"]), rec["bytes_received"]
        assert rec["msgs_sent"]["agg.upload"] == 2
    agg = worker(result, "aggregator-0")
    assert "forward" not in agg["bytes_received"] and agg["msgs_sent"]["adapters"] == 2
    assert layers_of(lora.load_adapters(result.run_dir / GLOBAL_CLIENT_FILE)) == set(range(N_LAYERS))


def test_centralized_is_one_process_with_nothing_on_the_wire(runs):
    result = runs.pipeline("centralized")
    assert set(result.returncodes) == {"server-0"}
    assert {p.name for p in result.run_dir.glob("*.jsonl")} == {"server-0.jsonl"}
    rec = worker(result, "server-0")
    assert rec["total_sent"] == 0 and rec["total_received"] == 0
    assert [r["round"] for r in round_records(result.run_dir / "server-0.jsonl")] == list(range(ROUNDS))
    assert layers_of(lora.load_adapters(result.run_dir / GLOBAL_CLIENT_FILE)) == set(range(N_LAYERS))
