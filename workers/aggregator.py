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

import functools
import time

import zmq

from lesft import wire
from lesft.aggregate import fedavg
from lesft.config import Config
from lesft.engine import run_fingerprint
from lesft.lora import adapter_shapes, save_adapters
from lesft.methods import get_method
from lesft.models import source_for
from lesft.rounds import Policy, Rounds, Verdict
from lesft.split import client_layers, split_point
from lesft.export import combine_run
from lesft.runs import GLOBAL_CLIENT_FILE, mark_run
from lesft.schedule import client_sizes, total_rounds
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
        # aggregation rounds are independent: uploads are taken up to two periods past the last outcome
        self.rounds = Rounds(Policy.from_config(cfg), functools.partial(total_rounds, cfg),
                             window=2 * cfg.train.aggregate_every, count=self.meter.count)
        # what every upload must hold, from the settings (never learnt from a peer)
        source = source_for(cfg)
        self.fingerprint, self.parts = run_fingerprint(cfg, source)
        method = get_method(cfg.train.method)
        layers = client_layers(source.n_layers, split_point(source.n_layers, cfg.model.split_ratio),
                               cfg.model.client_tail_layers) if method.split else range(source.n_layers)
        self.knows = wire.Knows(adapters=adapter_shapes(source.config, layers, cfg.lora))
        self.latest: Message | None = None
        self.done_at: float | None = None
        # A live client is heard here only every aggregate_every rounds, so a few heartbeats of
        # silence say nothing: a new session takes an id over only after the old one has been
        # silent for longer than a client waits on any request before it gives up.
        net = cfg.net
        self.sessions = Sessions(takeover_after=max(5 * net.heartbeat_s, net.request_timeout_s * (net.retries + 1)))
        self.split = method.split

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
                if len(self.rounds.sizes) != joined:
                    joined, last_join = len(self.rounds.sizes), now
                if joined < self.expected and now - last_note > NOTE_EVERY_S:
                    last_note = now
                    self.log.info("waiting for client(s) %s to subscribe (%d/%d; they come once the server has "
                                  "all of them; giving up after %.0f s without one, --register-timeout-s)",
                                  ", ".join(map(str, self.rounds.unregistered())), joined, self.expected,
                                  net.register_timeout_s)
                if joined < self.expected and now - last_join > net.register_timeout_s:
                    raise WorkerError(f"client(s) {', '.join(map(str, self.rounds.unregistered()))} did not subscribe "
                                      f"within {net.register_timeout_s:.0f} s (--register-timeout-s; {joined}/"
                                      f"{self.expected} subscribed): start them with the same --run-id and "
                                      "--aggregator-* addresses")
                while verdict := self.rounds.verdict(now):
                    self.close(verdict, now)
                if now >= next_beat:
                    # fast beats while subscribers are still joining
                    self.pub.send(wire.heartbeat(self.origin))
                    fast = not self.rounds.started
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

    def ack(self, inbound: Inbound, msg: Message, **meta) -> None:
        self.router.send(wire.ack(self.origin, msg.round, msg.seq, **meta), inbound.envelope)

    def on_hello(self, inbound: Inbound, msg: Message) -> None:
        cid = msg.meta["client_id"]
        if cid != msg.sender or cid >= self.expected:
            raise WireError(ErrorCode.UNKNOWN_CLIENT, f"client id {cid} is outside 0..{self.expected - 1}")
        check_fingerprint(msg, self.fingerprint, self.parts)
        self.sessions.register(cid, msg.meta.get("session"), self.log)
        joined = self.rounds.register(cid, msg.meta["n_samples"], msg.seq, inbound.envelope, time.monotonic())
        if joined.new:
            self.log.info("client %d subscribed (%d samples, %d/%d)", cid, msg.meta["n_samples"],
                          len(self.rounds.sizes), self.expected)
        rounds = self.rounds.total
        if joined.started:
            self.record("clients", rounds=rounds, **client_sizes(self.rounds.sizes, self.cfg.train.batch_size, rounds))
        if rounds is None and not self.split:
            # without a server the clients learn the rounds here, once every size is known
            # (answered directly: a client waiting for the others is not a rejected message)
            missing = self.expected - len(self.rounds.sizes)
            self.router.send(wire.error(self.origin, ErrorCode.NOT_READY, f"waiting for {missing} more client(s)",
                                        msg.round, msg.seq), inbound.envelope)
            return
        self.ack(inbound, msg, rounds=rounds)

    def on_heartbeat(self, inbound: Inbound, msg: Message) -> None:
        # the aggregator answers every request at once, so a waiting client lost it: resend
        self.router.send(wire.heartbeat(self.origin, msg.round, msg.seq, have=False), inbound.envelope)

    def refuse_early(self, msg: Message) -> None:
        """An upload too far ahead is refused from its header, before its tensors are decoded."""
        if msg.type == MsgType.UPLOAD:
            self.rounds.check_window(msg.round)

    def on_upload(self, inbound: Inbound, msg: Message) -> None:
        upload = ({k: v.clone() for k, v in msg.tensors.items()}, msg.meta["n_samples"])
        if self.rounds.result(msg.sender, msg.round, upload, time.monotonic()):
            self.ack(inbound, msg)
        else:  # already aggregated (a retried upload): the answer is the broadcast
            self.ack(inbound, msg, aggregated=True)

    def close(self, verdict: Verdict, now: float) -> None:
        """Average a round's uploads (reweighted over those present when it closes without
        stragglers), or fail it with one line: it had fewer than --min-clients in time."""
        r, bucket, need = verdict.round, verdict.results, self.rounds.policy.need
        note = ""
        if not verdict.accepted:
            note = (f"aggregation of round {r} failed: {len(bucket)} of the required {need} clients uploaded within "
                    f"{verdict.waited:.0f}s (--min-clients {need})")
            self.log.error(note)
        elif verdict.failures:
            self.log.warning("round %d: averaging %d clients without %s (nothing within %.0fs)", r, len(bucket),
                             list(verdict.failures), verdict.waited)
        self.rounds.close(verdict, now, note)
        if verdict.accepted:
            self.aggregate(r, bucket)

    def aggregate(self, r: int, bucket: dict[int, tuple[dict, int]]) -> None:
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
        self.rounds.check_outcome(msg.round)
        latest = self.latest
        self.router.send(wire.adapters(self.origin, msg.round, msg.seq, latest.tensors, clients=latest.meta["clients"],
                                       n_samples=latest.meta["n_samples"], of_round=latest.round), inbound.envelope)

    def on_bye(self, inbound: Inbound, msg: Message) -> None:
        complete = self.rounds.bye(msg.sender, msg.seq, inbound.envelope)
        self.ack(inbound, msg)
        if complete and self.done_at is None:
            self.log.info("all clients done")
            self.done_at = time.monotonic()
            self.combine_if_alone()

    def combine_if_alone(self) -> None:
        """Without a server (fedavg) the aggregator holds the whole run: write ``adapter/``."""
        method = get_method(self.cfg.train.method)
        if not method.split and (self.run_dir / GLOBAL_CLIENT_FILE).is_file():
            written = combine_run(self.run_dir, self.cfg, source_for(self.cfg), method)
            self.log.info("combined adapter at %s", written[0])
            mark_run(self.run_dir, complete=True, rounds=None)

