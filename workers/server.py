"""The server role: layers[k:] + norm + head with LoRA, behind the broker.

It registers clients (HELLO, fingerprint check), then serves rounds: FORWARDs run as
microbatches, each client gets its own slice of dL/dS back when the round closes (an
optimiser step at the end of an accumulation window, a checkpoint). When a round is
ready, closed or failed, and what a repeated request gets, is :mod:`lesft.rounds`'s
decision; this loop moves the bytes and runs the model.
"""

from __future__ import annotations

import functools
import time

import zmq

from lesft import checkpoint, private, wire
from lesft.config import Config
from lesft.engine import ServerParty, run_fingerprint, sends_reference
from lesft.lora import save_adapters
from lesft.methods import get_method
from lesft.metrics import RoundTally
from lesft.models import source_for
from lesft.export import adapter_meta, combine_run
from lesft.rounds import STALE_ROUND, Policy, Refused, Request, Rounds, Send, Verdict, Welcome
from lesft.runs import SERVER_FILE, mark_run
from lesft.schedule import client_sizes, is_step_round, total_rounds
from lesft.wire import ErrorCode, Message, MsgType, WireError
from workers.common import Sessions, Worker, check_fingerprint
from workers.transport import NOTE_EVERY_S, SERVER_ROUTING_ID, Channel, Inbound, WorkerError, make_socket


