"""End-to-end tests of the ZeroMQ pipeline: real ``lesft-worker`` processes (broker, server,
aggregator, clients) on loopback, started by the launcher, by hand in any order, and by
``honcho start`` from a Procfile.

What is pinned:
- the multi-process run reproduces the in-process reference trainer (``train_inprocess``)
  bit for bit, over several aggregation periods (fp32 wire);
- the byte accounting: what the clients count as sent FORWARD is what the server counts
  as received, and equals the tensor payload recomputed from the batch shapes plus a
  small header; BACKWARD likewise; every worker reports compute, wall time and memory;
- a bf16 wire halves the activation and gradient bytes and changes the adapters only a
  little;
- start-up in any order (the server names whom it waits for), SIGTERM is a clean exit,
  and the repository's Procfile runs under honcho to exit status 0 with every output.

Launched runs are shared between tests (module-scoped fixtures): each costs ~30-60 s on
a 2-core runner, mostly seven python processes importing torch.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lesft import lora
from lesft.config import build_config
from lesft.engine import ClientParty
from lesft.methods import get_method
from lesft.metrics import read_jsonl
from lesft.models import source_for
from lesft.runs import GLOBAL_CLIENT_FILE, SERVER_FILE
from lesft.trainer import client_shards, party_layout, train_inprocess
from workers.launch import launch, local_addresses, worker_env

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL = "arch:tiny-qwen2"
CLIENTS = 4
ROUNDS = 4
LAUNCH_TIMEOUT_S = 420
INT_BYTES = 4  # index tensors travel as int32


def make_config(root: Path, run_id: str, **overrides):
    """The tiny run of this module: 4 clients, 4 rounds, a step every round, FedAvg every
    2 rounds (two aggregation periods), LESFT (both paths on the wire), one microbatch
    per round (the server waits for every client), a short linger at the end."""
    cli = dict(model=MODEL, runs_dir=str(root), run_id=run_id, rounds=ROUNDS, clients=CLIENTS,
               samples_per_client=4, max_length=128, lr=1e-3, grad_accum=1, aggregate_every=2,
               microbatch_wait_ms=60000, device="cpu", done_linger_s=0.5)
    cli.update(overrides)
    return build_config(cli=cli, env={})


# --------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline-runs")


@pytest.fixture(scope="module")
def fp32_run(root):
    cfg = make_config(root, "fp32")
    return cfg, launch(cfg, timeout_s=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def bf16_run(root):
    cfg = make_config(root, "bf16", wire_dtype="bf16")
    return cfg, launch(cfg, timeout_s=LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def inprocess_run(root):
    return train_inprocess(make_config(root, "inprocess"))


@pytest.fixture(scope="module")
def shapes(root) -> dict[int, list[dict]]:
    """Per client, per round: the FORWARD tensors' shapes, re-encoded independently of the
    run (same config and data, a fresh ClientParty per client)."""
    cfg = make_config(root, "shapes")
    method = get_method(cfg.train.method)
    source = source_for(cfg)
    tok = source.load_tokenizer()
    shards, batch_size = party_layout(method, cfg, client_shards(cfg))
    hidden = int(source.config.hidden_size)
    out: dict[int, list[dict]] = {}
    for cid in range(cfg.data.clients):
        party = ClientParty(cfg, source, method, cid, shards[cid], tok, batch_size=batch_size)
        out[cid] = []
        for r in range(ROUNDS):
            b = party.batch(r)
            out[cid].append(dict(B=len(b), T=b.base.input_ids.shape[1], T2=b.ref.input_ids.shape[1],
                                 Ty=b.targets.shape[1], H=hidden))
    return out


def act_elems(s: dict) -> int:
    """Float elements of one FORWARD: act [B, T, H] + ref_act [B, T2, H]."""
    return s["B"] * s["T"] * s["H"] + s["B"] * s["T2"] * s["H"]


def int_bytes(s: dict) -> int:
    """lengths, y_start, y_len, ref_lengths, ref_y_start [B] and targets [B, Ty], as int32."""
    return INT_BYTES * (5 * s["B"] + s["B"] * s["Ty"])


def grad_elems(s: dict) -> int:
    """dL/dS of the trained path only: [B, T, H] (the reference path gets no gradient)."""
    return s["B"] * s["T"] * s["H"]


def final(result, name: str) -> dict:
    return result.summary["workers"][name]


def clients_sum(result, direction: str, msg_type: str) -> int:
    return sum(final(result, f"client-{i}")[direction].get(msg_type, 0) for i in range(CLIENTS))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def adapter_files(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: lora.load_adapters(run_dir / name) for name in (SERVER_FILE, GLOBAL_CLIENT_FILE)}


# --------------------------------------------------------------------------- 1. exact agreement


def test_pipeline_reproduces_the_inprocess_trainer(fp32_run, inprocess_run):
    # Prepare
    cfg, result = fp32_run
    assert set(result.returncodes) == {"broker-0", "server-0", "aggregator-0"} | {f"client-{i}" for i in range(CLIENTS)}
    assert all(code == 0 for code in result.returncodes.values()), result.returncodes
    server_rounds = [r for r in read_jsonl(result.run_dir / "server-0.jsonl") if r["event"] == "round"]
    aggregations = [r["round"] for r in read_jsonl(result.run_dir / "aggregator-0.jsonl") if r["event"] == "aggregation"]

    # Execute
    got, expected = adapter_files(result.run_dir), adapter_files(inprocess_run.run_dir)

    # Assert: the run had the shape the comparison needs (every client every round, one
    # microbatch per round, a step every round, two aggregation periods)
    assert [r["round"] for r in server_rounds] == list(range(ROUNDS))
    assert all(r["clients"] == list(range(CLIENTS)) and r["stepped"] for r in server_rounds)
    assert aggregations == [1, 3]
    for name in (SERVER_FILE, GLOBAL_CLIENT_FILE):
        assert got[name].keys() == expected[name].keys(), name
        for key, want in expected[name].items():
            assert rel_diff(got[name][key], want) <= 1e-5, (name, key)
            assert torch.equal(got[name][key], want), (name, key)  # bit-identical today
    # ... and the comparison is not vacuous: training moved the LoRA B matrices off zero
    assert all(t.abs().max() > 0 for k, t in got[SERVER_FILE].items() if k.endswith("lora_B"))
    assert all(t.abs().max() > 0 for k, t in got[GLOBAL_CLIENT_FILE].items() if k.endswith("lora_B"))
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- 4. accounting


def test_every_worker_reports_bytes_compute_wall_and_memory(fp32_run):
    _, result = fp32_run
    workers = result.summary["workers"]
    assert set(workers) == set(result.returncodes)
    for name, rec in workers.items():
        assert rec["event"] == "final", name
        assert isinstance(rec["bytes_sent"], dict) and isinstance(rec["bytes_received"], dict), name
        assert rec["wall_s"] > 0 and rec["peak_rss_mb"] > 0, name
        assert rec["total_sent"] == sum(rec["bytes_sent"].values()), name
        assert rec["total_received"] == sum(rec["bytes_received"].values()), name
    for i in range(CLIENTS):
        rec = workers[f"client-{i}"]
        assert {"forward", "backward", "optimizer"} <= {k for k, v in rec["compute_s"].items() if v > 0}
        # the server's traffic by message type; the aggregator's counted apart ("agg.")
        assert {"hello", "forward", "bye", "agg.hello", "agg.upload", "agg.bye"} <= set(rec["bytes_sent"])
        assert {"welcome", "backward", "done", "agg.ack", "agg.adapters"} <= set(rec["bytes_received"])
        assert rec["msgs_sent"]["forward"] == ROUNDS and rec["msgs_received"]["backward"] == ROUNDS
        assert rec["msgs_sent"]["agg.upload"] == 2
    server = workers["server-0"]
    assert {"forward", "backward", "optimizer", "loss"} <= {k for k, v in server["compute_s"].items() if v > 0}
    assert server["msgs_received"]["forward"] == CLIENTS * ROUNDS
    assert server["msgs_sent"]["backward"] == CLIENTS * ROUNDS
    agg = workers["aggregator-0"]
    assert agg["compute_s"].get("aggregate", 0) > 0
    assert agg["msgs_received"]["upload"] == 2 * CLIENTS and agg["msgs_sent"]["adapters"] == 2
    broker = workers["broker-0"]
    assert broker["bytes_received"]["to_server"] >= clients_sum(result, "bytes_sent", "forward")
    assert broker["bytes_received"]["to_clients"] >= server["bytes_sent"]["backward"]


def test_forward_and_backward_bytes_agree_between_the_sides(fp32_run):
    _, result = fp32_run
    server = final(result, "server-0")
    assert clients_sum(result, "bytes_sent", "forward") == server["bytes_received"]["forward"]
    assert clients_sum(result, "bytes_received", "backward") == server["bytes_sent"]["backward"]
    agg = final(result, "aggregator-0")
    assert clients_sum(result, "bytes_sent", "agg.upload") == agg["bytes_received"]["upload"]


def test_broadcast_bytes_agree_between_the_sides(fp32_run):
    _, result = fp32_run
    agg = final(result, "aggregator-0")
    assert clients_sum(result, "bytes_received", "agg.adapters") == CLIENTS * agg["bytes_sent"]["adapters"]


def test_forward_and_backward_bytes_are_the_payload_plus_a_small_header(fp32_run, shapes):
    # Prepare
    _, result = fp32_run
    total_payload = total_bytes = 0

    for cid in range(CLIENTS):
        # Execute: the payload of this client's FORWARDs, recomputed from the batch shapes
        rec = final(result, f"client-{cid}")
        fwd_payload = sum(4 * act_elems(s) + int_bytes(s) for s in shapes[cid])
        bwd_payload = sum(4 * grad_elems(s) for s in shapes[cid])
        fwd_header = (rec["bytes_sent"]["forward"] - fwd_payload) / ROUNDS
        bwd_header = (rec["bytes_received"]["backward"] - bwd_payload) / ROUNDS

        # Assert: one msgpack header per message on top of the tensors (measured ~246 bytes
        # per FORWARD, ~0.4% of its payload here, and ~95 per BACKWARD)
        assert 0 < fwd_header < 400, (cid, fwd_header)
        assert 0 < bwd_header < 200, (cid, bwd_header)
        assert fwd_header < 0.01 * fwd_payload / ROUNDS
        total_payload += fwd_payload
        total_bytes += rec["bytes_sent"]["forward"]
    assert (total_bytes - total_payload) / total_payload < 0.01


# --------------------------------------------------------------------------- 5. bf16 wire


def test_bf16_wire_halves_the_activation_bytes(fp32_run, bf16_run, shapes):
    _, fp32 = fp32_run
    _, bf16 = bf16_run
    assert all(code == 0 for code in bf16.returncodes.values()), bf16.returncodes
    act_fp32 = sum(4 * act_elems(s) for c in shapes.values() for s in c)
    ints = sum(int_bytes(s) for c in shapes.values() for s in c)
    grad_fp32 = sum(4 * grad_elems(s) for c in shapes.values() for s in c)
    messages = CLIENTS * ROUNDS

    fwd = clients_sum(bf16, "bytes_sent", "forward")
    bwd = final(bf16, "server-0")["bytes_sent"]["backward"]

    assert fwd == final(bf16, "server-0")["bytes_received"]["forward"]
    assert 0 < (fwd - (act_fp32 // 2 + ints)) / messages < 400  # bf16 activations + int32 + header
    assert (fwd - ints) / act_fp32 == pytest.approx(0.5, rel=0.01)
    assert 0 < (bwd - grad_fp32 // 2) / messages < 200
    assert fwd < 0.55 * clients_sum(fp32, "bytes_sent", "forward")


def test_bf16_wire_changes_the_adapters_only_a_little(fp32_run, bf16_run):
    # Prepare
    cfg, fp32 = fp32_run
    _, bf16 = bf16_run
    got, ref = adapter_files(bf16.run_dir), adapter_files(fp32.run_dir)
    init = _initial_adapters(cfg)

    # Assert: each adapter's update (trained minus init) agrees within bf16 rounding noise
    # (measured ~0.3-2.5% here), but the rounding of the wire is visible
    for name in (SERVER_FILE, GLOBAL_CLIENT_FILE):
        assert got[name].keys() == ref[name].keys()
        for key, want in ref[name].items():
            assert rel_diff(got[name][key] - init[key], want - init[key]) < 0.1, (name, key)
        assert any(not torch.equal(got[name][k], ref[name][k]) for k in ref[name]), name


def _initial_adapters(cfg) -> dict[str, torch.Tensor]:
    """Both sides' LoRA before training (same seed as the run)."""
    from lesft.split import ClientModel, ServerModel, split_point

    source = source_for(cfg)
    k = split_point(source.n_layers, cfg.model.split_ratio)
    out = {}
    for part in (ClientModel(source, k), ServerModel(source, k)):
        out.update(lora.get_adapters(lora.add_lora(part, cfg.lora, seed=cfg.train.seed)))
    return out


