"""What every worker process shares: sockets with accounting, validated receive, the
request-with-retry of the Lazy Pirate pattern, clean shutdown on SIGTERM, run folders.

All message bytes go through :mod:`lesft.wire`; nothing here builds frames by hand.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import zmq

from lesft import wire
from lesft.config import Config
from lesft.metrics import JsonlWriter, Meter
from lesft.rounds import Refused
from lesft.wire import ErrorCode, Message, MsgType, WireError
from workers import security


class WorkerError(RuntimeError):
    """A condition that ends a worker with one clear line (a peer that never answers, ...)."""


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(level=os.environ.get("LESFT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    return logging.getLogger(name)


def stop_event() -> threading.Event:
    """Set on SIGTERM/SIGINT: loops finish their step, write their files and exit 0."""
    ev = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        ev.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return ev


def die_with_parent() -> None:
    """A worker started by the launcher (``LESFT_PARENT_PID``) stops when the launcher dies,
    even by SIGKILL: Linux sends it SIGTERM (PR_SET_PDEATHSIG); elsewhere a thread notices
    the new parent. SIGTERM then ends it cleanly (see :func:`stop_event`)."""
    parent = os.environ.get("LESFT_PARENT_PID")
    if not parent or not parent.isdigit():
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
                if os.getppid() != int(parent):  # died before prctl took effect
                    os.kill(os.getpid(), signal.SIGTERM)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_dir_for(cfg: Config, existing: str = "any") -> Path:
    """Workers must agree on the folder: the run id defaults to "default" (not a timestamp).

    The worker entry point (``workers.main``) checks it first with ``existing="join"``: a
    worker refuses a finished run's folder unless told ``--resume`` or ``--overwrite``.
    """
    from lesft.trainer import open_run_dir

    return open_run_dir(cfg, existing, default_id="default")


def set_threads(cfg: Config) -> None:
    if cfg.train.threads > 0:
        import torch

        torch.set_num_threads(cfg.train.threads)


def make_socket(ctx: zmq.Context, kind: int, cfg: Config, *, bind: str | None = None,
                connect: str | None = None, server_key: bytes | None = None,
                identity: str | None = None, routing_id: bytes | None = None,
                max_frame_bytes: int | None = None) -> zmq.Socket:
    """A socket with the project's options: no linger, a frame size cap, CURVE when set up.

    ``identity`` names the CurveZMQ key pair ("broker", "server", "aggregator", "client-<i>");
    ``routing_id`` is the ZeroMQ routing id a connecting socket announces.
    """
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes or cfg.net.max_message_mb * 2**20)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    address = bind or connect
    security.configure(sock, cfg, address=address, serving=bind is not None, server_key=server_key,
                       identity=identity)
    if bind:
        sock.bind(bind)
    if connect:
        sock.connect(connect)
    return sock


def frames_bytes(frames: Sequence) -> int:
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


# The broker routes requests to the server by this routing id and takes replies only from it.
SERVER_ROUTING_ID = b"lesft-server"
ENVELOPE_FRAMES = 8  # routing frames a message may carry before its body (ids, stamp, delimiter)


class Oversized(Exception):
    """A message passed the frame-count or byte ceiling; it was read and thrown away."""

    def __init__(self, frames: int, nbytes: int) -> None:
        self.frames, self.nbytes = frames, nbytes
        super().__init__(f"message dropped after {frames} frames / {nbytes} bytes")


def recv_bounded(sock: zmq.Socket, max_frames: int, max_bytes: int, flags: int = 0) -> list:
    """Receive one multipart message frame by frame; past ``max_frames`` frames or
    ``max_bytes`` bytes, keep nothing more, read the rest away and raise :class:`Oversized`.

    ``recv_multipart`` would first hold every frame as a Python object (a million empty
    frames cost ~280 MB); here each dropped frame is freed as soon as it is read. libzmq
    itself delivers a multipart message only once its last frame has arrived and caps single
    frames (ZMQ_MAXMSGSIZE), not messages; that copy is freed as the frames are read.
    """
    if _trim["due"]:
        _give_back_memory()
    frames = [sock.recv(flags, copy=False)]
    n, count = len(frames[0]), 1
    over = n > max_bytes
    while sock.getsockopt(zmq.RCVMORE):
        f = sock.recv(0, copy=False)
        count += 1
        if not over:
            n += len(f)
            over = count > max_frames or n > max_bytes
            if over:
                frames = []
            else:
                frames.append(f)
    if over:
        _give_back_memory()
        raise Oversized(count, n)
    return frames


_trim = {"last": 0.0, "due": False}


def _give_back_memory() -> None:
    """Return freed heap pages to the OS after a dropped or refused message (glibc keeps
    them otherwise, so a flood of bombs would leave the process hundreds of MB larger): at
    most once a second; one asked for sooner runs on a later receive."""
    now = time.monotonic()
    if now - _trim["last"] < 1.0:
        _trim["due"] = True
        return
    _trim["last"], _trim["due"] = now, False
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Inbound:
    """One received message with the envelope to answer it on (empty for DEALER/SUB).

    With ``error`` set, ``msg`` is None, or the header-only message a receiver's ``admit``
    check refused (so the refusal answers its round and seq). ``admitted``: the receiver's
    checks have run (see :meth:`Worker.admission`)."""

    envelope: list
    msg: Message | None
    error: WireError | None = None
    nbytes: int = 0
    admitted: bool = False


class Channel:
    """A socket plus accounting: every send and receive is counted in the worker's Meter."""

    def __init__(self, sock: zmq.Socket, meter: Meter, *, routed: bool, limits: wire.Limits | None = None,
                 topic: bool = False, prefix: str = "",
                 admit: Callable[[list, Message], None] | None = None, drop_on_full: bool = False) -> None:
        self.sock, self.meter, self.routed, self.topic = sock, meter, routed, topic
        self.drop_on_full = drop_on_full  # a send that times out is counted and dropped, not raised
        self.limits = limits or wire.Limits()
        self.prefix = prefix  # counts this channel's traffic apart, e.g. "agg." for the aggregator
        self.admit = admit  # the receiver's cheap checks, run before any tensor is decoded

    def send(self, msg: Message, envelope: Sequence = (), float_dtype: str | None = None) -> int:
        frames = wire.encode(msg, float_dtype)
        head = list(envelope) if self.routed else [b""]
        if self.topic:
            head = [msg.type.value.encode()]
        out = head + frames
        try:
            self.sock.send_multipart(out, copy=False)
        except zmq.Again:  # a socket with a send timeout whose peer is gone: the peer will ask again
            if not self.drop_on_full:
                raise
            self.meter.count(f"dropped.send.{msg.type.value}")
            return 0
        n = frames_bytes(frames)
        self.meter.sent(self.prefix + msg.type.value, n)
        return n

    def recv(self) -> Inbound:
        """Receive one message now (the caller polled); a bad one comes back with ``error`` set.

        The message is read frame by frame within the limits (a bigger one is dropped as it
        is read, see :func:`recv_bounded`), then its header is checked, then ``admit``, and
        only then are its tensors decoded."""
        lim = self.limits
        try:
            frames = recv_bounded(self.sock, lim.max_frames + ENVELOPE_FRAMES,
                                  lim.max_total_bytes + lim.max_header_bytes + 4096)
        except Oversized as e:
            self.meter.received(self.prefix + "invalid", e.nbytes)
            self.meter.count(f"rejected.{wire.ErrorCode.TOO_LARGE.value}")
            return Inbound([], None, WireError(wire.ErrorCode.TOO_LARGE, str(e)), e.nbytes)
        n = frames_bytes(frames)
        envelope: list = []
        try:
            if self.topic:  # the topic frame is routing, not message: the sender does not count it either
                envelope, body = frames[:1], frames[1:]
            else:
                envelope, body = wire.split_envelope(frames)
            admit = None if self.admit is None else (lambda m: self.admit(envelope, m))
            msg = wire.decode(body, lim, admit)
        except WireError as e:
            self.meter.received(self.prefix + "invalid", n)
            self.meter.count(f"rejected.{e.code.value}")
            return Inbound(envelope if self.routed else [], getattr(e, "msg", None), e, n)
        self.meter.received(self.prefix + msg.type.value, n - frames_bytes(envelope))
        return Inbound(envelope, msg, None, n, admitted=self.admit is not None)

    def close(self) -> None:
        self.sock.close(linger=0)


