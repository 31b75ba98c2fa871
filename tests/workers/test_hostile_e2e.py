"""Hostile peers against a live plaintext run (two honest clients, every role on loopback).

Each attack of the independent attack run is repeated here while the honest clients
train: a stray TCP connection to the broker's backend (an HTTP request line, which libzmq
takes for a ZMTP/1.0 peer) and a forged BACKWARD from a backend peer that is not the
server; a message of 256 one-MiB frames and one of a million empty frames, to the
aggregator and through the broker; huge and countless PUB subscriptions; header bombs
aimed at starving a client so that its id can be taken over; far-future UPLOADs made with
an honest client's session. Through all of it the run must end as without it: every
worker exits 0 and the adapters equal the undisturbed reference bit for bit. Memory is
measured per hop (RSS of the broker, server and aggregator processes).
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time

import msgpack
import psutil
import pytest
import torch
import zmq

from conftest import assert_same_adapters
from lesft import wire
from lesft.engine import run_fingerprint
from lesft.models import source_for
from lesft.wire import ErrorCode, Message, MsgType

pytestmark = pytest.mark.e2e

# What a bomb may leave behind in a process it reached, once it has been read and dropped
# (libzmq assembles a whole multipart message before the application can read its first
# frame; what stays after the drop is allocator slack). Measured: a few MB.
RSS_BOUND_MB = 48


SUBSCRIBER = """
import os, sys, time, zmq
sub = zmq.Context().socket(zmq.SUB)
sub.connect(sys.argv[1])
if sys.argv[2] == "huge":
    sub.setsockopt(zmq.SUBSCRIBE, b"x" * 2**20)
else:
    for i in range(2000):
        sub.setsockopt(zmq.SUBSCRIBE, b"%04d" % i + b"y" * 1000)