# --------------------------------------------------------------------------- 2. by hand, any order


def _popen(cmd: list[str], log: Path, cwd: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _stop_tree(p: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop a process that starts its own children in new sessions (honcho): SIGTERM it
    (it stops its children), then SIGKILL whatever of the tree is left."""
    import psutil

    if p.poll() is not None:
        return
    try:
        children = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    _kill_group(p)


def _wait_for_text(path: Path, pattern: str, timeout_s: float, procs: dict[str, subprocess.Popen]) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.is_file() else ""
        if re.search(pattern, text):
            return text
        dead = {n: p.returncode for n, p in procs.items() if p.poll() not in (None, 0)}
        assert not dead, f"processes failed while waiting for {pattern!r}: {dead}"
        time.sleep(0.2)
    raise AssertionError(f"{path.name} never logged {pattern!r} within {timeout_s:.0f}s")


def test_roles_started_by_hand_in_any_order(tmp_path):
    # Prepare: a TOML with fresh loopback addresses; two clients
    cfg = make_config(tmp_path / "runs", "by-hand", clients=2)
    cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, **local_addresses()))
    toml = tmp_path / "run.toml"
    toml.write_text(cfg.to_toml())
    env = worker_env()
    logs = tmp_path / "logs"
    logs.mkdir()

    def cmd(role: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "workers.main", "--role", role, "--config", str(toml), *extra]

    procs: dict[str, subprocess.Popen] = {}
    try:
        # Execute: client 1, aggregator, server, broker (the reverse of the Procfile), ~2 s
        # apart; client 0 only once the server has said whom it is waiting for (>= 10 s)
        for name, args in (("client-1", cmd("client", "--id", "1", "--threads", "1")), ("aggregator", cmd("aggregator")),
                           ("server", cmd("server")), ("broker", cmd("broker"))):
            procs[name] = _popen(args, logs / f"{name}.log", tmp_path, env)
            time.sleep(2)
        server_log = _wait_for_text(logs / "server.log", r"waiting for client\(s\) 0 \(1/2 registered\)", 120, procs)
        procs["client-0"] = _popen(cmd("client", "--id", "0", "--threads", "1"), logs / "client-0.log", tmp_path, env)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        workers = [n for n in procs if n != "broker"]
        while any(procs[n].poll() is None for n in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        codes = {n: procs[n].poll() for n in workers}
        assert all(c == 0 for c in codes.values()), (codes, {n: (logs / f"{n}.log").read_text()[-1500:] for n in codes})
        assert procs["broker"].poll() is None  # the broker serves until told to stop
        procs["broker"].send_signal(signal.SIGTERM)
        broker_code = procs["broker"].wait(timeout=30)
    finally:
        for p in procs.values():
            _kill_group(p)

    # Assert
    assert broker_code == 0
    assert "client 1 registered (4 samples, 1/2)" in server_log
    run_dir = tmp_path / "runs" / "by-hand"
    assert (run_dir / SERVER_FILE).is_file() and (run_dir / GLOBAL_CLIENT_FILE).is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    for name in ("broker-0", "server-0", "aggregator-0", "client-0", "client-1"):
        assert read_jsonl(run_dir / f"{name}.jsonl")[-1]["event"] == "final", name
    rounds = [r for r in read_jsonl(run_dir / "server-0.jsonl") if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert all(r["clients"] == [0, 1] for r in rounds)


# --------------------------------------------------------------------------- 3. Procfile / honcho


def read_procfile(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def test_repo_procfile_runs_broker_server_aggregator_and_four_clients():
    entries = read_procfile(REPO / "Procfile")
    assert list(entries) == ["broker", "server", "aggregator", "client0", "client1", "client2", "client3"]
    for name, command in entries.items():
        role = re.sub(r"\d+$", "", name)
        assert command.startswith(f"lesft-worker --role {role} "), command
        assert re.search(r"--config \S+\.toml", command), command
        if role == "client":
            assert f"--id {name[len('client'):]} " in command + " ", command


def test_procfile_under_honcho(tmp_path):
    # Prepare: the repo's Procfile with its --config pointed at a tiny TOML (4 clients as in
    # the Procfile, fresh loopback ports); the run id comes from LESFT_RUN_ID as in `make demo`
    honcho = BIN / "honcho"
    assert honcho.is_file() and (BIN / "lesft-worker").is_file(), f"install the dev extras: pip install -e '.[dev]' ({BIN})"
    # the default linger of the server and aggregator (5 s): a client exits first, as the
    # Procfile needs (honcho stops everyone when the first process exits)
    cfg = make_config(tmp_path / "runs", "from-toml", clients=4, rounds=4, done_linger_s=5.0)
    cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, **local_addresses()))
    toml = tmp_path / "tiny.toml"
    toml.write_text(cfg.to_toml())
    work = tmp_path / "procfile"
    work.mkdir()
    text = re.sub(r"--config \S+", f"--config {toml}", (REPO / "Procfile").read_text())
    (work / "Procfile").write_text(text)
    env = worker_env({"LESFT_RUN_ID": "honcho-run", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    log = tmp_path / "honcho.log"

    # Execute
    proc = _popen([str(honcho), "start"], log, work, env)
    try:
        code = proc.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _stop_tree(proc)

    # Assert
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    run_dir = tmp_path / "runs" / "honcho-run"
    assert not (tmp_path / "runs" / "from-toml").exists()  # env beats TOML
    names = {p.name for p in run_dir.iterdir()}
    expected = {"broker-0.jsonl", "server-0.jsonl", "aggregator-0.jsonl"} | {f"client-{i}.jsonl" for i in range(4)}
    assert expected <= names, sorted(names)
    assert {SERVER_FILE, GLOBAL_CLIENT_FILE, "adapter"} <= names, sorted(names)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    rounds = [r for r in read_jsonl(run_dir / "server-0.jsonl") if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(4))
    for name in ("server-0", "aggregator-0", "client-0", "client-1", "client-2", "client-3"):
        assert read_jsonl(run_dir / f"{name}.jsonl")[-1]["event"] == "final", name