def as_wire_error(e: WireError | Refused) -> WireError:
    """A refusal of the round engine (:mod:`lesft.rounds`) as the wire error the peer gets."""
    if isinstance(e, WireError):
        return e
    err = WireError(ErrorCode(e.code), e.text)
    err.meta = dict(e.meta)
    return err


def reply_error(chan: Channel, inbound: Inbound, err: WireError, role: str, sender: int, run_id: str,
                log: logging.Logger) -> None:
    """Answer a bad message with ERROR where it can be routed, else log the drop."""
    _give_back_memory()
    msg = inbound.msg
    log.warning("rejected %s from %s: %s", msg.type.value if msg else "message",
                f"{msg.role}-{msg.sender}" if msg else "unknown peer", err)
    if inbound.envelope or not chan.routed:
        reply = wire.error_message(err.code, err.text, role=role, sender=sender, run_id=run_id,
                                   round=msg.round if msg else -1, seq=msg.seq if msg else 0)
        reply.meta.update(getattr(err, "meta", {}))
        try:
            chan.send(reply, inbound.envelope)
        except zmq.ZMQError:
            pass


@dataclass
class Peer:
    """A request/reply partner reached through a DEALER that can be rebuilt (Lazy Pirate)."""

    name: str
    factory: Callable[[], zmq.Socket]
    meter: Meter
    limits: wire.Limits = field(default_factory=wire.Limits)
    prefix: str = ""
    chan: Channel | None = None
    last_heard: float = field(default_factory=time.monotonic)
    address: str = ""  # where it is reached, for messages

    @property
    def where(self) -> str:
        return f"the {self.name} at {self.address}" if self.address else f"the {self.name}"

    def channel(self) -> Channel:
        if self.chan is None:
            self.chan = Channel(self.factory(), self.meter, routed=False, limits=self.limits, prefix=self.prefix)
        return self.chan

    def reset(self) -> None:
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        self.meter.count(f"reconnects.{self.name}")

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()
            self.chan = None