time.sleep(3)
os._exit(0)
"""


def _rss(run, name: str) -> float:
    return psutil.Process(run.procs[name].popen.pid).memory_info().rss / 2**20


def _dealer(ctx: zmq.Context, address: str, routing_id: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 30_000)  # a peer gone: fail, never hang
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(address)
    return sock


def _header(run, t: MsgType, sender: int, round_: int, meta: dict, ts: list | None = None) -> bytes:
    return msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": t.value, "role": "client", "id": sender,
                          "run": run.cfg.run.run_id, "r": round_, "seq": 1, "m": meta, "ts": ts or []})


def _bombs(sock: zmq.Socket) -> None:
    """The two memory bombs of the attack run: 256 frames of ~1 MiB, a million empty frames."""
    sock.send_multipart([b"", b"\x80"] + [bytes(2**20 - 64)] * 256)
    sock.send_multipart([b""] + [b""] * 1_000_000)


def _insider(ctx: zmq.Context, cfg, address: str) -> zmq.Socket:
    """A socket as client 1 would open it: plaintext, or with client 1's CurveZMQ key (an
    insider, the only attacker that gets past the handshake)."""
    from workers.transport import make_socket

    sock = make_socket(ctx, zmq.DEALER, cfg, connect=address, identity="client-1")
    sock.setsockopt(zmq.SNDTIMEO, 30_000)  # a peer gone: fail, never hang
    return sock


@pytest.mark.parametrize("curve_on", [False, pytest.param(True, marks=pytest.mark.slow)],  # curve: make test-slow
                         ids=["plaintext", "curve"])
def test_hostile_peers_change_nothing(tmp_path, e2e_cfg, live_run, reference_adapters, curve_on):
    keys = ""
    if curve_on:
        from lesft.cli.keys import generate_keys

        generate_keys(tmp_path / "keys", 2)
        keys = str(tmp_path / "keys")
    cfg = e2e_cfg(tmp_path, rounds=300, run_id="hostile", keys_dir=keys)  # long enough to attack it
    ref = reference_adapters(cfg)
    run = live_run(cfg)
    net = run.cfg.net
    ctx = zmq.Context()
    try:
        # 1. a stray connection and a forged BACKWARD on the backend: the time of K rounds
        # before, during and after them (rounds counted, not seconds, so the run's speed
        # on this machine does not matter)
        def rounds_time(n_from: int, n_to: int, during=None) -> float:
            run.wait_rounds(n_from)
            t = time.monotonic()
            while len(run.server_rounds()) < n_to:
                run._check_alive()
                if during is not None:
                    during()
                time.sleep(0.05)
            return time.monotonic() - t

        run.wait_rounds(3)
        host, port = net.broker_backend.rsplit("//", 1)[1].rsplit(":", 1)
        stray = socket.create_connection((host, int(port)))
        stray.setblocking(False)
        forger = _dealer(ctx, net.broker_backend, routing_id=b"forger")
        squatter = _dealer(ctx, net.broker_backend, routing_id=b"lesft-server")  # the server's id is taken
        server = wire.Origin("server", 0, cfg.run.run_id)
        forged = wire.encode(wire.backward(server, 0, 1, loss_sum=4242.0, valid_rows=1))
        stray_got = [0]

        def attack() -> None:
            for sock in (forger, squatter):
                try:
                    sock.send_multipart([b"\x00\x80\x00\x00\x29", b""] + forged, zmq.NOBLOCK)
                except zmq.Again:  # with keys the handshake never completes: nothing can even be queued
                    pass
            try:
                stray_got[0] += len(stray.recv(1 << 16))
            except (BlockingIOError, socket.timeout, ConnectionError):  # under CurveZMQ the broker resets it
                pass

        K = 12
        before = rounds_time(3, 3 + K)
        stray.send(b"GET / HTTP/1.1\r\n\r\n")
        during = rounds_time(3 + K, 3 + 2 * K, attack)
        stray.close()
        after = rounds_time(3 + 2 * K, 3 + 3 * K)
        backend_got = 0
        for sock in (forger, squatter):
            while sock.poll(0):
                sock.recv_multipart()
                backend_got += 1
        assert stray_got[0] <= 64, f"a stray backend connection received {stray_got[0]} bytes of client traffic"
        assert backend_got == 0, "a backend peer that is not the server received client requests"
        assert during <= (before + after), (f"{K} rounds took {before:.1f}s before the stray connection, "
                                            f"{during:.1f}s with it, {after:.1f}s after")  # rate >= half

        # 2. memory bombs to the aggregator and through the broker (to the server)
        run.freeze()  # at round ~40 of 300: the honest clients hold still, so RSS moves only with the bombs
        time.sleep(1.0)
        names = ("broker-0", "server-0", "aggregator-0")
        before = {n: _rss(run, n) for n in names}
        for address in (net.aggregator_address, net.broker_frontend):
            sock = _insider(ctx, run.cfg, address)
            _bombs(sock)
            time.sleep(0.5)
            sock.close(linger=0)

        # 3. one huge subscription and many distinct ones, each from its own process (libzmq
        # frees a subscription trie recursively: a 1 MB topic would crash the process that
        # holds it, so these processes leave with os._exit)
        subscribers = [subprocess.Popen([sys.executable, "-c", SUBSCRIBER, net.aggregator_pub, kind])
                       for kind in ("huge", "many")]
        for p in subscribers:
            assert p.wait(timeout=60) == 0

        # 4. far-future uploads with client 1's key and session (a buggy or hostile client)
        session = torch.load(run.run_dir / "client-1-state.pt", map_location="cpu", weights_only=True)["session"]
        upl = _insider(ctx, run.cfg, net.aggregator_address)
        refused = 0
        for i in range(3000):
            msg = Message(MsgType.UPLOAD, "client", 1, cfg.run.run_id, 10**12 + i, i + 1,
                          {"session": session, "n_samples": 4}, {"w": torch.zeros(4096)})
            upl.send_multipart([b""] + wire.encode(msg))
        deadline = time.monotonic() + 60
        while refused < 3000 and time.monotonic() < deadline:
            if upl.poll(100):
                reply = wire.decode(upl.recv_multipart()[1:])
                refused += reply.type == MsgType.ERROR and reply.meta["code"] == ErrorCode.NOT_READY.value
        assert refused == 3000, f"{refused} of 3000 far-future uploads were refused as too far ahead"

        # 5. header bombs at the server to starve client 0, then a takeover HELLO for its id
        bomber = _insider(ctx, run.cfg, net.broker_frontend)
        for _ in range(80):
            bomber.send_multipart([b"", _header(run, MsgType.HEARTBEAT, 0, 0, {"k": [0] * 900_000})])
        run.thaw()
        time.sleep(3 * cfg.net.heartbeat_s)  # client 0 is heard again (it was frozen above)
        fingerprint, parts = run_fingerprint(run.cfg, source_for(run.cfg))
        hello = dict(client_id=0, n_samples=4, fingerprint=fingerprint, session=secrets.token_hex(16), parts=parts)
        bomber.send_multipart([b"", _header(run, MsgType.HELLO, 0, -1, hello)])
        codes = []
        deadline = time.monotonic() + 30
        while not any(c != ErrorCode.TOO_LARGE.value for c in codes) and time.monotonic() < deadline:
            if bomber.poll(100):
                codes.append(wire.decode(bomber.recv_multipart()[1:]).meta.get("code"))
        # no takeover of a live id; with keys, client 1's key never speaks for client 0 at all
        want = ErrorCode.UNAUTHORISED if curve_on else ErrorCode.DUPLICATE_CLIENT
        assert codes and codes[-1] == want.value, codes

        time.sleep(2.0)
        after = {n: _rss(run, n) for n in names}
        growth = {n: round(after[n] - before[n], 1) for n in names}
        assert all(g <= RSS_BOUND_MB for g in growth.values()), f"RSS growth per hop (MB): {growth}"

        statuses = run.wait_done(timeout=300)
        assert all(code == 0 for code in statuses.values() if code is not None), statuses
        for name in ("client-0", "client-1"):
            assert "4242" not in run.log(name), f"{name} took a forged BACKWARD"
        broker_proc = run.procs["broker-0"].popen
        broker_proc.terminate()  # the broker writes its final record on SIGTERM
        assert broker_proc.wait(timeout=30) == 0
        broker = run.final("broker-0")["counters"]
        # both bombs dropped by the broker; under CurveZMQ the frame cap may end the sender's
        # connection first (each encrypted 1 MiB frame is a little larger): then one is counted
        assert broker.get("dropped.too_large.to_server", 0) >= (1 if curve_on else 2), broker
        agg = run.final("aggregator-0")["counters"]
        if not curve_on:  # with keys, the forger and the subscribers never get past the handshake
            assert broker.get("dropped.not_server", 0) > 0, broker
            assert agg.get("rejected.subscription", 0) > 0, agg
        assert_same_adapters(run.run_dir, 2, ref)
    finally:
        ctx.destroy(linger=0)
