"""The transport of every process of a run: sockets with the project's options, bounded
receive, :class:`Channel` (a socket with accounting, validated receive) and the
request-with-retry of the Lazy Pirate pattern. Nothing here knows a worker's roles or rounds.

All message bytes go through :mod:`lesft.wire`; nothing here builds frames by hand.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import zmq

from lesft import wire
from lesft.config import Config
from lesft.metrics import Meter
from lesft.wire import ErrorCode, Message, MsgType, WireError
from workers import security


class WorkerError(RuntimeError):
    """A condition that ends a worker with one clear line (a peer that never answers, ...)."""


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
        give_back_memory()
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
        give_back_memory()
        raise Oversized(count, n)
    return frames


_trim = {"last": 0.0, "due": False}


def give_back_memory() -> None:
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
    checks have run (see ``workers.common.Worker.admission``)."""

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
            return Inbound(envelope if self.routed else [], e.msg, e, n)
        self.meter.received(self.prefix + msg.type.value, n - frames_bytes(envelope))
        return Inbound(envelope, msg, None, n, admitted=self.admit is not None)

    def close(self) -> None:
        self.sock.close(linger=0)


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
            MsgType.HEAD_GRAD: f"the backward of round {r}",
            MsgType.UPLOAD: f"the adapter upload of round {r}", MsgType.FETCH: f"the global adapters of round {r}"
            if r >= 0 else "the latest global adapters", MsgType.BYE: "the end of the run"}.get(
        msg.type, f"a {msg.type.value} reply" + (f" of round {r}" if r >= 0 else ""))


NOTE_EVERY_S = 10.0  # how often a waiting process says what it waits for


_RESEND = object()  # what a received message may mean: send the request again