class Server(Worker):
    role = "server"

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
        self.knows = wire.Knows(model=limits, reference=sends_reference(self.method, cfg),
                                private=cfg.model.label_private)
        self.held = private.Held()  # label-private microbatches waiting for their dL/dH
        self.expected = cfg.data.clients
        self.rounds = Rounds(Policy.from_config(cfg), functools.partial(total_rounds, cfg),
                             depth=cfg.train.pipeline_depth, batch_wait_s=cfg.net.microbatch_wait_ms / 1000,
                             resend_after_s=2 * cfg.net.heartbeat_s, count=self.meter.count)
        self.tally = RoundTally()
        self.done_at: float | None = None
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
        self.rounds.restore(state["rounds_state"], time.monotonic())
        self.sessions.owner.update({int(c): s for c, s in state.get("sessions", {}).items()})
        self.log.info("resumed from %s at round %d of %d", self.checkpoint_path, self.rounds.current, self.rounds.total)

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
                      self.party.device, self.party.k, self.party.end - 1, self.source.n_layers,
                      self.expected, self.cfg.net.broker_backend)
        started, next_note = time.monotonic(), NOTE_EVERY_S
        try:
            while not self.stop.is_set():
                if self.chan.sock.poll(50):
                    self.dispatch(self.chan.recv())
                    while self.chan.sock.poll(0):  # drain what is queued before computing
                        self.dispatch(self.chan.recv())
                self.advance()
                now = time.monotonic()
                if not self.rounds.started:
                    next_note = self._registering(now - started, next_note)
                if self.done_at is not None and now - self.done_at > self.cfg.net.done_linger_s:
                    break
        finally:
            self.chan.close()
            self.finish(rounds=self.rounds.total, round=self.rounds.current, steps=self.party.steps)
        return 0

    def _registering(self, waited: float, next_note: float) -> float:
        """Past --register-timeout-s without every client, give up; past ``next_note``, say
        which clients the run waits for. Returns when to say it next."""
        missing, n = ", ".join(map(str, self.rounds.unregistered())), len(self.rounds.sizes)
        limit = self.cfg.net.register_timeout_s
        if waited > limit:
            raise WorkerError(f"client(s) {missing} did not register within {limit:.0f} s (--register-timeout-s; "
                              f"{n}/{self.expected} registered): start them with the same --run-id and "
                              f"--broker-frontend, or run with --clients {n or 1}")
        if waited <= next_note:
            return next_note
        self.log.info("waiting for client(s) %s (%d/%d registered) for %.0f s; giving up after %.0f s "
                      "(--register-timeout-s)", missing, n, self.expected, waited, limit)
        return waited + NOTE_EVERY_S

    @property
    def handlers(self) -> dict:
        handlers = {MsgType.HELLO: self.on_hello, MsgType.FORWARD: self.on_forward,
                    MsgType.HEARTBEAT: self.on_heartbeat, MsgType.BYE: self.on_bye}
        if self.cfg.model.label_private:
            handlers[MsgType.HEAD_GRAD] = self.on_head_grad
        return handlers

    def dispatch(self, inbound: Inbound) -> None:
        self.serve(self.chan, inbound, self.handlers, self.sessions)

    def send(self, out: Send | Welcome) -> None:
        """A reply the round engine released, or a WELCOME."""
        if isinstance(out, Welcome):
            self.chan.send(wire.welcome(self.origin, out.seq, rounds=self.rounds.total, round=self.rounds.current,
                                        clients=self.expected), out.reply_to)
            return
        v = out.value  # label-private: loss_sum is None, the server does not know the loss
        reply = wire.backward(self.origin, out.round, out.seq, loss_sum=v["loss_sum"], valid_rows=v["valid_rows"],
                              grad=v["grad"])
        self.chan.send(reply, out.reply_to, v["dtype"])

    # ------------------------------------------------------------------ handlers

    def on_hello(self, inbound: Inbound, msg: Message) -> None:
        cid = msg.meta["client_id"]
        if cid != msg.sender or cid >= self.expected:
            raise WireError(ErrorCode.UNKNOWN_CLIENT, f"client id {cid} is outside 0..{self.expected - 1} "
                                                      f"(the server runs --clients {self.expected})")
        check_fingerprint(msg, self.fingerprint, self.parts)
        self.sessions.register(cid, msg.meta.get("session"), self.log)
        joined = self.rounds.register(cid, msg.meta["n_samples"], msg.seq, inbound.envelope, time.monotonic())
        if joined.new:
            self.log.info("client %d registered (%d samples, %d/%d)", cid, msg.meta["n_samples"],
                          len(self.rounds.sizes), self.expected)
        elif joined.again:
            self.log.info("client %d registered again (restarted?): continuing at round %d", cid,
                          self.rounds.current)
        if joined.started:
            self.log.info("all %d clients registered: %d rounds", self.expected, self.rounds.total)
            self.record("clients", rounds=self.rounds.total,
                        **client_sizes(self.rounds.sizes, self.cfg.train.batch_size, self.rounds.total))
        for welcome in joined.welcome:
            self.send(welcome)

    def on_heartbeat(self, inbound: Inbound, msg: Message) -> None:
        """Answer a waiting client: ``have`` says whether its request (round, seq) is held
        here; a request that was lost on the way (broker restart, no server yet) is then
        sent again. A reply that was lost is sent again from the cache."""
        have, again = self.rounds.heartbeat(msg.sender, msg.round, msg.seq, inbound.envelope, time.monotonic())
        if again is not None:
            self.send(again)
        self.chan.send(wire.heartbeat(self.origin, msg.round, msg.seq, have), inbound.envelope)

    def on_forward(self, inbound: Inbound, msg: Message) -> None:
        cached = self.rounds.request(Request(msg.sender, msg.round, msg.seq, inbound.envelope, msg, time.monotonic()))
        if cached is not None:
            self.send(cached)
        elif (held := self.held.hidden(msg.sender, msg.round)) is not None:  # label-private: HIDDEN lost
            self.send_hidden(msg.sender, msg.round, msg.seq, inbound.envelope, held)

    def on_head_grad(self, inbound: Inbound, msg: Message) -> None:
        """Label-private: a client's dL/dH for the HIDDEN of its round. Taken by the round engine
        like a repeat of its FORWARD (the reply, BACKWARD, goes to this seq; a repeat of an
        answered one gets it from the cache); the microbatch is backpropagated once every part
        has its gradient."""
        c, r = msg.sender, msg.round
        if (c, r) not in self.rounds.cache and not self.rounds.holds(c, r):
            raise Refused(STALE_ROUND, f"the server holds no forward of round {r}: {self.why_not_held(c, r)}",
                          server_round=max(r, self.rounds.current))
        cached = self.rounds.request(Request(c, r, msg.seq, inbound.envelope, msg, time.monotonic()))
        if cached is not None:
            self.send(cached)
        elif self.held.waiting(c, r):  # else its microbatch is done: the reply comes when the round closes
            try:
                ready = self.held.give(c, r, msg.tensors["grad"])
            except ValueError as e:
                raise WireError(ErrorCode.BAD_SHAPE, str(e)) from None
            if ready is not None:
                self.finish_private(*ready)

    def why_not_held(self, client: int, r: int) -> str:
        """Why a HEAD_GRAD finds no forward here, in the client's words."""
        if self.rounds.abandoned(client, r):
            return "it gave up waiting for this client's dL/dH (--straggler-timeout-s)"
        if r < self.rounds.current:
            return "the round went on without this client"
        return "it restarted since it sent the hidden states"

    def send_hidden(self, client: int, r: int, seq: int, reply_to: list, tensors: tuple) -> None:
        """Label-private: the server layers' output at a client's target positions."""
        hidden, ref = tensors
        self.chan.send(wire.hidden(self.origin, r, seq, hidden=hidden, ref_hidden=ref), reply_to,
                       self.cfg.net.wire_dtype)

    def on_bye(self, inbound: Inbound, msg: Message) -> None:
        if self.rounds.bye(msg.sender, msg.seq, inbound.envelope):
            self.complete_run()

    # ------------------------------------------------------------------ rounds

    def advance(self) -> None:
        """What the round engine says now: skip to where the clients are, run a microbatch,
        close a round."""
        now = time.monotonic()
        skipped = self.rounds.skip_ahead(now)
        if skipped:
            self.log.warning("clients are at round %d, the server at %d (resumed from an older checkpoint): "
                             "skipping rounds %d..%d", skipped.stop, skipped.start, skipped.start, skipped.stop - 1)
        r = self.rounds.current
        for client in self.rounds.abandon(now, self.held.missing(r)):  # label-private: its dL/dH never came
            self.log.warning("round %d: no dL/dH from client %d in time: going on without it", r, client)
            if (ready := self.held.give(client, r, None)) is not None:
                self.finish_private(*ready)
        if batch := self.rounds.ready(now):
            self.process(batch)
        if verdict := self.rounds.verdict(time.monotonic()):
            self.close_round(verdict)

    def process(self, batch: list[Request]) -> None:
        """Run one microbatch; each client's reply waits in the engine until its round closes."""
        msgs = [q.payload for q in batch]
        parts = [self.party.rows(m.tensors, m.sender, m.round) for m in msgs]
        if self.cfg.model.label_private:
            self.forward_private(batch, parts)
            return
        res = self.party.process(parts, want_grad=self.method.client_trains)
        for m, grad, loss_sum, valid in zip(msgs, res.grads, res.loss_sums, res.valid_rows):
            self.rounds.result(m.sender, m.round, backward_reply(loss_sum, valid, grad, m.tensors["act"]),
                               time.monotonic())
        self.tally.add(parts, res)

    def forward_private(self, batch: list[Request], parts: list) -> None:
        """Label-private: run the microbatch up to the last server layer, send each client its
        HIDDEN now; the graph waits in ``self.held`` for their dL/dH."""
        held = private.server_forward(self.party, parts, want_grad=self.method.client_trains)
        self.held.add(held, [(q.client, q.round) for q in batch])
        for q, tensors in zip(batch, held.hidden):
            self.send_hidden(q.client, q.round, q.seq, q.reply_to, tensors)

    def finish_private(self, held: private.HeldForward, grads: list) -> None:
        """Label-private: backpropagate a microbatch's dL/dH; each client's BACKWARD (dL/dS, no
        loss: only the client knows it) waits in the engine until its round closes."""
        res = private.server_backward(self.party, held, grads)
        now = time.monotonic()
        for (client, r), part, grad, valid, given in zip(held.keys, held.parts, res.grads, res.valid_rows, grads):
            if given is not None:
                self.rounds.result(client, r, backward_reply(None, valid, grad, part.act), now)
        self.tally.add(held.parts, res)

    def close_round(self, verdict: Verdict) -> None:
        """Step at the end of a window, checkpoint, then release the round's replies: after the
        checkpoint, so a server killed and resumed never holds less than a client received."""
        r, total, need = verdict.round, self.rounds.total, self.rounds.policy.need
        if verdict.failures and verdict.accepted:
            self.log.warning("round %d: proceeding without client(s) %s (nothing within %.0fs)", r,
                             ", ".join(map(str, verdict.failures)), verdict.waited)
        elif not verdict.accepted:
            self.log.error("round %d failed: %d of the required %d clients sent in time (--min-clients %d); "
                           "moving on", r, len(verdict.results), need, need)
        stepped = is_step_round(r, total, self.cfg.train.grad_accum) and self.party.step()
        record = {"round": r, "rounds": total, **self.tally.close(), "clients": sorted(verdict.results),
                  "stepped": stepped, "failed": not verdict.accepted, "wall_s": self.meter.wall_s()}
        self.record("round", **record)
        n, mb = len(verdict.results), record["microbatches"]
        self.log.info("round %d/%d loss %.4f (%d client%s, %d microbatch%s)%s", r + 1, total, record["loss"], n,
                      "" if n == 1 else "s", mb, "es" if mb > 1 else "", " step" if stepped else "")
        self.rounds.close(verdict, time.monotonic())
        every = self.cfg.net.checkpoint_every
        if (every and self.rounds.current % every == 0) or not self.rounds.serving:
            self.save_checkpoint()
        for out in self.rounds.release(time.monotonic()):
            self.send(out)
        if self.rounds.complete:
            self.complete_run()

    def save_checkpoint(self) -> None:
        with self.meter.phase("checkpoint"):
            checkpoint.save(self.checkpoint_path, {
                "fingerprint": self.fingerprint, "party": self.party.state(), "rounds_state": self.rounds.snapshot(),
                "sessions": dict(self.sessions.owner)})

    def complete_run(self) -> None:
        """All rounds served and every client said BYE: save, combine, answer DONE."""
        if self.done_at is None:
            save_adapters(self.party.adapters(), self.run_dir / SERVER_FILE,
                          adapter_meta(self.cfg, self.source, self.method))
            try:
                written = combine_run(self.run_dir, self.cfg, self.source, self.method)
                self.log.info("run complete: combined adapter at %s", written[0])
            except ValueError as e:  # the other side's files are on another machine
                self.log.info("run complete; not combined here (%s): run `lesft combine --run %s`", e, self.run_dir)
            mark_run(self.run_dir, complete=True, rounds=self.rounds.total)
            self.done_at = time.monotonic()
        for envelope, seq in self.rounds.byes.values():
            self.chan.send(wire.done(self.origin, seq), envelope)


def backward_reply(loss_sum: float | None, valid: int, grad, act) -> dict:
    """What the round engine keeps for a client's BACKWARD: its sums, dL/dS, and the wire dtype
    of the request's activations (the reply goes back in the dtype it came in)."""
    return {"loss_sum": loss_sum, "valid_rows": valid, "grad": grad, "dtype": wire.wire_name(act.dtype)}
