"""Transport security: key files, the plaintext rule, CurveZMQ identities, and what an
eavesdropper on the wire sees (design §3; docs/security.md)."""

from __future__ import annotations

import dataclasses
import os
import select
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from typer.testing import CliRunner

from lesft import wire
from lesft.config import Config, ConfigError, build_config
from lesft.metrics import Meter
from lesft.wire import ErrorCode, Message, MsgType, WireError
from workers import curve, security
from workers.frames import frame_user_id
from workers.transport import SERVER_ROUTING_ID, Channel, make_socket


def tiny_cfg(tmp_path: Path, **over) -> Config:
    cli = dict(model="arch:tiny-qwen2", runs_dir=str(tmp_path / "runs"), run_id="x", rounds=4, clients=2,
               samples_per_client=4, max_length=64, microbatch_wait_ms=60000)
    cli.update(over)
    return build_config(cli=cli, env={})


@pytest.fixture()
def keys(tmp_path) -> Path:
    from lesft.cli.keys import generate_keys

    out = tmp_path / "keys"
    generate_keys(out, 2)
    return out


@pytest.fixture()
def ctx():
    context = zmq.Context()
    yield context
    curve.stop_authenticator(context)
    context.destroy(linger=0)


# ----------------------------------------------------------------------------- keys


def test_keys_generate_layout_modes_and_allow_list(tmp_path):
    from lesft.cli import app

    out = tmp_path / "k"
    result = CliRunner().invoke(app, ["keys", "generate", "--out", str(out), "--clients", "3"])
    assert result.exit_code == 0, result.output
    for name in ("server", "broker", "aggregator", *(f"clients/client-{i}" for i in range(3))):
        public, secret = out / f"{name}.key", out / f"{name}.key_secret"
        assert stat.S_IMODE(public.stat().st_mode) == 0o644
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        pub, sec = zmq.auth.load_certificate(secret)
        assert zmq.auth.load_certificate(public) == (pub, None) and len(sec) == 40
    assert stat.S_IMODE((out / "clients").stat().st_mode) == 0o700
    allowed = sorted(p.name for p in (out / "allowed_clients").iterdir())
    assert allowed == ["client-0.key", "client-1.key", "client-2.key"]
    assert (out / "allowed_clients/client-2.key").read_bytes() == (out / "clients/client-2.key").read_bytes()
    assert "broker.key_secret" in result.output and "client-<i>.key_secret" in result.output

    again = CliRunner().invoke(app, ["keys", "generate", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output and len(again.output.strip().splitlines()) <= 2
    old = (out / "server.key").read_bytes()
    forced = CliRunner().invoke(app, ["keys", "generate", "--out", str(out), "--clients", "1", "--force"])
    assert forced.exit_code == 0 and (out / "server.key").read_bytes() != old
    assert sorted(p.name for p in (out / "allowed_clients").iterdir()) == ["client-0.key"]


def test_missing_key_file_is_one_clear_line(tmp_path, ctx):
    cfg = tiny_cfg(tmp_path, keys_dir=str(tmp_path / "nokeys"))
    with pytest.raises(ConfigError) as e:
        make_socket(ctx, zmq.ROUTER, cfg, bind=cfg.net.broker_frontend)
    text = str(e.value)
    assert "broker.key_secret" in text and "lesft keys generate" in text and "\n" not in text


# ----------------------------------------------------------------------------- plaintext rule


@pytest.mark.parametrize("address, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.8.9.1:5555", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/x.sock", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.1.2.3:5555", False),
    ("tcp://[2001:db8::1]:5555", False), ("tcp://no-such-host.invalid:5555", False),
])
def test_is_loopback(address, local):
    assert security.is_loopback(address) is local


def test_plaintext_off_loopback_needs_insecure(tmp_path, ctx):
    from workers.launch import free_ports

    address = f"tcp://0.0.0.0:{free_ports(1)[0]}"
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(ConfigError) as e:
        make_socket(ctx, zmq.ROUTER, cfg, bind=address)
    assert "--insecure" in str(e.value) and address in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        make_socket(ctx, zmq.DEALER, cfg, connect="tcp://10.1.2.3:5555")
    insecure = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, insecure=True))
    make_socket(ctx, zmq.ROUTER, insecure, bind=address).close()
    make_socket(ctx, zmq.ROUTER, cfg, bind=f"tcp://127.0.0.1:{free_ports(1)[0]}").close()  # loopback: fine


# ----------------------------------------------------------------------------- identities