class _Request:
    """One request waiting for its reply: the clocks, the tries, and what each received
    message means for it (see :func:`request`)."""

    def __init__(self, peer: Peer, msg: Message, expect: set[MsgType], cfg: Config, log: logging.Logger,
                 what: str, knows: wire.Knows, on_other: Callable[[Message], None] | None,
                 retry_errors: frozenset, patience_s: float | None, patience_flag: str) -> None:
        self.peer, self.msg, self.expect, self.cfg, self.log, self.what = peer, msg, expect, cfg, log, what
        self.knows, self.on_other, self.retry_errors = knows, on_other, retry_errors
        self.patience_s, self.patience_flag = patience_s, patience_flag
        self.started = time.monotonic()
        self.next_note = self.started + NOTE_EVERY_S
        self.tries = 0

    def is_reply(self, got: Message) -> bool:
        return (got.round, got.seq) == (self.msg.round, self.msg.seq)

    def receive(self, chan: Channel) -> Message | None:
        """The next message, checked; None when it was malformed (logged and dropped)."""
        inbound = chan.recv()
        self.peer.last_heard = time.monotonic()
        got = inbound.msg if inbound.error is None else None
        if got is None:
            self.log.warning("dropped a malformed reply from %s: %s", self.peer.name, inbound.error)
            return None
        return self.checked(got)

    def checked(self, got: Message) -> Message | None:
        """``got`` if it passes its check, else None (logged and dropped). A reply to this
        request that fails ends the wait. Messages for other requests go to ``on_other``
        checked only for what holds for every request: it knows what they answer."""
        knows = self.knows if self.is_reply(got) or self.on_other is None else wire.Knows()
        try:
            wire.check(got, knows)
        except WireError as e:
            if self.is_reply(got) and got.type in self.expect | {MsgType.ERROR}:
                raise WorkerError(f"{self.peer.where} sent an unusable answer to {self.what} ({e})") from None
            self.log.warning("dropped a malformed %s from %s: %s", got.type.value, self.peer.name, e)
            return None
        return got

    def answer(self, got: Message) -> Message | object | None:
        """What ``got`` means: the reply, ``_RESEND``, or None (keep waiting). Raises the
        `WireError` of an ERROR reply that is not worth asking again."""
        if got.type == MsgType.HEARTBEAT:
            if self.is_reply(got) and got.meta.get("have") is False:
                self.peer.meter.count(f"resent.{self.peer.name}")
                return _RESEND  # the peer does not hold our request
            return None
        if not self.is_reply(got):
            if self.on_other is not None:
                self.on_other(got)
            else:
                self.peer.meter.count("stale_replies")
            return None
        if got.type == MsgType.ERROR:
            try:
                wire.raise_if_error(got)
            except WireError as e:
                if e.code not in self.retry_errors:
                    raise
                time.sleep(min(self.cfg.net.heartbeat_s, 1.0))
                return _RESEND  # ask again, not counted as a retry
        if got.type in self.expect:
            return got
        self.peer.meter.count("unexpected_replies")
        return None

    def note(self, now: float) -> None:
        """Every ``NOTE_EVERY_S`` say what we wait for; past ``patience_s`` give up."""
        if now >= self.next_note:
            self.next_note = now + NOTE_EVERY_S
            heard = now - self.peer.last_heard
            self.log.info("waiting for %s (%s) for %.0f s%s%s", self.peer.where, self.what, now - self.started,
                          f"; no sign of it for {heard:.0f} s: is it running?"
                          if heard > 2 * self.cfg.net.heartbeat_s else "; it is up",
                          f" (giving up after {self.patience_s:.0f} s, {self.patience_flag})"
                          if self.patience_s else "")
        if self.patience_s is not None and now - self.started > self.patience_s:
            raise WorkerError(f"{self.peer.where} did not answer {self.what} within {self.patience_s:.0f} s "
                              f"({self.patience_flag}): is it running, with the same --run-id and addresses?")

    def retry(self) -> None:
        """After ``request_timeout_s`` of silence: rebuild the socket (the caller sends again),
        up to ``retries`` times."""
        net = self.cfg.net
        self.tries += 1
        if self.tries > net.retries:
            raise WorkerError(f"{self.peer.where} did not answer {self.what} after {self.tries} tries of "
                              f"{net.request_timeout_s:.0f}s: is it running and reachable?")
        self.log.warning("no answer from %s for %s in %.0fs: reconnecting (try %d/%d)", self.peer.where, self.what,
                         net.request_timeout_s, self.tries, net.retries)
        self.peer.reset()


def request(peer: Peer, msg: Message, expect: set[MsgType], *, cfg: Config, stop: threading.Event,
            log: logging.Logger, float_dtype: str | None = None, what: str = "",
            on_other: Callable[[Message], None] | None = None,
            retry_errors: frozenset = frozenset({ErrorCode.NOT_READY}), patience_s: float | None = None,
            patience_flag: str = "--register-timeout-s", knows: wire.Knows = wire.Knows(),
            sent: bool = False, early: Message | None = None) -> Message:
    """Send ``msg`` and wait for a matching reply (same round and seq) of an expected type.

    Every received message is checked first (:func:`lesft.wire.check` with ``knows``): a
    malformed one is dropped, a reply to this request that fails its check raises
    :class:`WorkerError`. While waiting it sends HEARTBEATs; any message from the peer
    counts as a sign of life. After ``request_timeout_s`` of silence the socket is rebuilt
    and the request sent again, up to ``retries`` times. An ERROR reply raises
    :class:`WireError`, except the retryable ones (NOT_READY), which are asked again after a
    pause. With ``patience_s`` the whole wait (answers included) ends after that long with a
    :class:`WorkerError` naming ``patience_flag``. Every ``NOTE_EVERY_S`` of waiting it
    logs what it waits for.

    ``sent``: ``msg`` went out already on the peer's current socket (a :class:`Pipeline`), so
    only a retry sends it again; ``early``: a message that came for it while another request
    was awaited, taken as if it arrived first.
    """
    req = _Request(peer, msg, expect, cfg, log, what or describe(msg), knows, on_other, retry_errors,
                   patience_s, patience_flag)
    if early is not None and (got := req.checked(early)) is not None:
        outcome = req.answer(got)
        if outcome is _RESEND:
            sent = False
        elif outcome is not None:
            return outcome
    beat = wire.heartbeat(wire.Origin.of(msg), msg.round, msg.seq)
    while True:
        chan = peer.channel()
        if not sent:
            chan.send(msg, float_dtype=float_dtype)
        sent = False
        peer.last_heard = time.monotonic()
        next_beat = peer.last_heard + min(cfg.net.heartbeat_s, 1.0)
        while True:
            if stop.is_set():
                raise WorkerError(f"stopped while waiting for {peer.where} ({req.what})")
            if chan.sock.poll(100):
                got = req.receive(chan)
                outcome = req.answer(got) if got is not None else None
                if outcome is _RESEND:
                    break
                if outcome is not None:
                    return outcome
                continue
            now = time.monotonic()
            req.note(now)
            if now >= next_beat:
                chan.send(beat)
                next_beat = now + cfg.net.heartbeat_s
            if now - peer.last_heard > cfg.net.request_timeout_s:
                req.retry()
                break


