"""The server role: layers[k:] + norm + head with LoRA, behind the broker.

It registers clients (HELLO, fingerprint check), waits for all of them, then serves
rounds: FORWARDs of the current round are gathered until every active client has sent
one or ``--microbatch-wait-ms`` passes; the gathered rows run as one microbatch and each
client gets only its own slice of dL/dS back. When every client of the round is served
the round closes (optimiser step at the end of an accumulation window, checkpoint).
A repeated ``(client, round)`` is the same request: it is answered from the cache.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
import zmq

from lesft import wire
from lesft.config import Config
from lesft.engine import ServerParty, mean_loss, run_fingerprint, sends_reference
from lesft.methods import get_method
from lesft.metrics import merge_token_means
from lesft.models import source_for
from lesft.export import adapter_meta, combine_run
from lesft.runs import SERVER_FILE, mark_run
from lesft.schedule import client_sizes, is_step_round, rounds_per_epoch
from lesft.wire import ErrorCode, Message, MsgType, WireError
from lesft import checkpoint
from workers.common import Sessions, Worker, check_fingerprint
from workers.transport import NOTE_EVERY_S, SERVER_ROUTING_ID, Channel, Inbound, WorkerError, make_socket


@dataclass
class ClientSlot:
    """What the server knows of one registered client."""

    n_samples: int
    envelope: list
    last_seen: float = field(default_factory=time.monotonic)
    hello_seq: int = 0
    welcomed: bool = False
    reply: tuple[int, Message, torch.dtype] | None = None  # (round, BACKWARD, wire dtype) for repeats
    reply_sent: float = 0.0


@dataclass
class Request:
    envelope: list
    msg: Message
    arrived: float = field(default_factory=time.monotonic)


class Server(Worker):
    role = "server"

    # ------------------------------------------------------------------ setup

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        super().__init__(cfg, 0)
        self.method = get_method(cfg.train.method)
        self.source = source_for(cfg)
        self.party = ServerParty(cfg, self.source, self.method, meter=self.meter)
        self.meter.device = str(self.party.device)
        self.fingerprint, self.parts = run_fingerprint(cfg, self.source)
        c = self.source.config
        limits = wire.ModelLimits(hidden_size=int(c.hidden_size), max_length=cfg.data.max_length,
                                  max_rows=cfg.train.batch_size, vocab_size=int(c.vocab_size))
        self.knows = wire.Knows(model=limits, reference=sends_reference(self.method, cfg))
        self.expected = cfg.data.clients
        self.clients: dict[int, ClientSlot] = {}
        self.rounds: int | None = None
        self.round = 0
        self.served: set[int] = set()
        self.pending: dict[int, dict[int, Request]] = {}
        self.round_acc: dict[str, float] = {}
        self.round_stats: dict[str, float] = {}  # token-weighted over the round's microbatches
        self.byes: dict[int, tuple[list, int]] = {}
        self.done_at: float | None = None
        self.dropped: set[int] = set()  # stragglers left out of the current round
        self.round_replies: dict[int, tuple[Message, torch.dtype]] = {}
        self.held: dict[int, tuple[list, int]] = {}  # envelope and seq to answer each served client on
        self.round_started = time.monotonic()
        self.sessions = Sessions(takeover_after=5 * cfg.net.heartbeat_s)
        self.checkpoint_path = self.run_dir / "server-checkpoint.pt"
        if resume:
            self._resume()

    def _resume(self) -> None:
        state = checkpoint.load(self.checkpoint_path)
        if state is None:
            self.log.info("no checkpoint at %s: starting from round 0", self.checkpoint_path)
            return
        if state["fingerprint"] != self.fingerprint:
            raise WireError(ErrorCode.FINGERPRINT_MISMATCH,
                            f"{self.checkpoint_path} was written for a different model/split/LoRA/method")
        self.party.restore(state["party"])
        self.round, self.rounds = state["round"], state["rounds"]
        self.clients = {int(cid): ClientSlot(n, [], welcomed=False) for cid, n in state["clients"].items()}
        self.sessions.owner.update({int(c): s for c, s in state.get("sessions", {}).items()})
        for cid, c in state.get("replies", {}).items():
            msg = wire.backward(self.origin, c["round"], 0, **c["meta"], grad=c["grad"])
            self.clients[int(cid)].reply = (c["round"], msg, wire.WIRE_DTYPES[c["dtype"]])
        self.log.info("resumed from %s at round %d of %d", self.checkpoint_path, self.round, self.rounds)

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        # a DEALER with the routing id the broker sends requests to (see broker/proxy.py)
        sock = make_socket(self.ctx, zmq.DEALER, self.cfg, connect=self.cfg.net.broker_backend, identity="server",
                           routing_id=SERVER_ROUTING_ID)
        sock.setsockopt(zmq.SNDTIMEO, 1000)  # broker gone and its queue full: drop, the clients ask again
        limits = wire.Limits(max_total_bytes=self.cfg.net.max_message_mb * 2**20)
        self.chan = Channel(sock, self.meter, routed=True, limits=limits, drop_on_full=True,
                            admit=self.admission(self.handlers, self.sessions))
        self.log.info("%s on %s: layers %d..%d of %d, waiting for %d clients via %s", self.method.label,
                      self.party.device, self.party.k, self.source.n_layers - 1, self.source.n_layers,
                      self.expected, self.cfg.net.broker_backend)
        last_note = started = time.monotonic()
        try:
            while not self.stop.is_set():
                if self.chan.sock.poll(50):
                    self.dispatch(self.chan.recv())
                    while self.chan.sock.poll(0):  # drain what is queued before computing
                        self.dispatch(self.chan.recv())
                self.maybe_process()
                now = time.monotonic()
                if self.rounds is None and now - last_note > NOTE_EVERY_S:
                    self._note_waiting(now - started)
                    last_note = now
                if self.rounds is None and now - started > self.cfg.net.register_timeout_s:
                    missing = sorted(set(range(self.expected)) - set(self.clients))
                    raise WorkerError(f"client(s) {', '.join(map(str, missing))} did not register within "
                                      f"{self.cfg.net.register_timeout_s:.0f} s (--register-timeout-s; "
                                      f"{len(self.clients)}/{self.expected} registered): start them with the same "
                                      f"--run-id and --broker-frontend, or run with --clients {len(self.clients) or 1}")
                if self.done_at is not None and now - self.done_at > self.cfg.net.done_linger_s:
                    break
        finally:
            self.chan.close()
            self.finish(rounds=self.rounds, round=self.round, steps=self.party.steps)
        return 0

    def _note_waiting(self, waited: float = 0.0) -> None:
        missing = sorted(set(range(self.expected)) - set(self.clients))
        self.log.info("waiting for client(s) %s (%d/%d registered) for %.0f s; giving up after %.0f s "
                      "(--register-timeout-s)", ", ".join(map(str, missing)), len(self.clients), self.expected, waited,
                      self.cfg.net.register_timeout_s)

    def reply(self, inbound: Inbound, msg: Message, float_dtype: str | None = None) -> None:
        self.chan.send(msg, inbound.envelope, float_dtype)

    @property
    def handlers(self) -> dict:
        return {MsgType.HELLO: self.on_hello, MsgType.FORWARD: self.on_forward,
                MsgType.HEARTBEAT: self.on_heartbeat, MsgType.BYE: self.on_bye}

    def dispatch(self, inbound: Inbound) -> None:
        self.serve(self.chan, inbound, self.handlers, self.sessions)

    # ------------------------------------------------------------------ handlers

    def on_hello(self, inbound: Inbound, msg: Message) -> None:
        cid = msg.meta["client_id"]
        if cid != msg.sender or cid >= self.expected:
            raise WireError(ErrorCode.UNKNOWN_CLIENT, f"client id {cid} is outside 0..{self.expected - 1} "
                                                      f"(the server runs --clients {self.expected})")
        check_fingerprint(msg, self.fingerprint, self.parts)
        self.sessions.register(cid, msg.meta.get("session"), self.log)
        slot = self.clients.get(cid)
        if slot is None:
            slot = self.clients[cid] = ClientSlot(msg.meta["n_samples"], inbound.envelope)
            self.log.info("client %d registered (%d samples, %d/%d)", cid, slot.n_samples, len(self.clients),
                          self.expected)
        elif slot.welcomed and self.rounds is not None:
            self.log.info("client %d registered again (restarted?): continuing at round %d", cid, self.round)
        slot.envelope, slot.hello_seq, slot.last_seen = inbound.envelope, msg.seq, time.monotonic()
        slot.n_samples = msg.meta["n_samples"]
        if self.rounds is None and len(self.clients) == self.expected:
            b = self.cfg.train.batch_size
            self.rounds = self.cfg.train.rounds or self.cfg.train.epochs * max(
                rounds_per_epoch(s.n_samples, b) for s in self.clients.values())
            self.log.info("all %d clients registered: %d rounds", self.expected, self.rounds)
            sizes = {c: s.n_samples for c, s in self.clients.items()}
            self.record("clients", rounds=self.rounds, **client_sizes(sizes, b, self.rounds))
            self.round_started = time.monotonic()
        if self.rounds is not None:
            for c_id, s in self.clients.items():
                if s.envelope and (not s.welcomed or c_id == cid):
                    self._welcome(c_id, s)

    def _welcome(self, cid: int, slot: ClientSlot) -> None:
        self.chan.send(wire.welcome(self.origin, slot.hello_seq, rounds=self.rounds, round=self.round,
                                    clients=self.expected), slot.envelope)
        slot.welcomed = True

    def on_heartbeat(self, inbound: Inbound, msg: Message) -> None:
        """Answer a waiting client: ``have`` says whether its request (round, seq) is held
        here; a request that was lost on the way (broker restart, no server yet) is then
        sent again. A reply that was lost is sent again from the cache."""
        slot = self.clients.get(msg.sender)
        have = False
        if slot is not None:
            slot.last_seen = time.monotonic()
            if msg.round == -1 and slot.hello_seq == msg.seq:
                have = True
                if slot.welcomed:
                    self._welcome(msg.sender, slot)
            elif slot.reply is not None and slot.reply[0] == msg.round and slot.reply[1].seq == msg.seq:
                have = True
                # a heartbeat may cross the reply on the wire: resend only when it looks lost
                if time.monotonic() - slot.reply_sent > 2 * self.cfg.net.heartbeat_s:
                    self.meter.count("replies_resent")
                    self.chan.send(slot.reply[1], inbound.envelope, wire.wire_name(slot.reply[2]))
                    slot.reply_sent = time.monotonic()
            elif msg.sender in self.held and self.held[msg.sender][1] == msg.seq:
                have = True  # served in the open round: the reply leaves when the round closes
                self.held[msg.sender] = (inbound.envelope, msg.seq)
            else:
                req = self.pending.get(msg.round, {}).get(msg.sender)
                bye = self.byes.get(msg.sender)
                have = (req is not None and req.msg.seq == msg.seq) or (bye is not None and bye[1] == msg.seq)
                if bye is not None and have:
                    self.byes[msg.sender] = (inbound.envelope, msg.seq)
        self.reply(inbound, wire.heartbeat(self.origin, msg.round, msg.seq, have))

    def on_forward(self, inbound: Inbound, msg: Message) -> None:
        slot = self.clients[msg.sender]
        if self.rounds is None:
            raise WireError(ErrorCode.NOT_READY, "the run has not started: waiting for all clients to register")
        slot.last_seen = time.monotonic()
        if msg.round < self.round or (msg.round == self.round and msg.sender in self.served):
            if slot.reply is not None and slot.reply[0] == msg.round:
                self.meter.count("repeated_requests")
                _, cached, dtype = slot.reply
                cached.seq = msg.seq
                self.reply(inbound, cached, wire.wire_name(dtype))
                return
            if msg.round == self.round:  # served, reply not sent yet (round still open): keep the newest envelope
                self.held[msg.sender] = (inbound.envelope, msg.seq)
                return
            raise self.stale(msg.round)
        if msg.round >= self.rounds:
            raise WireError(ErrorCode.STALE_ROUND, f"round {msg.round} is past the last round {self.rounds - 1}")
        if msg.round > self.round:  # ahead of the server (a resume): keep only its newest such request
            for r in [r for r, b in self.pending.items() if r > self.round and r != msg.round and msg.sender in b]:
                del self.pending[r][msg.sender]
                if not self.pending[r]:
                    del self.pending[r]
        bucket = self.pending.setdefault(msg.round, {})
        if msg.sender in bucket:
            self.meter.count("repeated_requests")
        bucket[msg.sender] = Request(inbound.envelope, msg)
        self.dropped.discard(msg.sender)

    def stale(self, r: int) -> WireError:
        err = WireError(ErrorCode.STALE_ROUND, f"round {r} is over (the server is at round {self.round})")
        err.meta = {"server_round": self.round}
        return err

    def on_bye(self, inbound: Inbound, msg: Message) -> None:
        self.byes[msg.sender] = (inbound.envelope, msg.seq)
        if self.rounds is not None and self.round >= self.rounds and len(self.byes) >= len(self.clients):
            self.complete_run()

    # ------------------------------------------------------------------ rounds

    def required(self) -> set[int]:
        """Clients the current round waits for: every registered one not dropped as a straggler,
        as long as those still make ``--min-clients`` (else all: the round may then fail)."""
        active = set(self.clients) - self.dropped
        return active if len(active) >= (self.cfg.net.min_clients or len(self.clients)) else set(self.clients)

    def maybe_process(self) -> None:
        if self.rounds is None or self.round >= self.rounds:
            return
        now = time.monotonic()
        bucket = self.pending.get(self.round, {})
        waiting = self.required() - self.served
        ready = sorted(c for c in bucket if c not in self.served)
        timeout = self.cfg.net.straggler_timeout_s
        if ready:
            first = min(bucket[c].arrived for c in ready)
            late = timeout and now - self.round_started > timeout  # stragglers must not wait for a full microbatch
            if set(ready) >= waiting or now - first >= self.cfg.net.microbatch_wait_ms / 1000 or late:
                self.process(ready)
                return
        if not ready and waiting and self._all_ahead(waiting):
            return
        if timeout and not ready and waiting and now - self.round_started > timeout:
            self._drop_stragglers(waiting, now - self.round_started)

    def _all_ahead(self, waiting: set[int]) -> bool:
        """After a resume from an older checkpoint, clients may already be past this round:
        move to the earliest round they are all waiting in (the rounds between are lost)."""
        ahead = {c: min(r for r, b in self.pending.items() if c in b and r > self.round)
                 for c in waiting if any(c in b and r > self.round for r, b in self.pending.items())}
        if set(ahead) != waiting:
            return False
        target = min(ahead.values())
        self.log.warning("clients are at round %d, the server at %d (resumed from an older checkpoint): "
                         "skipping rounds %d..%d", target, self.round, self.round, target - 1)
        self.meter.count("skipped_rounds", target - self.round)
        self.round, self.served, self.round_started = target, set(), time.monotonic()
        return True

    def _drop_stragglers(self, missing: set[int], waited: float) -> None:
        need = self.cfg.net.min_clients or len(self.clients)
        if len(self.served) >= need:
            self.log.warning("round %d: proceeding without client(s) %s (nothing within %.0fs)", self.round,
                             ", ".join(map(str, sorted(missing))), waited)
            self.meter.count("stragglers_dropped", len(missing))
            self.dropped |= missing
            self.close_round()
        elif self.served and waited > 3 * self.cfg.net.straggler_timeout_s:  # closing an empty round helps no one
            self.log.error("round %d failed: %d of the required %d clients sent in time (--min-clients %d); "
                           "moving on", self.round, len(self.served), need, need)
            self.meter.count("failed_rounds")
            self.dropped |= missing
            self.close_round(failed=True)

    def process(self, ids: list[int]) -> None:
        bucket = self.pending[self.round]
        requests = [bucket.pop(c) for c in ids]
        parts = [self.party.rows(q.msg.tensors, q.msg.sender, q.msg.round) for q in requests]
        res = self.party.process(parts, want_grad=self.method.client_trains)
        for q, grad, loss_sum, valid in zip(requests, res.grads, res.loss_sums, res.valid_rows):
            reply = wire.backward(self.origin, q.msg.round, q.msg.seq, loss_sum=loss_sum, valid_rows=valid, grad=grad)
            # replies leave only when the round is closed and checkpointed (see close_round)
            self.round_replies[q.msg.sender] = (reply, q.msg.tensors["act"].dtype)
            self.held[q.msg.sender] = (q.envelope, q.msg.seq)
            self.served.add(q.msg.sender)
        self._accumulate(res)
        acc = self.round_acc  # padded tokens per path, for the paper's communication accounting
        acc["act_tokens"] = acc.get("act_tokens", 0) + sum(p.act.shape[0] * p.act.shape[1] for p in parts)
        acc["ref_tokens"] = acc.get("ref_tokens", 0) + sum(p.ref_act.shape[0] * p.ref_act.shape[1]
                                                            for p in parts if p.ref_act is not None)
        if self.served >= self.required():
            self.close_round()

    def _accumulate(self, res) -> None:
        acc = self.round_acc
        acc["loss_sum"] = acc.get("loss_sum", 0.0) + sum(res.loss_sums)
        acc["rows"] = acc.get("rows", 0) + sum(res.valid_rows)
        acc["microbatches"] = acc.get("microbatches", 0) + 1
        merge_token_means(self.round_stats, {k: v for k, v in res.stats.items() if k != "rows"})

    def close_round(self, failed: bool = False) -> None:
        """Step at the end of a window, checkpoint, then release the round's replies.

        Replies go out after the checkpoint, so a server killed at any point and resumed
        never holds less than what some client has already received.
        """
        r = self.round
        stepped = is_step_round(r, self.rounds, self.cfg.train.grad_accum) and self.party.step()
        acc, self.round_acc = self.round_acc, {}
        stats, self.round_stats = self.round_stats, {}
        record = {"round": r, "rounds": self.rounds, "loss": mean_loss(acc.get("loss_sum", 0.0), acc.get("rows", 0)),
                  "rows": acc.get("rows", 0), "tokens": stats.pop("tokens", 0), "clients": sorted(self.served),
                  "microbatches": acc.get("microbatches", 0), "stepped": stepped, "failed": failed,
                  "act_tokens": acc.get("act_tokens", 0), "ref_tokens": acc.get("ref_tokens", 0),
                  "wall_s": self.meter.wall_s()}
        record.update(stats)  # per-token means of the round: nll, class fractions, mean weight
        self.record("round", **record)
        self.log.info("round %d/%d loss %.4f (%d client%s, %d microbatch%s)%s", r + 1, self.rounds, record["loss"],
                      len(self.served), "" if len(self.served) == 1 else "s", record["microbatches"],
                      "es" if record["microbatches"] > 1 else "", " step" if stepped else "")
        for cid, (reply, dtype) in self.round_replies.items():
            self.clients[cid].reply = (r, reply, dtype)
        replies, self.round_replies = self.round_replies, {}
        self.round += 1
        self.served, self.round_started = set(), time.monotonic()
        self.pending.pop(r, None)
        every = self.cfg.net.checkpoint_every
        if (every and self.round % every == 0) or self.round == self.rounds:
            self.save_checkpoint()
        for cid, (reply, dtype) in replies.items():
            envelope, seq = self.held.pop(cid, (None, reply.seq))
            if envelope is not None:
                reply.seq = seq
                self.chan.send(reply, envelope, wire.wire_name(dtype))
                self.clients[cid].reply_sent = time.monotonic()
        if self.round >= self.rounds and len(self.byes) >= len(self.clients):
            self.complete_run()

    def save_checkpoint(self) -> None:
        cache = {cid: {"round": s.reply[0], "meta": s.reply[1].meta, "dtype": wire.wire_name(s.reply[2]),
                       "grad": s.reply[1].tensors.get("grad")}
                 for cid, s in self.clients.items() if s.reply is not None}
        with self.meter.phase("checkpoint"):
            checkpoint.save(self.checkpoint_path, {
                "fingerprint": self.fingerprint, "party": self.party.state(), "round": self.round,
                "rounds": self.rounds, "clients": {cid: s.n_samples for cid, s in self.clients.items()},
                "sessions": dict(self.sessions.owner), "replies": cache})

    def complete_run(self) -> None:
        """All rounds served and every client said BYE: save, combine, answer DONE."""
        if self.done_at is None:
            from lesft import lora

            lora.save_adapters(self.party.adapters(), self.run_dir / SERVER_FILE,
                               adapter_meta(self.cfg, self.source, self.method))
            try:
                written = combine_run(self.run_dir, self.cfg, self.source, self.method)
                self.log.info("run complete: combined adapter at %s", written[0])
            except ValueError as e:  # the other side's files are on another machine
                self.log.info("run complete; not combined here (%s): run `lesft combine --run %s`", e, self.run_dir)
            mark_run(self.run_dir, complete=True, rounds=self.rounds)
            self.done_at = time.monotonic()
        for envelope, seq in self.byes.values():
            self.chan.send(wire.done(self.origin, seq), envelope)


class CentralizedServer(Worker):
    """Centralized SFT: the server alone trains the whole model on all clients' data."""

    role = "server"

    def __init__(self, cfg: Config) -> None:
        from lesft.engine import ClientParty
        from lesft.trainer import client_shards, party_layout

        super().__init__(cfg, 0)
        self.method = get_method(cfg.train.method)
        self.source = source_for(cfg)
        shards, batch_size = party_layout(self.method, cfg, client_shards(cfg))
        centralized = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, client_device=cfg.train.device))
        self.party = ClientParty(centralized, self.source, self.method, 0, shards[0], self.source.load_tokenizer(),
                                 batch_size=batch_size, meter=self.meter)
        self.meter.device = str(self.party.device)

    def run(self) -> int:
        from lesft.export import final_outputs
        from lesft.schedule import total_rounds

        rounds = total_rounds(self.cfg, [self.party.n_samples], self.party.batch_size)
        self.log.info("%s on %s: %d examples, %d rounds", self.method.label, self.party.device,
                      self.party.n_samples, rounds)
        try:
            for r in range(rounds):
                if self.stop.is_set():
                    return 0
                tl = self.party.local_step(r)
                stepped = is_step_round(r, rounds, self.cfg.train.grad_accum) and self.party.step()
                self.record("round", round=r, rounds=rounds, loss=float(tl.loss.detach()), stepped=stepped,
                            wall_s=self.meter.wall_s(), **tl.stats)
            final_outputs(self.run_dir, self.cfg, self.source, self.method, None, {-1: self.party.adapters()})
            mark_run(self.run_dir, complete=True, rounds=rounds)
        finally:
            self.finish()
        return 0