def describe(msg: Message) -> str:
    """What a request asks for, in the user's words (for waiting notes and errors)."""
    r = msg.round
    return {MsgType.HELLO: "the registration", MsgType.FORWARD: f"the gradients of round {r}",
            MsgType.UPLOAD: f"the adapter upload of round {r}", MsgType.FETCH: f"the global adapters of round {r}"
            if r >= 0 else "the latest global adapters", MsgType.BYE: "the end of the run"}.get(
        msg.type, f"a {msg.type.value} reply" + (f" of round {r}" if r >= 0 else ""))


NOTE_EVERY_S = 10.0  # how often a waiting process says what it waits for


def request(peer: Peer, msg: Message, expect: set[MsgType], *, cfg: Config, stop: threading.Event,
            log: logging.Logger, float_dtype: str | None = None, what: str = "",
            on_other: Callable[[Message], None] | None = None,
            retry_errors: frozenset = frozenset({ErrorCode.NOT_READY}), patience_s: float | None = None,
            patience_flag: str = "--register-timeout-s") -> Message:
    """Send ``msg`` and wait for a matching reply (same round and seq) of an expected type.

    While waiting it sends HEARTBEATs; any message from the peer counts as a sign of
    life. After ``request_timeout_s`` of silence the socket is rebuilt and the request
    sent again, up to ``retries`` times. An ERROR reply raises :class:`WireError`, except
    the retryable ones (NOT_READY), which are asked again after a pause. With
    ``patience_s`` the whole wait (answers included) ends after that long with a
    :class:`WorkerError` naming ``patience_flag``. Every ``NOTE_EVERY_S`` of waiting it
    logs what it waits for.
    """
    what = what or describe(msg)
    tries = 0
    started = next_note = time.monotonic()
    next_note += NOTE_EVERY_S
    while True:
        chan = peer.channel()
        chan.send(msg, float_dtype=float_dtype)
        sent_at = peer.last_heard = time.monotonic()
        next_beat = sent_at + min(cfg.net.heartbeat_s, 1.0)
        while True:
            if stop.is_set():
                raise WorkerError(f"stopped while waiting for {peer.where} ({what})")
            if chan.sock.poll(100):
                inbound = chan.recv()
                peer.last_heard = time.monotonic()
                got = inbound.msg
                if got is None:
                    log.warning("dropped a malformed reply from %s: %s", peer.name, inbound.error)
                    continue
                if got.type == MsgType.HEARTBEAT:
                    if (got.round, got.seq) == (msg.round, msg.seq) and got.meta.get("have") is False:
                        peer.meter.count(f"resent.{peer.name}")
                        break  # the peer does not hold our request: send it again
                    continue
                if got.round != msg.round or got.seq != msg.seq:
                    if on_other is not None:
                        on_other(got)
                    else:
                        peer.meter.count("stale_replies")
                    continue
                if got.type == MsgType.ERROR:
                    try:
                        wire.raise_if_error(got)
                    except WireError as e:
                        err = e
                    err.meta = got.meta
                    if err.code in retry_errors:
                        time.sleep(min(cfg.net.heartbeat_s, 1.0))
                        break  # ask again, not counted as a retry
                    raise err
                if got.type in expect:
                    return got
                peer.meter.count("unexpected_replies")
                continue
            now = time.monotonic()
            if now >= next_note:
                next_note = now + NOTE_EVERY_S
                heard = now - peer.last_heard
                log.info("waiting for %s (%s) for %.0f s%s%s", peer.where, what, now - started,
                         f"; no sign of it for {heard:.0f} s: is it running?" if heard > 2 * cfg.net.heartbeat_s
                         else "; it is up", f" (giving up after {patience_s:.0f} s, {patience_flag})"
                         if patience_s else "")
            if patience_s is not None and now - started > patience_s:
                raise WorkerError(f"{peer.where} did not answer {what} within {patience_s:.0f} s ({patience_flag}): "
                                  "is it running, with the same --run-id and addresses?")
            if now >= next_beat:
                session = {"session": msg.meta["session"]} if "session" in msg.meta else {}
                chan.send(Message(MsgType.HEARTBEAT, msg.role, msg.sender, msg.run_id, msg.round, msg.seq, session))
                next_beat = now + cfg.net.heartbeat_s
            if now - peer.last_heard > cfg.net.request_timeout_s:
                tries += 1
                if tries > cfg.net.retries:
                    raise WorkerError(f"{peer.where} did not answer {what} after {tries} tries of "
                                      f"{cfg.net.request_timeout_s:.0f}s: is it running and reachable?")
                log.warning("no answer from %s for %s in %.0fs: reconnecting (try %d/%d)", peer.where, what,
                            cfg.net.request_timeout_s, tries, cfg.net.retries)
                peer.reset()
                break