@dataclass
class _Sent:
    msg: Message
    expect: set[MsgType]
    knows: wire.Knows
    chan: Channel  # the socket it went out on


class Pipeline:
    """Requests sent ahead to one peer, then awaited one at a time (rounds in flight,
    ``--pipeline-depth``).

    Awaiting one is a :func:`request` whose first send is done already: the same
    heartbeats, timeouts, retries and ERROR handling. A reply to a later one that comes
    while an earlier one is awaited is kept for its turn; one sent on a socket rebuilt since
    (a retry reconnected) is sent again when its turn comes. A round whose exchange has two
    legs (label-private: FORWARD -> HIDDEN, then HEAD_GRAD -> BACKWARD) sends its second with
    :meth:`follow` once :meth:`wait` returned the first's reply; the later rounds stay in flight.
    """

    def __init__(self, peer: Peer, *, cfg: Config, stop: threading.Event, log: logging.Logger,
                 float_dtype: str | None = None) -> None:
        self.peer, self.cfg, self.stop, self.log, self.float_dtype = peer, cfg, stop, log, float_dtype
        self.sent: dict[int, _Sent] = {}  # round -> its request
        self.early: dict[int, Message] = {}  # round -> a message that answers its request
        self.answered: _Sent | None = None  # the request wait() returned the reply of last

    def __contains__(self, r: int) -> bool:
        return r in self.sent

    def send(self, msg: Message, expect: set[MsgType], knows: wire.Knows = wire.Knows()) -> None:
        chan = self.peer.channel()
        chan.send(msg, float_dtype=self.float_dtype)
        self.sent[msg.round] = _Sent(msg, expect, knows, chan)

    def wait(self, r: int) -> Message:
        """The reply to the request of round ``r`` (see :func:`request` for what it raises)."""
        s = self.sent.pop(r)
        reply = request(self.peer, s.msg, s.expect, cfg=self.cfg, stop=self.stop, log=self.log,
                        float_dtype=self.float_dtype, knows=s.knows, on_other=self._keep,
                        sent=self.peer.chan is s.chan, early=self.early.pop(r, None))
        self.answered = s
        return reply

    def follow(self, msg: Message, expect: set[MsgType]) -> None:
        """Send the next leg of the round :meth:`wait` just answered (checked as its first leg
        was), to be awaited by ``wait(msg.round)`` in turn."""
        first = self.answered
        if first is None or first.msg.round != msg.round:
            raise ValueError(f"round {msg.round} has no answered first leg to follow")
        self.send(msg, expect, first.knows)

    def _keep(self, got: Message) -> None:
        s = self.sent.get(got.round)
        if s is not None and s.msg.seq == got.seq:
            self.early[got.round] = got
        else:
            self.peer.meter.count("stale_replies")

    def clear(self) -> None:
        """Forget every request in flight (the caller sends them again, or never)."""
        self.sent.clear()
        self.early.clear()
        self.answered = None
