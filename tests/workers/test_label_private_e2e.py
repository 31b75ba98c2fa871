"""End-to-end tests of label-private runs (``--label-private``): real worker processes behind
a recording broker (this test's own ROUTER <-> ROUTER proxy, which keeps every message the
server receives).

What is pinned:
- the label-private pipeline reproduces the label-private in-process trainer bit for bit
  (which equals the standard trainer, tests/test_private.py);
- privacy: no client's target token ids (any 8 consecutive ones, as an int or float array of
  any wire dtype, or as integers in the msgpack header) reach the server in a label-private
  run, and they do in a standard run (so the check can fail);
- with ``--client-tail-layers 1`` (the clients keep the last decoder layer) the pipeline
  reproduces the in-process trainer bit for bit too (slow);
- a label-private client killed with SIGKILL and restarted resumes, and the run ends with
  the adapters of an undisturbed run (slow);
- a straggler between its two exchanges (its HEAD_GRAD of one round never reaches the
  server) is given up after ``--straggler-timeout-s``: the round closes with the other
  client alone (and the next few, until the straggler hears of it), the straggler
  continues where the server is, the run finishes (slow).
"""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Callable

import msgpack
import numpy as np
import pytest
import torch
import zmq

from conftest import assert_same_adapters, e2e_config
from lesft import lora, wire
from lesft.batching import encode_all
from lesft.config import build_config
from lesft.metrics import read_jsonl
from lesft.models import source_for
from lesft.runs import GLOBAL_CLIENT_FILE, SERVER_FILE
from lesft.trainer import client_shards, train_inprocess
from workers import launch as launcher
from workers.transport import SERVER_ROUTING_ID

pytestmark = pytest.mark.e2e

LAUNCH_TIMEOUT_S = 420
WINDOW = 8  # label ids in a row that count as "the target appears"
STRAGGLER_ROUNDS = 32  # the straggler test's: enough for the left-out client to come back


def make_config(root: Path, run_id: str, method: str = "lesft", label_private: bool = True, **over):
    cli = dict(model="arch:tiny-qwen2", method=method, runs_dir=str(root), run_id=run_id, rounds=4, clients=2,
               samples_per_client=4, max_length=64, lr=1e-2, grad_accum=2, aggregate_every=2,
               microbatch_wait_ms=60000, device="cpu", done_linger_s=0.5, label_private=label_private)
    return build_config(cli=cli | over, env={})


class RecordingBroker(threading.Thread):
    """The broker's routing (clients' ROUTER <-> the server's ROUTER, requests addressed to the
    server's routing id), keeping a copy of every message body that goes to the server; one
    for which ``drop(header)`` is true (a lossy link) is kept but not passed on."""

    def __init__(self, frontend: str, backend: str, drop: Callable[[dict], bool] | None = None) -> None:
        super().__init__(daemon=True)
        self.frontend, self.backend, self.drop = frontend, backend, drop
        self.to_server: list[list[bytes]] = []
        self.done = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context.instance()
        front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
        front.bind(self.frontend)
        back.bind(self.backend)
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        try:
            while not self.done.is_set():
                events = dict(poller.poll(100))
                if front in events:
                    frames = front.recv_multipart()
                    body = wire.split_envelope(frames)[1]
                    self.to_server.append(body)
                    if self.drop is not None and self.drop(msgpack.unpackb(body[0], raw=False)):
                        continue
                    back.send_multipart([SERVER_ROUTING_ID, *frames])
                if back in events:
                    frames = back.recv_multipart()
                    if frames[0] == SERVER_ROUTING_ID:
                        front.send_multipart(frames[1:])
        finally:
            front.close(linger=0)
            back.close(linger=0)


def launch_recorded(cfg, monkeypatch, drop: Callable[[dict], bool] | None = None, **kw):
    """Launch ``cfg`` without its broker, behind a :class:`RecordingBroker`; returns (result, bodies)."""
    addresses = launcher.local_addresses("tcp")
    monkeypatch.setattr(launcher, "local_addresses", lambda *a, **k: addresses)
    broker = RecordingBroker(addresses["broker_frontend"], addresses["broker_backend"], drop)
    broker.start()
    try:
        roles = [r for r in launcher.roles_for(cfg) if r[0] != "broker"]
        result = launcher.launch(cfg, roles=roles, timeout_s=LAUNCH_TIMEOUT_S, **kw)
    finally:
        broker.done.set()
        broker.join(5)
    return result, broker.to_server