def _keyed(tmp_path: Path, keys: Path) -> Config:
    from workers.launch import local_addresses

    cfg = tiny_cfg(tmp_path, keys_dir=str(keys))
    return dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, **local_addresses()))


def _curve_socket(ctx, cfg, kind, identity, *, bind=None, connect=None):
    sock = ctx.socket(kind)
    sock.linger = 0
    curve.apply(sock, cfg, serving=bind is not None, address=bind or connect, identity=identity)
    if bind:
        sock.bind(bind)
    else:
        sock.connect(connect)
    return sock


def test_aggregator_side_identity_is_the_key_not_the_claim(tmp_path, keys, ctx):
    cfg = _keyed(tmp_path, keys)
    router = _curve_socket(ctx, cfg, zmq.ROUTER, "aggregator", bind=cfg.net.aggregator_address)
    dealer = _curve_socket(ctx, cfg, zmq.DEALER, "client-0", connect=cfg.net.aggregator_address)
    dealer.send_multipart([b"", b"body"])
    assert router.poll(5000)
    envelope, body = wire.split_envelope(router.recv_multipart(copy=False))
    assert frame_user_id(envelope[0]) == "client-0"
    security.authorise(envelope, 0, cfg)
    with pytest.raises(WireError) as e:
        security.authorise(envelope, 1, cfg)
    assert e.value.code == ErrorCode.UNAUTHORISED and "client-0" in str(e.value)

    # a stamp the client forged itself counts for nothing where the key is known directly
    dealer.send_multipart([b"lesft-user:client-1", b"", b"body"])
    assert router.poll(5000)
    envelope, _ = wire.split_envelope(router.recv_multipart(copy=False))
    with pytest.raises(WireError):
        security.authorise(envelope, 1, cfg)


def test_broker_stamp_replaces_forgeries_and_never_reaches_the_client(tmp_path, keys):
    rid = b"\x00abcd"
    forged = [rid, b"lesft-user:client-1", b"", b"header", b"lesft-user:client-1 (a tensor)"]
    to_server = wire.stamp(forged, "client-0")
    assert to_server == [rid, b"lesft-user:client-0", b"", b"header", b"lesft-user:client-1 (a tensor)"]
    cfg = tiny_cfg(tmp_path, keys_dir=str(keys))
    envelope, _ = wire.split_envelope(to_server)  # what the server's DEALER sees
    security.authorise(envelope, 0, cfg)
    with pytest.raises(WireError) as e:
        security.authorise(envelope, 1, cfg)
    assert e.value.code == ErrorCode.UNAUTHORISED
    with pytest.raises(WireError):  # no stamp at all: not through a CurveZMQ broker
        security.authorise([rid, b""], 0, cfg)
    reply = wire.strip_stamps(to_server, 1)
    assert reply == [rid, b"", b"header", b"lesft-user:client-1 (a tensor)"]
    assert wire.stamp(forged, None)[:3] == [rid, b"", b"header"]  # plaintext: forgeries still dropped


def test_key_outside_the_allow_list_is_refused(tmp_path, keys, ctx):
    cfg = _keyed(tmp_path, keys)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    zmq.auth.create_certificates(stranger, "client-1")
    shutil.copy(keys / "aggregator.key", stranger)
    router = _curve_socket(ctx, cfg, zmq.ROUTER, "aggregator", bind=cfg.net.aggregator_address)
    other = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, keys_dir=str(stranger)))
    curve._refusals.clear()
    try:
        dealer = _curve_socket(ctx, other, zmq.DEALER, "client-1", connect=cfg.net.aggregator_address)
        dealer.send_multipart([b"", b"body"])
        deadline = time.monotonic() + 10
        while curve.refusal() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not router.poll(200)
        assert "refused the CurveZMQ key of client-1" in (curve.refusal() or "")
        assert "allowed_clients" in curve.refusal()
    finally:
        curve._refusals.clear()

    # revocation: remove client-0 from the allow-list, and its next handshake fails
    (keys / "allowed_clients/client-0.key").unlink()
    dealer0 = _curve_socket(ctx, cfg, zmq.DEALER, "client-0", connect=cfg.net.aggregator_address)
    dealer0.send_multipart([b"", b"body"])
    assert not router.poll(1500)
    curve._refusals.clear()