def check_fingerprint(msg: Message, fingerprint: str, parts: dict) -> None:
    """Refuse a HELLO whose model, split point, LoRA config or method differs, naming what differs."""
    if msg.meta["fingerprint"] != fingerprint:
        theirs = msg.meta.get("parts", {})
        theirs = theirs if isinstance(theirs, dict) else {}
        diff = [f"{k}: client {theirs.get(k)!r} vs {v!r} here" for k, v in parts.items()
                if theirs.get(k) != v] or ["base model config"]
        raise WireError(ErrorCode.FINGERPRINT_MISMATCH, f"model mismatch ({'; '.join(diff)}): "
                                                        "start every party with the same settings")


class Sessions:
    """Which process speaks for each client id: the random session id of its HELLO.

    Every later message of that client carries the session; one that does not is refused
    (another process using the id, a replay, a fuzzer). A new session takes an id over
    only when the old one has been silent for ``takeover_after`` seconds (a client that
    restarted without its state file); a restarted client normally reuses its saved one.
    """

    def __init__(self, takeover_after: float) -> None:
        self.takeover_after = takeover_after
        self.owner: dict[int, str] = {}
        self.seen: dict[int, float] = {}

    def register(self, cid: int, session: object, log: logging.Logger | None = None) -> None:
        if not isinstance(session, str) or not 8 <= len(session) <= 128:
            raise WireError(ErrorCode.BAD_FIELD, "meta session must be a string of 8..128 characters")
        old = self.owner.get(cid)
        now = time.monotonic()
        if old is not None and old != session:
            silent = now - self.seen.get(cid, 0.0)
            if silent < self.takeover_after:
                raise WireError(ErrorCode.DUPLICATE_CLIENT,
                                f"client {cid} is registered by another live process (heard {silent:.0f}s ago): "
                                "give each client its own --id")
            if log is not None:
                log.info("client %d re-registered with a new session (old one silent for %.0fs)", cid, silent)
        self.owner[cid], self.seen[cid] = session, now

    def check(self, msg: Message) -> None:
        cid = msg.sender
        if cid not in self.owner:
            raise WireError(ErrorCode.UNKNOWN_CLIENT, f"client {cid} is not registered: send HELLO first")
        if msg.meta.get("session") != self.owner[cid]:
            raise WireError(ErrorCode.UNAUTHORISED, f"message for client {cid} does not carry its session: "
                                                    "another process uses this client id")
        self.seen[cid] = time.monotonic()