def label_windows(cfg) -> set[tuple[int, ...]]:
    """Every run of WINDOW consecutive target ids of every client's examples."""
    tok = source_for(cfg).load_tokenizer()
    out = set()
    for shard in client_shards(cfg, tok):
        for enc in encode_all(tok, shard, cfg.data.max_length):
            out |= {tuple(enc.target[i:i + WINDOW]) for i in range(len(enc.target) - WINDOW + 1)}
    assert out, "the examples' targets are shorter than the window"
    return out


def _encodings(window: tuple[int, ...]) -> list[bytes]:
    """The bytes of a run of ids as the wire could carry them: every integer and float dtype."""
    ids = np.array(window)
    out = [ids.astype(d).tobytes() for d in ("<i4", "<i8", "<f4", "<f2")]
    out.append(torch.tensor(window, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
    if ids.max() < 256:
        out.append(ids.astype("u1").tobytes())
    return out


def _header_ints(x) -> list[int]:
    if isinstance(x, bool):
        return []
    if isinstance(x, int):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, list):
        return [i for v in x for i in _header_ints(v)]
    return []


def leaked(bodies: list[list[bytes]], windows: set[tuple[int, ...]]) -> int:
    """How many messages carry some label window: in a tensor frame (any dtype) or among the
    integers of the msgpack header."""
    patterns = [p for w in windows for p in _encodings(w)]
    count = 0
    for body in bodies:
        ints = _header_ints(msgpack.unpackb(body[0], raw=False))
        in_header = any(tuple(ints[i:i + WINDOW]) in windows for i in range(len(ints) - WINDOW + 1))
        count += in_header or any(p in frame for frame in body for p in patterns)
    return count


def assert_same_adapter_files(run_dir: Path, expected_dir: Path) -> None:
    """The server's and the global client adapters of two runs are equal bit for bit."""
    for name in (SERVER_FILE, GLOBAL_CLIENT_FILE):
        got, want = lora.load_adapters(run_dir / name), lora.load_adapters(expected_dir / name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


# --------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label-private")


@pytest.fixture(scope="module")
def module_patch():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def recorded(root, module_patch):
    """``recorded(method, label_private)``: the pipeline run behind the recording broker, made once."""
    runs: dict = {}

    def get(method: str, label_private: bool):
        if (method, label_private) not in runs:
            cfg = make_config(root, f"{method}-{label_private}", method, label_private)
            runs[method, label_private] = (cfg, *launch_recorded(cfg, module_patch))
        return runs[method, label_private]

    return get


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", ["lesft", pytest.param("splitlora", marks=pytest.mark.slow)])
def test_label_private_pipeline_reproduces_the_inprocess_trainer(root, recorded, method):
    # Execute
    cfg, result, _ = recorded(method, True)
    expected = train_inprocess(make_config(root, f"{method}-inprocess", method))

    # Assert
    assert all(code == 0 for code in result.returncodes.values()), result.returncodes
    assert_same_adapter_files(result.run_dir, expected.run_dir)
    for name in ("server-0", "client-0", "client-1"):  # no message of the new exchange was refused
        assert not any(k.startswith("rejected") for k in result.summary["workers"][name].get("counters", {})), name


def test_the_server_never_receives_label_ids_in_a_label_private_run(recorded):
    # Prepare
    cfg, _, private_bodies = recorded("lesft", True)
    _, _, standard_bodies = recorded("lesft", False)
    windows = label_windows(cfg)

    # Assert: the standard run sends every FORWARD's targets; the label-private run none at all
    forwards = [b for b in standard_bodies if msgpack.unpackb(b[0], raw=False)["t"] == "forward"]
    assert forwards and leaked(forwards, windows) == len(forwards)
    kinds = {msgpack.unpackb(b[0], raw=False)["t"] for b in private_bodies}
    assert {"forward", "head_grad"} <= kinds
    assert leaked(private_bodies, windows) == 0


@pytest.mark.slow
def test_a_pipeline_whose_clients_keep_the_last_layer_reproduces_the_inprocess_trainer(tmp_path):
    # Execute: the clients keep the last decoder layer too (and run two rounds in flight)
    result = launcher.launch(make_config(tmp_path, "tail", client_tail_layers=1, pipeline_depth=2),
                             timeout_s=LAUNCH_TIMEOUT_S)
    expected = train_inprocess(make_config(tmp_path, "tail-inprocess", client_tail_layers=1))

    # Assert: the server trained no adapter of the last layer; every adapter is the trainer's
    assert all(code == 0 for code in result.returncodes.values()), result.returncodes
    last = source_for(make_config(tmp_path, "x")).n_layers - 1
    assert not any(k.startswith(f"layers.{last}.") for k in lora.load_adapters(result.run_dir / SERVER_FILE))
    assert any(k.startswith(f"layers.{last}.") for k in lora.load_adapters(result.run_dir / GLOBAL_CLIENT_FILE))
    assert_same_adapter_files(result.run_dir, expected.run_dir)


@pytest.mark.slow
def test_a_killed_label_private_client_resumes_and_the_run_ends_as_undisturbed(tmp_path, live_run,
                                                                                reference_adapters):
    # Prepare: clients frozen mid-run, so the kill can fall between HIDDEN and HEAD_GRAD
    cfg = e2e_config(tmp_path, label_private=True)
    ref = reference_adapters(cfg)
    run = live_run(cfg)
    run.wait_rounds(2)
    run.freeze()

    # Execute
    run.kill("client-1")
    run.thaw()
    run.restart("client-1")
    run.wait_for(lambda: "resumed from" in run.log("client-1"), 240, "client 1 to resume")
    codes = run.wait_done()

    # Assert
    assert all(c == 0 for n, c in codes.items() if n != "broker-0"), codes  # the broker runs until stopped
    assert_same_adapters(run.run_dir, cfg.data.clients, ref)


@pytest.mark.slow
def test_a_client_whose_head_grad_never_comes_is_left_out_and_the_run_finishes(tmp_path, monkeypatch):
    # Prepare: client 1's HEAD_GRADs of round 2 are lost on the way (it got its HIDDEN) until the
    # round has closed without them (client 0, lock-step, then sends its FORWARD of round 3).
    # One aggregation, at the end: a client that missed one waits for the aggregator's own
    # straggler timeout, and would come back late again; client 1 hears of the round's end at
    # its next heartbeat, while client 0 runs on alone at a few rounds a second
    cfg = make_config(tmp_path, "straggler", rounds=STRAGGLER_ROUNDS, aggregate_every=STRAGGLER_ROUNDS,
                      straggler_timeout_s=3, min_clients=1, request_timeout_s=8, heartbeat_s=1)
    closed = threading.Event()

    def lost(header: dict) -> bool:
        if (header["t"], header["id"], header["r"]) == ("forward", 0, 3):
            closed.set()
        return (header["t"], header["id"], header["r"]) == ("head_grad", 1, 2) and not closed.is_set()

    # Execute
    result, _ = launch_recorded(cfg, monkeypatch, drop=lost)

    # Assert: client 1 is missing from round 2 and at most the next few (client 0 runs on alone
    # until client 1 hears of it), back by the end; every round closed once, none failed
    assert all(code == 0 for code in result.returncodes.values()), result.returncodes
    rounds = [r for r in read_jsonl(result.run_dir / "server-0.jsonl") if r.get("event") == "round"]
    summary = [(r["round"], r["clients"], r["failed"]) for r in rounds]
    assert [r["round"] for r in rounds] == list(range(STRAGGLER_ROUNDS)), summary
    assert not any(r["failed"] for r in rounds), summary
    alone = [r["round"] for r in rounds if r["clients"] == [0]]
    assert alone and alone == list(range(2, 2 + len(alone))) and rounds[-1]["clients"] == [0, 1], summary
    logs = result.run_dir / "logs"
    assert "round 2: no dL/dH from client 1 in time: going on without it" in (logs / "server-0.log").read_text()
    # a HEAD_GRAD is awaited the full timeout from its HIDDEN, even in a round overdue already
    assert "sending the round again" not in (logs / "client-0.log").read_text()
    client_log = (logs / "client-1.log").read_text()
    assert re.search(rf"left out of round\(s\) 2\.\.{alone[-1]} \(straggler timeout\): continuing at round "
                     rf"{alone[-1] + 1}", client_log), client_log[-2000:]
