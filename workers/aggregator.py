"""The aggregator role: FedAvg of client adapters, broadcast on PUB.

It binds a ROUTER (HELLO, UPLOAD, FETCH, BYE) and an XPUB (ADAPTERS, heartbeats). The
XPUB applies a subscription only for the two topics the clients use (manual mode, each
frame capped at 4 kB), so a stranger's huge or countless subscriptions
cost it nothing. It sends heartbeats from the start, and a client says HELLO only after it has received one,
so every registered client is a live subscriber before the first broadcast (the sync
step of zguide's pub-sub). When every registered client has uploaded round r, the
|D_i|-weighted average is saved (atomically) and published with its round; a late or
restarted client asks for it with FETCH. Uploads are taken only for rounds inside a small
window ahead of the last aggregated one, so what a peer can make it keep is bounded.
"""

from __future__ import annotations

import time

import zmq

from lesft import wire
from lesft.aggregate import fedavg
from lesft.config import Config
from lesft.engine import run_fingerprint
from lesft.lora import adapter_shapes, save_adapters
from lesft.methods import get_method
from lesft.models import source_for
from lesft.split import split_point
from lesft.runs import GLOBAL_CLIENT_FILE
from lesft.wire import ErrorCode, Message, MsgType, WireError
from workers.common import Sessions, Worker, check_fingerprint
from workers.transport import NOTE_EVERY_S, Channel, Inbound, Oversized, WorkerError, make_socket, recv_bounded

TOPICS = frozenset({MsgType.ADAPTERS.value.encode(), MsgType.HEARTBEAT.value.encode()})
SUBSCRIPTION_BYTES = 4096  # frame cap on the XPUB: room for the CurveZMQ handshake, not for a bomb