class Worker:
    """The common frame of a role: config, run folder, meter, metrics file, stop flag."""

    role = "worker"

    def __init__(self, cfg: Config, worker_id: int) -> None:
        self.cfg, self.id = cfg, worker_id
        self.log = setup_logging(f"{self.role}-{worker_id}" if worker_id >= 0 else self.role)
        self.stop = stop_event()
        self.run_dir = run_dir_for(cfg)
        self.run_id = cfg.run.run_id or "default"
        self.meter = Meter(self.role, max(worker_id, 0), cfg.train.device if self.role == "server" else "cpu")
        self.metrics = JsonlWriter(self.run_dir / f"{self.role}-{max(worker_id, 0)}.jsonl")
        if self.role == "server" or not (self.run_dir / "config.json").exists():
            cfg.save(self.run_dir / "config.json")
        self.ctx = zmq.Context.instance()
        set_threads(cfg)

    def message(self, t: MsgType, round_: int = -1, seq: int = 0, meta: dict | None = None,
                tensors: dict | None = None) -> Message:
        return Message(t, self.role, self.id, self.run_id, round_, seq, meta or {}, tensors or {})

    def record(self, event: str, **fields) -> None:
        """One metrics line, with the running totals a benchmark needs to cut out one epoch
        (and the resident memory now, to see whether a long run grows)."""
        self.meter.sample_memory()
        m = self.meter
        totals = {"total_sent": sum(m.bytes_sent.values()), "total_received": sum(m.bytes_received.values()),
                  "sent_by_type": dict(m.bytes_sent), "received_by_type": dict(m.bytes_received),
                  "compute_total_s": sum(v for k, v in m.compute_s.items() if k != "checkpoint"), "t": m.wall_s(),
                  "rss_mb": round(m.current_rss_mb(), 1)}
        self.metrics.write({"event": event, **totals, **fields})

    def admission(self, handlers: dict, sessions: Sessions) -> Callable[[list, Message], None]:
        """The cheap checks of a received message — run id, type, key identity, session —
        which :class:`Channel` runs on the header before it decodes any tensor."""

        def admit(envelope: list, msg: Message) -> None:
            if msg.run_id != self.run_id:
                raise WireError(ErrorCode.BAD_FIELD, f"run id {msg.run_id!r} is not this {self.role}'s "
                                                     f"{self.run_id!r}: start every party with --run-id {self.run_id}")
            if msg.type not in handlers:
                raise WireError(ErrorCode.BAD_TYPE, f"the {self.role} does not take {msg.type.value} messages")
            if msg.role == "client":
                security.authorise(envelope, msg.sender, self.cfg)
            # a heartbeat from an unknown client is answered "have: false" (it then sends HELLO again)
            if msg.type != MsgType.HELLO and not (msg.type == MsgType.HEARTBEAT and msg.sender not in sessions.owner):
                sessions.check(msg)

        return admit

    def serve(self, chan: Channel, inbound: Inbound, handlers: dict, sessions: Sessions) -> None:
        """Hand one received message to its handler once it passed :meth:`admission` (run here
        unless the channel already did); any problem becomes an ERROR reply and a
        ``rejected.<code>`` count, never an exception that would take this worker down."""
        if inbound.error is not None:
            reply_error(chan, inbound, inbound.error, self.role, self.id, self.run_id, self.log)
            return
        msg = inbound.msg
        try:
            if not inbound.admitted:
                self.admission(handlers, sessions)(inbound.envelope, msg)
            handlers[msg.type](inbound, msg)
        except (WireError, Refused) as e:
            err = as_wire_error(e)
            self.meter.count(f"rejected.{err.code.value}")
            reply_error(chan, inbound, err, self.role, self.id, self.run_id, self.log)
        except Exception as e:  # noqa: BLE001 - one bad message must never take a worker down
            self.log.exception("internal error on %s from %s-%s", msg.type.value, msg.role, msg.sender)
            self.meter.count("rejected.internal")
            reply_error(chan, inbound, WireError(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"), self.role,
                        self.id, self.run_id, self.log)

    def finish(self, **fields) -> None:
        self.metrics.write({"event": "final", **self.meter.snapshot(), **fields})
        self.metrics.close()