def test_stale_server_key_warns_and_is_not_a_refusal(tmp_path, keys, ctx, caplog):
    cfg = _keyed(tmp_path, keys)
    router = _curve_socket(ctx, cfg, zmq.ROUTER, "aggregator", bind=cfg.net.aggregator_address)
    stale = tmp_path / "stale"
    shutil.copytree(keys, stale)
    zmq.auth.create_certificates(stale, "aggregator")  # the client now holds another aggregator key
    other = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, keys_dir=str(stale)))
    curve._refusals.clear()
    dealer = _curve_socket(ctx, other, zmq.DEALER, "client-0", connect=cfg.net.aggregator_address)
    dealer.send_multipart([b"", b"body"])
    deadline = time.monotonic() + 10
    while "handshake with the aggregator" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "aggregator.key" in caplog.text and curve.refusal() is None
    assert not router.poll(100)


# ----------------------------------------------------------------------------- multi-process


def _intruder_dir(tmp_path: Path, keys: Path, name: str, secret_from: Path | None) -> Path:
    """A keys folder for a client 1 that is not allowed (new key) or borrows client 0's key."""
    folder = tmp_path / name
    (folder / "clients").mkdir(parents=True)
    for public in ("broker.key", "aggregator.key"):
        shutil.copy(keys / public, folder)
    if secret_from is None:
        zmq.auth.create_certificates(folder / "clients", "client-1")
    else:
        shutil.copy(secret_from, folder / "clients/client-1.key_secret")
    return folder


