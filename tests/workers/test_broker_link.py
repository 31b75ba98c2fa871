"""The broker's edge-link emulator with real sockets: a real broker process between a
fake client and a fake server (plain DEALER sockets). Only lower bounds on the arrival
times are asserted: they hold on any machine, however loaded."""

from __future__ import annotations

import dataclasses
import time

import pytest
import zmq

from lesft.config import build_config
from lesft.metrics import read_jsonl
from workers.launch import local_addresses, start, stop_all, worker_env
from workers.transport import SERVER_ROUTING_ID

UP_BIT_S, DOWN_BIT_S, LATENCY_S = 4e6, 20e6, 0.05
UP_BYTES, DOWN_BYTES, N = 25_000, 125_000, 3  # 50 ms on either link per message


def _dealer(ctx: zmq.Context, address: str, routing_id: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if routing_id:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(address)
    return sock


def _arrivals(sock: zmq.Socket, n: int, timeout_s: float = 30.0) -> list[tuple[float, list[bytes]]]:
    """(arrival time, frames) of the next ``n`` messages on ``sock``."""
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            out.append((time.perf_counter(), frames))
    assert len(out) == n, f"{len(out)} of {n} messages arrived"
    return out


def _connect(client: zmq.Socket, server: zmq.Socket) -> None:
    """Probe until the broker routes client -> server, then let the probes drain."""
    deadline = time.monotonic() + 60
    while not server.poll(200):
        assert time.monotonic() < deadline, "the broker never forwarded a probe"
        client.send_multipart([b"", b"probe"])
    time.sleep(1.0)
    while server.poll(0):
        server.recv_multipart()


@pytest.mark.e2e
def test_broker_link_delays_each_message_by_size_over_rate_plus_latency_and_keeps_order(tmp_path):
    cfg = build_config(cli={"runs_dir": str(tmp_path / "runs"), "run_id": "link", "link_up": "4mbit",
                            "link_down": "20mbit", "link_latency_ms": 50}, env={})
    cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, **local_addresses()))
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    broker = start(tmp_path / "config.toml", "broker", 0, tmp_path, worker_env())
    ctx = zmq.Context()
    client = _dealer(ctx, cfg.net.broker_frontend)
    server = _dealer(ctx, cfg.net.broker_backend, SERVER_ROUTING_ID)
    try:
        _connect(client, server)
        sent_up = time.perf_counter()
        for i in range(N):
            client.send_multipart([b"", bytes([i]) * UP_BYTES])
        ups = _arrivals(server, N)
        sent_down = time.perf_counter()
        envelope = ups[0][1][:-1]  # [client routing id, b""]
        for i in range(N):
            server.send_multipart([*envelope, bytes([10 + i]) * DOWN_BYTES])
        downs = _arrivals(client, N)
    finally:
        stop_all([broker], grace_s=5)
        client.close()
        server.close()
        ctx.term()
    for k, (t, frames) in enumerate(ups):  # k + 1 messages had to cross the uplink first
        assert frames[-1] == bytes([k]) * UP_BYTES
        assert t - sent_up >= (k + 1) * UP_BYTES * 8 / UP_BIT_S + LATENCY_S
    for k, (t, frames) in enumerate(downs):
        assert frames == [b"", bytes([10 + k]) * DOWN_BYTES]
        assert t - sent_down >= (k + 1) * DOWN_BYTES * 8 / DOWN_BIT_S + LATENCY_S
    trace = [r for r in read_jsonl(tmp_path / "runs" / "link" / "broker-0.jsonl") if r["event"] == "link"]
    measured = [r for r in trace if r["bytes"] in (UP_BYTES, DOWN_BYTES)]
    assert [(r["dir"], r["bytes"]) for r in measured] == [("up", UP_BYTES)] * N + [("down", DOWN_BYTES)] * N
    assert all(r["out"] - r["in"] >= r["bytes"] * 8 / (UP_BIT_S if r["dir"] == "up" else DOWN_BIT_S) + LATENCY_S
               - 1e-6 for r in measured)


@pytest.mark.e2e
@pytest.mark.slow
def test_curve_run_through_the_emulated_link_trains_the_reference_adapters(tmp_path, e2e_cfg, reference_adapters):
    """CurveZMQ on and the link shaped: the broker shapes the plaintext lengths of every
    FORWARD and BACKWARD, and the result is the in-process trainer's, bit for bit."""
    from conftest import assert_same_adapters
    from lesft.cli.keys import generate_keys
    from workers.launch import launch

    generate_keys(tmp_path / "keys", 2)
    cfg = e2e_cfg(tmp_path, rounds=4, keys_dir=str(tmp_path / "keys"), link_up="4mbit", link_down="20mbit",
                  link_latency_ms=20)
    launch(cfg, timeout_s=300)
    run_dir = tmp_path / "runs" / "e2e"
    assert_same_adapters(run_dir, 2, reference_adapters(cfg))
    trace = [r for r in read_jsonl(run_dir / "broker-0.jsonl") if r["event"] == "link"]
    shaped = sorted((r["dir"], r["client"], r["round"]) for r in trace if r.get("type") in ("forward", "backward"))
    assert shaped == sorted((d, c, r) for d in ("down", "up") for c in (0, 1) for r in range(4))
