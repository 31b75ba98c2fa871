"""The worker base every role shares: the run's frame (:class:`workers.process.Process`),
admission of a received message (run id, type, key identity, session), its schema check
and the dispatch to a handler, the model fingerprint check of a HELLO, and the sessions
that say which process speaks for each client id.

Sockets and the request loop are :mod:`workers.transport`; message bytes go through
:mod:`lesft.wire`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import zmq

from lesft import wire
from lesft.config import Config
from lesft.rounds import Refused
from lesft.wire import ErrorCode, Message, MsgType, WireError
from workers import security
from workers.process import Process
from workers.transport import Channel, Inbound, give_back_memory


def as_wire_error(e: WireError | Refused) -> WireError:
    """A refusal of the round engine (:mod:`lesft.rounds`) as the wire error the peer gets."""
    if isinstance(e, WireError):
        return e
    return WireError(ErrorCode(e.code), e.text, e.meta)


def reply_error(chan: Channel, inbound: Inbound, err: WireError, origin: wire.Origin, log: logging.Logger) -> None:
    """Answer a bad message with ERROR where it can be routed, else log the drop."""
    give_back_memory()
    msg = inbound.msg
    log.warning("rejected %s from %s: %s", msg.type.value if msg else "message",
                f"{msg.role}-{msg.sender}" if msg else "unknown peer", err)
    if inbound.envelope or not chan.routed:
        reply = wire.error(origin, err.code, err.text, msg.round if msg else -1, msg.seq if msg else 0,
                           **err.meta)
        try:
            chan.send(reply, inbound.envelope)
        except zmq.ZMQError:
            pass


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


class Worker(Process):
    """A role's process: its origin on the wire, what it checks messages against
    (``knows``), and the admission and dispatch of what it receives."""

    role = "worker"
    knows = wire.Knows()

    def __init__(self, cfg: Config, worker_id: int) -> None:
        super().__init__(cfg, worker_id)
        self.origin = wire.Origin(self.role, self.id, self.run_id)

    def admission(self, handlers: dict, sessions: Sessions) -> Callable[[list, Message], None]:
        """The cheap checks of a received message — run id, type, key identity, session, the
        role's :meth:`refuse_early` — which :class:`Channel` runs on the header before it
        decodes any tensor."""

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
            try:
                self.refuse_early(msg)
            except Refused as e:  # the channel may run this, and it knows only wire errors
                raise as_wire_error(e) from None

        return admit

    def refuse_early(self, msg: Message) -> None:
        """A role's own refusals that need only the header (raise `WireError` or a round
        engine's `Refused`), run at admission."""

    def serve(self, chan: Channel, inbound: Inbound, handlers: dict, sessions: Sessions) -> None:
        """Hand one received message to its handler once it passed :meth:`admission` (run here
        unless the channel already did) and its type's check (:func:`lesft.wire.check` with
        ``self.knows``): handlers see only checked messages. Any problem becomes an ERROR
        reply and a ``rejected.<code>`` count, never an exception that would take this worker down."""
        if inbound.error is not None:
            reply_error(chan, inbound, inbound.error, self.origin, self.log)
            return
        msg = inbound.msg
        try:
            if not inbound.admitted:
                self.admission(handlers, sessions)(inbound.envelope, msg)
            wire.check(msg, self.knows)
            handlers[msg.type](inbound, msg)
        except (WireError, Refused) as e:
            err = as_wire_error(e)
            self.meter.count(f"rejected.{err.code.value}")
            reply_error(chan, inbound, err, self.origin, self.log)
        except Exception as e:  # noqa: BLE001 - one bad message must never take a worker down
            self.log.exception("internal error on %s from %s-%s", msg.type.value, msg.role, msg.sender)
            self.meter.count("rejected.internal")
            reply_error(chan, inbound, WireError(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"), self.origin,
                        self.log)