class Aggregator(Worker):
    role = "aggregator"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, -1)
        self.expected = cfg.data.clients
        self.registered: dict[int, int] = {}  # client id -> n_samples
        self.uploads: dict[int, dict[int, tuple[dict, int]]] = {}
        # what every upload must hold, from the settings (never learnt from a peer)
        source = source_for(cfg)
        self.fingerprint, self.parts = run_fingerprint(cfg, source)
        method = get_method(cfg.train.method)
        layers = range(split_point(source.n_layers, cfg.model.split_ratio)) if method.split else range(source.n_layers)
        self.knows = wire.Knows(adapters=adapter_shapes(source.config, layers, cfg.lora))
        self.latest: Message | None = None
        self.byes: set[int] = set()
        self.done_at: float | None = None
        # A live client is heard here only every aggregate_every rounds, so a few heartbeats of
        # silence say nothing: a new session takes an id over only after the old one has been
        # silent for longer than a client waits on any request before it gives up.
        net = cfg.net
        self.sessions = Sessions(takeover_after=max(5 * net.heartbeat_s, net.request_timeout_s * (net.retries + 1)))
        self.deadlines: dict[int, float] = {}  # round -> when its first upload arrived
        self.failed: dict[int, str] = {}
        self.split = method.split
        self._rounds: int | None = None

    def run(self) -> int:
        net = self.cfg.net
        limits = wire.Limits(max_total_bytes=net.max_message_mb * 2**20)
        self.router = Channel(make_socket(self.ctx, zmq.ROUTER, self.cfg, bind=net.aggregator_address,
                                          identity="aggregator"), self.meter, routed=True, limits=limits,
                              admit=self.admission(self.handlers, self.sessions))
        xpub = make_socket(self.ctx, zmq.XPUB, self.cfg, bind=net.aggregator_pub, identity="aggregator",
                           max_frame_bytes=SUBSCRIPTION_BYTES)
        xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.pub = Channel(xpub, self.meter, routed=False, topic=True)
        poller = zmq.Poller()
        poller.register(self.router.sock, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        self.log.info("aggregating %d clients: uploads on %s, broadcasts on %s", self.expected,
                      net.aggregator_address, net.aggregator_pub)
        next_beat = 0.0
        last_join = last_note = time.monotonic()
        joined = 0
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(50))
                if self.router.sock in events:
                    self.dispatch(self.router.recv())
                if xpub in events:
                    self.on_subscriptions(xpub)
                now = time.monotonic()
                if len(self.registered) != joined:
                    joined, last_join = len(self.registered), now
                if joined < self.expected and now - last_note > NOTE_EVERY_S:
                    last_note = now
                    missing = sorted(set(range(self.expected)) - set(self.registered))
                    self.log.info("waiting for client(s) %s to subscribe (%d/%d; they come once the server has "
                                  "all of them; giving up after %.0f s without one, --register-timeout-s)",
                                  ", ".join(map(str, missing)), joined, self.expected, net.register_timeout_s)
                if joined < self.expected and now - last_join > net.register_timeout_s:
                    missing = sorted(set(range(self.expected)) - set(self.registered))
                    raise WorkerError(f"client(s) {', '.join(map(str, missing))} did not subscribe within "
                                      f"{net.register_timeout_s:.0f} s (--register-timeout-s; {joined}/{self.expected}"
                                      f" subscribed): start them with the same --run-id and --aggregator-* addresses")
                self.check_stragglers(now)
                if now >= next_beat:
                    # fast beats while subscribers are still joining
                    self.pub.send(wire.heartbeat(self.origin))
                    fast = len(self.registered) < self.expected
                    next_beat = now + (0.1 if fast else net.heartbeat_s)
                if self.done_at is not None and now - self.done_at > net.done_linger_s:
                    break
        finally:
            self.router.close()
            self.pub.close()
            self.finish(aggregations=self.meter.counters.get("aggregations", 0))
        return 0

    @property
    def handlers(self) -> dict:
        return {MsgType.HELLO: self.on_hello, MsgType.UPLOAD: self.on_upload, MsgType.FETCH: self.on_fetch,
                MsgType.BYE: self.on_bye, MsgType.HEARTBEAT: self.on_heartbeat}

    def dispatch(self, inbound: Inbound) -> None:
        self.serve(self.router, inbound, self.handlers, self.sessions)

    def on_subscriptions(self, xpub: zmq.Socket) -> None:
        """Apply (un)subscriptions to the clients' two topics; ignore anything else."""
        for _ in range(100):
            try:
                frames = recv_bounded(xpub, 1, SUBSCRIPTION_BYTES, zmq.NOBLOCK)
            except zmq.Again:
                return
            except Oversized:
                self.meter.count("rejected.subscription")
                continue  # recv_bounded handed the memory back
            raw = frames[0].bytes
            if raw[:1] in (b"\x00", b"\x01") and raw[1:] in TOPICS:
                xpub.setsockopt(zmq.SUBSCRIBE if raw[:1] == b"\x01" else zmq.UNSUBSCRIBE, raw[1:])
            else:
                self.meter.count("rejected.subscription")

    def window_end(self) -> int:
        """The last round an upload may be for: two aggregation periods past the last round
        aggregated (or failed), so a peer cannot make the aggregator keep far-future rounds."""
        base = max(self.latest.round if self.latest is not None else -1, max(self.failed, default=-1))
        return base + 2 * self.cfg.train.aggregate_every

    def ack(self, inbound: Inbound, msg: Message, **meta) -> None:
        self.router.send(wire.ack(self.origin, msg.round, msg.seq, **meta), inbound.envelope)

    def on_hello(self, inbound: Inbound, msg: Message) -> None:
        cid = msg.meta["client_id"]
        if cid != msg.sender or cid >= self.expected:
            raise WireError(ErrorCode.UNKNOWN_CLIENT, f"client id {cid} is outside 0..{self.expected - 1}")
        check_fingerprint(msg, self.fingerprint, self.parts)
        self.sessions.register(cid, msg.meta.get("session"), self.log)
        if cid not in self.registered:
            self.log.info("client %d subscribed (%d samples, %d/%d)", cid, msg.meta["n_samples"],
                          len(self.registered) + 1, self.expected)
        self.registered[cid] = msg.meta["n_samples"]
        rounds = self.rounds()
        if rounds is None and not self.split:
            # without a server the clients learn the rounds here, once every size is known
            # (answered directly: a client waiting for the others is not a rejected message)
            missing = self.expected - len(self.registered)
            self.router.send(wire.error(self.origin, ErrorCode.NOT_READY, f"waiting for {missing} more client(s)",
                                        msg.round, msg.seq), inbound.envelope)
            return
        self.ack(inbound, msg, rounds=rounds)

    def rounds(self) -> int | None:
        """Rounds of the run once every client has registered: ``--rounds``, else ``--epochs`` x the
        longest client epoch (what the server decides from its own registrations)."""
        if len(self.registered) < self.expected:
            return None
        if self._rounds is None:
            from lesft.schedule import client_sizes, total_rounds

            b = self.cfg.train.batch_size
            self._rounds = total_rounds(self.cfg, list(self.registered.values()), b)
            self.record("clients", rounds=self._rounds, **client_sizes(self.registered, b, self._rounds))
        return self._rounds

    def on_heartbeat(self, inbound: Inbound, msg: Message) -> None:
        # the aggregator answers every request at once, so a waiting client lost it: resend
        self.router.send(wire.heartbeat(self.origin, msg.round, msg.seq, have=False), inbound.envelope)

    def refuse_early(self, msg: Message) -> None:
        """An upload too far ahead is refused from its header, before its tensors are decoded."""
        if msg.type == MsgType.UPLOAD and msg.round > self.window_end():
            raise WireError(ErrorCode.NOT_READY, f"round {msg.round} is too far ahead: uploads are taken up to "
                                                 f"round {self.window_end()} now")

    def on_upload(self, inbound: Inbound, msg: Message) -> None:
        if self.latest is not None and msg.round <= self.latest.round:
            # already aggregated (a retried upload): the answer is the broadcast
            self.ack(inbound, msg, aggregated=True)
            return
        if msg.round in self.failed:
            raise WireError(ErrorCode.STALE_ROUND, self.failed[msg.round])
        bucket = self.uploads.setdefault(msg.round, {})
        self.deadlines.setdefault(msg.round, time.monotonic())
        bucket[msg.sender] = ({k: v.clone() for k, v in msg.tensors.items()}, msg.meta["n_samples"])
        self.ack(inbound, msg)
        if set(bucket) >= set(self.registered) and len(bucket) >= self.expected:
            self.aggregate(msg.round)

    def check_stragglers(self, now: float) -> None:
        """With --straggler-timeout: average the uploads present (reweighted over them) once
        the round has waited long enough; with fewer than --min-clients, fail the round."""
        timeout = self.cfg.net.straggler_timeout_s
        if not timeout:
            return
        need = self.cfg.net.min_clients or self.expected
        for r, started in list(self.deadlines.items()):
            bucket = self.uploads.get(r, {})
            waited = now - started
            if waited < timeout or not bucket:
                continue
            if len(bucket) >= need:
                missing = sorted(set(self.registered) - set(bucket))
                self.log.warning("round %d: averaging %d clients without %s (nothing within %.0fs)", r,
                                 len(bucket), missing, waited)
                self.meter.count("stragglers_dropped", len(missing))
                self.aggregate(r)
            elif waited > 3 * timeout:
                self.failed[r] = (f"aggregation of round {r} failed: {len(bucket)} of the required {need} clients "
                                  f"uploaded within {waited:.0f}s (--min-clients {need})")
                self.log.error(self.failed[r])
                self.meter.count("failed_rounds")
                self.uploads.pop(r, None)
                self.deadlines.pop(r, None)

    def aggregate(self, r: int) -> None:
        self.deadlines.pop(r, None)
        bucket = self.uploads.pop(r)
        with self.meter.phase("aggregate"):
            avg = fedavg([bucket[cid] for cid in sorted(bucket)])
        save_adapters(avg, self.run_dir / GLOBAL_CLIENT_FILE, {"round": r})
        self.latest = wire.adapters(self.origin, r, 0, avg, clients=sorted(bucket),
                                    n_samples=sum(n for _, n in bucket.values()))
        self.pub.send(self.latest)
        self.meter.count("aggregations")
        self.record("aggregation", round=r, clients=sorted(bucket), weights={c: bucket[c][1] for c in sorted(bucket)},
                    wall_s=self.meter.wall_s())
        self.log.info("round %d: averaged %d clients and broadcast", r, len(bucket))

    def on_fetch(self, inbound: Inbound, msg: Message) -> None:
        if msg.round in self.failed:
            raise WireError(ErrorCode.STALE_ROUND, self.failed[msg.round])
        if self.latest is None or self.latest.round < msg.round:
            raise WireError(ErrorCode.NOT_READY, f"no global adapters for round {msg.round} yet")
        latest = self.latest
        self.router.send(wire.adapters(self.origin, msg.round, msg.seq, latest.tensors, clients=latest.meta["clients"],
                                       n_samples=latest.meta["n_samples"], of_round=latest.round), inbound.envelope)

    def on_bye(self, inbound: Inbound, msg: Message) -> None:
        self.byes.add(msg.sender)
        self.ack(inbound, msg)
        if len(self.byes) >= self.expected and self.done_at is None:
            self.log.info("all clients done")
            self.done_at = time.monotonic()
            self.combine_if_alone()

    def combine_if_alone(self) -> None:
        """Without a server (fedavg) the aggregator holds the whole run: write ``adapter/``."""
        from lesft.export import combine_run
        from lesft.runs import mark_run

        method = get_method(self.cfg.train.method)
        if not method.split and (self.run_dir / GLOBAL_CLIENT_FILE).is_file():
            written = combine_run(self.run_dir, self.cfg, source_for(self.cfg), method)
            self.log.info("combined adapter at %s", written[0])
            mark_run(self.run_dir, complete=True, rounds=None)

