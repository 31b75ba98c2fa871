"""Pipelined rounds (``--pipeline-depth``) with every role a real process.

What is pinned:
- a run with one client at depth 2 and one at depth 4 reproduces the in-process trainer
  bit for bit (which the depth-1 run does too, ``test_methods_e2e.py``), for ``lesft``,
  ``splitlora`` and ``splitfrozen`` (forwards only), and label-private (``lesft``,
  ``splitlora``: two exchanges a round, the next rounds' FORWARDs in flight meanwhile): the
  clients really send rounds ahead, yet every accumulation window drains before the step,
  and nothing is sent twice; label-private over CurveZMQ too (slow);
- (slow) a pipelined client SIGKILLed mid-window and restarted, then the server SIGKILLed
  mid-window and restarted with ``--resume``, end with the undisturbed run's adapters:
  the restarted client sends its rounds in flight again and the server answers the
  repeats from its reply cache; label-private too, where the resumed server has lost the
  forwards it held for a HEAD_GRAD and the client sends that round again.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from conftest import LiveRun, assert_same_adapters, e2e_config
from lesft import lora
from lesft.config import build_config
from lesft.trainer import train_inprocess
from workers.launch import roles_for

pytestmark = pytest.mark.e2e

ROUNDS = 8  # two accumulation windows of 4


def make_config(root: Path, method: str, depth: int, run_id: str, label_private: bool = False, keys_dir: str = ""):
    return build_config(cli=dict(model="arch:tiny-qwen2", method=method, runs_dir=str(root), run_id=run_id,
                                 rounds=ROUNDS, clients=2, samples_per_client=4, max_length=64, lr=1e-2,
                                 grad_accum=4, aggregate_every=4, microbatch_wait_ms=60000, device="cpu",
                                 done_linger_s=0.5, pipeline_depth=depth, label_private=label_private,
                                 keys_dir=keys_dir),
                        env={})


def counter(record: dict, name: str) -> int:
    return int(record.get("counters", {}).get(name, 0))


DEPTHS = {0: 2, 1: 4}  # client -> its --pipeline-depth (the server takes 4): both depths in one run


@pytest.mark.parametrize("method, label_private, curve", [
    ("lesft", False, False), pytest.param("splitlora", False, False, marks=pytest.mark.slow),  # make test-slow
    pytest.param("splitfrozen", False, False, marks=pytest.mark.slow),
    ("lesft", True, False), pytest.param("splitlora", True, False, marks=pytest.mark.slow),  # two legs a round
    pytest.param("lesft", True, True, marks=pytest.mark.slow)])  # ... over CurveZMQ
def test_pipelined_run_reproduces_the_inprocess_trainer(tmp_path, method, label_private, curve, live_run):
    # Prepare
    keys = ""
    if curve:
        from lesft.cli.keys import generate_keys

        generate_keys(tmp_path / "keys", 2)
        keys = str(tmp_path / "keys")
    expected = train_inprocess(make_config(tmp_path, method, 1, "inprocess", label_private))
    run = live_run(make_config(tmp_path, method, 4, "pipelined", label_private, keys), start=False)
    for role, wid in roles_for(run.cfg):
        run.start(role, wid, ["--pipeline-depth", str(DEPTHS[wid])] if role == "client" else [])

    # Execute
    codes = run.wait_done()

    # Assert: bit-identical adapters
    assert all(c == 0 for n, c in codes.items() if n != "broker-0"), codes
    names = {p.name for p in expected.run_dir.glob("*adapters.safetensors")}
    assert names == {p.name for p in run.run_dir.glob("*adapters.safetensors")} and names
    for name in names:
        got, want = lora.load_adapters(run.run_dir / name), lora.load_adapters(expected.run_dir / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    # ... with rounds really in flight: at depth >= 2 every round of a window of 4 but its first
    # is sent while an earlier one is awaited, and none of the next window's before the drain
    for i in DEPTHS:
        client = run.final(f"client-{i}")
        assert counter(client, "forwards_ahead") == 3 * (ROUNDS // 4), client.get("counters")
        assert client["msgs_sent"]["forward"] == ROUNDS  # nothing sent twice
    assert counter(run.final("server-0"), "repeated_requests") == 0


# ----------------------------------------------------------------------------- crashes


@pytest.mark.slow
@pytest.mark.parametrize("label_private", [False, True], ids=["standard", "label-private"])
def test_pipelined_client_and_server_killed_mid_window_give_the_same_adapters(tmp_path, reference_adapters,
                                                                                label_private):
    # Prepare: windows of 4 rounds, all 4 in flight
    cfg = e2e_config(tmp_path, rounds=16, pipeline_depth=4, label_private=label_private)
    ref = reference_adapters(cfg.replace(pipeline_depth=1))
    run = LiveRun(cfg).start_all()
    try:
        # Execute: each fault while the clients are frozen (SIGSTOP); at depth 4 a client has
        # rounds in flight wherever it is in a window but at its last round
        run.wait_rounds(2)
        run.freeze()
        killed_client_at = len(run.server_rounds())
        run.kill("client-1")
        run.thaw()
        run.restart("client-1")
        run.wait_for(lambda: "resumed from" in run.log("client-1"), 240, "client 1 to resume")
        run.wait_rounds(killed_client_at + 3)

        run.freeze()
        killed_server_at = len(run.server_rounds())
        run.kill("server-0")
        run.thaw()
        time.sleep(cfg.net.request_timeout_s + 1)  # every client gives up waiting and sends again
        run.restart("server-0", ["--resume"])
        codes = run.wait_done()
    finally:
        run.stop()

    # Assert: every round closed once with both clients, and the adapters are the undisturbed run's
    assert all(c == 0 for n, c in codes.items() if n != "broker-0"), codes
    rounds = run.server_rounds()
    assert sorted({r["round"] for r in rounds}) == list(range(16)), (killed_client_at, killed_server_at)
    assert all(r["clients"] == [0, 1] and not r["failed"] for r in rounds)
    assert_same_adapters(run.run_dir, 2, ref, atol=1e-5)  # the tolerance of test_reliability_e2e.py
    assert "client 1 registered again" in run.log("server-0")
    assert counter(run.final("client-1"), "forwards_ahead") > 0
    # label-private: a HEAD_GRAD the resumed server holds no forward for resends its round, in
    # one line, never as a straggler's
    for i in range(2):
        log = run.log(f"client-{i}")
        assert "left out of round" not in log, log[-2000:]
        resent = re.findall(r"round (\d+): the server holds no forward of round \1: it restarted since it sent the "
                            r"hidden states; sending the round again", log)
        assert len(resent) == counter(run.final(f"client-{i}"), "rounds_resent") and (label_private or not resent)