@pytest.mark.e2e
def test_curve_run_trains_and_refuses_strangers_and_impostors(tmp_path, keys):
    from workers.launch import launch, start, stop_all, worker_env

    stranger = _intruder_dir(tmp_path, keys, "stranger", None)
    impostor = _intruder_dir(tmp_path, keys, "impostor", keys / "clients/client-0.key_secret")
    cfg = tiny_cfg(tmp_path, keys_dir=str(keys))
    intruders: dict[str, object] = {}
    log_dir = tmp_path / "intruders"
    log_dir.mkdir()

    def on_poll(run_dir: Path, procs) -> None:
        if intruders:
            return
        for name, folder in (("stranger", stranger), ("impostor", impostor)):
            (log_dir / name).mkdir()
            intruders[name] = start(run_dir / "config.toml", "client", 1, log_dir / name, worker_env(),
                                    ["--keys-dir", str(folder), "--request-timeout-s", "5", "--retries", "2",
                                     "--threads", "1"])

    try:
        result = launch(cfg, timeout_s=150, on_poll=on_poll)
        deadline = time.monotonic() + 60
        while any(p.popen.poll() is None for p in intruders.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop_all(list(intruders.values()))
    assert all(code == 0 for code in result.returncodes.values()), result.returncodes
    server_log = result.logs["server-0"].read_text()
    assert "round 4/4" in server_log and "run complete" in server_log

    stranger_proc, impostor_proc = intruders["stranger"], intruders["impostor"]
    assert stranger_proc.popen.returncode not in (0, None)
    assert "refused the CurveZMQ key of client-1" in stranger_proc.tail(30)
    assert "refused a CurveZMQ key not in" in result.logs["broker-0"].read_text()
    assert impostor_proc.popen.returncode not in (0, None)
    assert "unauthorised" in impostor_proc.tail(5) and "client-0" in impostor_proc.tail(5)
    assert "unauthorised" in server_log and "client-1" in server_log


class Tap:
    """A TCP relay that records every byte a client sends to the broker (the eavesdropper)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()

    def _pump(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            conn.close()
            return
        pairs = {conn: up, up: conn}
        while not self.closed.is_set():
            ready, _, _ = select.select(list(pairs), [], [], 0.2)
            for src in ready:
                data = src.recv(1 << 16)
                if not data:
                    conn.close()
                    up.close()
                    return
                if src is conn:
                    self.sent += data
                pairs[src].sendall(data)
        conn.close()
        up.close()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


class FakeServerRun:
    """A broker and one real client process (method "sl"), with the test as the server:
    it welcomes the client and keeps the FORWARD it receives, through a tapped link."""

    def __init__(self, tmp_path: Path, name: str, keys_dir: str) -> None:
        from workers.launch import local_addresses, start, worker_env

        cfg = tiny_cfg(tmp_path, run_id=name, clients=1, rounds=1, method="sl", keys_dir=keys_dir)
        self.cfg = cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, **local_addresses()))
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.toml").write_text(cfg.to_toml())
        self.tap = Tap(int(cfg.net.broker_frontend.rsplit(":", 1)[1]))
        env = worker_env()
        self.procs = [start(folder / "config.toml", "broker", 0, folder, env),
                      start(folder / "config.toml", "client", 0, folder, env,
                            ["--broker-frontend", f"tcp://127.0.0.1:{self.tap.port}", "--threads", "1"])]
        self.ctx = zmq.Context()
        sock = make_socket(self.ctx, zmq.DEALER, cfg, connect=cfg.net.broker_backend, identity="server",
                           routing_id=SERVER_ROUTING_ID)
        self.chan = Channel(sock, Meter("server", 0), routed=True)
        self.forward: Message | None = None

    def step(self) -> None:
        if self.forward is not None or not self.chan.sock.poll(0):
            return
        inbound = self.chan.recv()
        msg = inbound.msg
        assert msg is not None, inbound.error
        if msg.type == MsgType.HELLO:
            security.authorise(inbound.envelope, msg.sender, self.cfg)
            self.chan.send(Message(MsgType.WELCOME, "server", 0, self.cfg.run.run_id, -1, msg.seq,
                                   {"rounds": 1, "round": 0, "clients": 1}), inbound.envelope)
        elif msg.type == MsgType.FORWARD:
            self.forward = msg

    def close(self) -> None:
        from workers.launch import stop_all

        stop_all(self.procs, grace_s=3)
        self.chan.close()
        curve.stop_authenticator(self.ctx)
        self.ctx.destroy(linger=0)
        self.tap.close()


@pytest.mark.e2e
def test_eavesdropper_sees_activations_in_plaintext_but_not_under_curve(tmp_path, keys):
    """Run A: plaintext (the control); run B: CurveZMQ. In each, the bytes of the
    activation the real client sent (as the server received them) are searched for in
    what the tap recorded between the client and the broker."""
    runs = {"plain": FakeServerRun(tmp_path, "plain", ""), "curve": FakeServerRun(tmp_path, "curve", str(keys))}
    try:
        deadline = time.monotonic() + 90
        while any(r.forward is None for r in runs.values()) and time.monotonic() < deadline:
            for r in runs.values():
                r.step()
                for p in r.procs:
                    assert p.popen.poll() is None, f"{p.name} ended early:\n{p.tail()}"
            time.sleep(0.01)
        assert all(r.forward is not None for r in runs.values()), "no FORWARD reached the (fake) server"
        time.sleep(0.5)
        found = {}
        for name, r in runs.items():
            act = r.forward.tensors["act"]
            assert act.dtype.is_floating_point and act.numel() * act.element_size() >= 1024
            raw = act.contiguous().numpy().tobytes()
            piece = raw[len(raw) // 2: len(raw) // 2 + 64]
            capture = bytes(r.tap.sent)
            assert len(capture) > len(raw)  # the whole FORWARD went through the tap
            found[name] = (piece in capture, b"forward" in capture, b"act" in capture)
    finally:
        for r in runs.values():
            r.close()
    assert found["plain"] == (True, True, True)
    assert found["curve"] == (False, False, False)


@pytest.mark.parametrize("curve_on", [True, False])
def test_squat_and_takeover_of_a_client_id(tmp_path, keys, curve_on):
    """With CurveZMQ an id is bound to its key: a HELLO for client 0 sent with client 1's key
    is refused whether client 0 has not registered yet (squat) or has gone silent past the
    takeover window (takeover). Without keys nothing binds an id (docs/security.md): the
    first session holds it, and a new one takes it only after that silence."""
    from workers.common import Sessions, Worker

    cfg = tiny_cfg(tmp_path, keys_dir=str(keys) if curve_on else "")
    worker = Worker(cfg, -1)
    sessions = Sessions(takeover_after=0.2)
    admit = worker.admission({MsgType.HELLO: None, MsgType.FORWARD: None}, sessions)
    stamped = [b"\x00\x01", wire.USER_PREFIX + b"client-1", b""]  # what the broker puts on client 1's messages

    def hello(session: str) -> Message:
        return Message(MsgType.HELLO, "client", 0, "x", -1, 1, {"client_id": 0, "session": session})

    def refused(msg: Message) -> None:
        with pytest.raises(WireError) as e:
            admit(stamped, msg)
        assert e.value.code == ErrorCode.UNAUTHORISED

    squat = hello("a" * 32)
    if curve_on:
        refused(squat)
    else:
        admit(stamped, squat)  # plaintext: the stamp is not checked, the first HELLO may register
    sessions.register(0, "b" * 32)  # the real client 0 registers, then falls silent
    time.sleep(0.3)
    takeover = hello("c" * 32)
    if curve_on:
        refused(takeover)
    else:
        admit(stamped, takeover)
        sessions.register(0, "c" * 32)  # silent past the window: the new session takes the id
        refused(Message(MsgType.FORWARD, "client", 0, "x", 0, 2, {"session": "b" * 32}))  # the old session can no longer speak for it
