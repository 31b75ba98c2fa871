"""The client role: tokenizer, embedding and the first k layers with LoRA, on the edge.

register -> per round: forward both paths, FORWARD, wait BACKWARD, backward, step;
every I rounds UPLOAD to the aggregator and load its ADAPTERS broadcast -> BYE.
With ``--pipeline-depth D`` the FORWARDs of up to D rounds of the current accumulation
window are in flight at once (the next round's forward runs while the server answers this
one); backwards run in round order, and the pipeline drains at the window's end, before
the step and the aggregation, so every forward uses the weights it uses at depth 1.
Label-private (``--label-private``), a round has two legs, FORWARD -> HIDDEN and
HEAD_GRAD -> BACKWARD, and the later rounds' FORWARDs stay in flight across both.
Text and the tokenizer never leave this process: the server sees activations and ids.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import replace
from typing import Callable

import zmq

from lesft import checkpoint, private, wire
from lesft.config import Config
from lesft.engine import ClientParty, run_fingerprint, sends_reference
from lesft.export import adapter_meta
from lesft.methods import get_method
from lesft.metrics import mean_loss
from lesft.models import source_for
from lesft.runs import client_file
from lesft.schedule import client_epochs, is_aggregation_round, is_step_round
from lesft.trainer import client_examples
from lesft.wire import ErrorCode, Message, MsgType, WireError
from workers.common import Worker
from workers.transport import NOTE_EVERY_S, Channel, Peer, Pipeline, WorkerError, make_socket, request


class Client(Worker):
    role = "client"

    def __init__(self, cfg: Config, client_id: int) -> None:
        if not 0 <= client_id < cfg.data.clients:
            raise WorkerError(f"--id {client_id} is outside 0..{cfg.data.clients - 1} (--clients {cfg.data.clients})")
        super().__init__(cfg, client_id)
        self.method = get_method(cfg.train.method)
        self.source = source_for(cfg)
        tok = self.source.load_tokenizer()
        examples, own = client_examples(cfg, client_id, tok)
        if own is not None:
            self.log.info("own data %s", own.describe())
        self.party = ClientParty(cfg, self.source, self.method, client_id, examples, tok,
                                 batch_size=cfg.train.batch_size, meter=self.meter)
        self.fingerprint, self.parts = run_fingerprint(cfg, self.source)
        self.seq = 0
        self.global_round = -1  # round of the last global adapters loaded
        state = self.load_state()
        # who speaks for this client id: kept across a restart through the state file
        self.session = state["session"] if state and state.get("session") else secrets.token_hex(16)
        self.origin = wire.Origin(self.role, self.id, self.run_id, self.session)

    # ------------------------------------------------------------------ sockets

    def _dealer(self, address: str):
        return lambda: make_socket(self.ctx, zmq.DEALER, self.cfg, connect=address, identity=f"client-{self.id}")

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def ask(self, peer: Peer, make: Callable[[int], Message], expect: set[MsgType], float_dtype: str | None = None,
            knows: wire.Knows = wire.Knows()) -> Message:
        """Send the message ``make(seq)`` builds (a :mod:`lesft.wire` constructor) and wait for its reply."""
        msg = make(self.next_seq())
        patience = self.cfg.net.register_timeout_s if msg.type == MsgType.HELLO else None  # the others' timeout too
        return request(peer, msg, expect, cfg=self.cfg, stop=self.stop, log=self.log, float_dtype=float_dtype,
                       patience_s=patience, knows=knows)

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        net = self.cfg.net
        self.server = Peer("server", self._dealer(net.broker_frontend), self.meter,
                           address=f"{net.broker_frontend} (via the broker)") if self.method.split else None
        self.agg = self.sub = None
        self.inflight = Pipeline(self.server, cfg=self.cfg, stop=self.stop, log=self.log,
                                 float_dtype=net.wire_dtype) if self.server is not None else None
        try:
            r, rounds = self.register()
            self.epochs = client_epochs(self.party.n_samples, self.party.batch_size, rounds)
            self.record("registered", n_samples=self.party.n_samples, rounds=rounds, epochs=self.epochs)
            while r < rounds:
                if self.stop.is_set():
                    self.log.info("stopping at round %d (signal)", r)
                    return 0
                try:
                    loss = self.train_round(r, rounds)
                except WireError as e:
                    if e.code != ErrorCode.STALE_ROUND:
                        raise
                    r = self.catch_up(r, int(e.meta.get("server_round", r + 1)), rounds)
                    continue
                if is_step_round(r, rounds, self.cfg.train.grad_accum):
                    self.party.step()
                aggregated = self.method.aggregate and is_aggregation_round(r, rounds, self.cfg.train.aggregate_every)
                if aggregated:
                    self.aggregate(r)
                self.save_state(r + 1)
                self.record("round", round=r, rounds=rounds, loss=loss, aggregated=aggregated,
                            wall_s=self.meter.wall_s())
                r += 1
            self.shutdown()
        finally:
            for peer in (self.server, self.agg):
                if peer is not None:
                    peer.close()
            if self.sub is not None:
                self.sub.close()
            self.finish(steps=self.party.steps, n_samples=self.party.n_samples, epochs=getattr(self, "epochs", None))
        return 0

    # ------------------------------------------------------------------ state

    @property
    def state_path(self):
        return self.run_dir / f"client-{self.id}-state.pt"

    def save_state(self, next_round: int) -> None:
        """After every round: enough to resume exactly after a crash (adapters, optimiser, grads)."""
        with self.meter.phase("checkpoint"):
            checkpoint.save(self.state_path, {"round": next_round, "fingerprint": self.fingerprint,
                                              "session": self.session, "party": self.party.state()})

    def load_state(self) -> dict | None:
        state = checkpoint.load(self.state_path)
        if state is not None and state.get("fingerprint") != self.fingerprint:
            self.log.warning("ignoring %s: written with other settings", self.state_path)
            return None
        return state

    def catch_up(self, r: int, server_round: int, rounds: int) -> int:
        """Left out of rounds r..server_round-1 (a straggler): continue where the server is."""
        self.log.warning("left out of round(s) %d..%d (straggler timeout): continuing at round %d", r,
                         server_round - 1, server_round)
        self.meter.count("rounds_missed", server_round - r)
        self.party.pending.clear()
        self.inflight.clear()  # rounds still valid are sent again: the server takes repeats
        # a window that spans the gap would step on gradients from before it: start afresh
        if any(is_step_round(x, rounds, self.cfg.train.grad_accum) for x in range(r, server_round)):
            self.party.discard_window()
        self.load_latest_global(r, server_round, rounds)
        return server_round

    def load_latest_global(self, first: int, upto: int, rounds: int) -> None:
        """Load the global adapters of the last aggregation round in [first, upto)."""
        if not self.method.aggregate:
            return
        missed = [x for x in range(first, upto) if is_aggregation_round(x, rounds, self.cfg.train.aggregate_every)]
        if missed:
            try:
                self.load_global(self.fetch(missed[-1]))
            except WireError as e:  # that aggregation failed (--min-clients): as in aggregate()
                if e.code != ErrorCode.STALE_ROUND:
                    raise
                self.log.warning("%s: keeping this client's own adapters", e.text)
                self.meter.count("aggregations_failed")

    def register(self) -> tuple[int, int]:
        """HELLO to the server (and the aggregator); returns (first round, total rounds).

        A restarted client resumes from its saved state; a client joining a run that has
        already started begins at the server's round with the latest global adapters.
        """
        def hello(seq: int) -> Message:
            return wire.hello(self.origin, seq, client_id=self.id, n_samples=self.party.n_samples,
                              fingerprint=self.fingerprint, parts=self.parts)

        if self.server is not None:
            self.log.info("registering with the server via the broker at %s", self.cfg.net.broker_frontend)
            welcome = self.ask(self.server, hello, {MsgType.WELCOME})
            server_round, rounds = int(welcome.meta["round"]), int(welcome.meta["rounds"])
        else:
            server_round, rounds = -1, None
        if self.method.aggregate:
            ack = self.join_aggregator(hello)
            if rounds is None:  # no server: the aggregator decides from every client's size
                rounds = int(ack.meta.get("rounds") or self._local_rounds())
        if rounds is None:
            rounds = self._local_rounds()
        state = self.load_state()
        if state is not None and (server_round != 0 or state["round"] == 0):
            self.party.restore(state["party"])
            start = int(state["round"])
            self.log.info("resumed from %s at round %d", self.state_path, start)
        else:
            start = max(server_round, 0)
            self.load_latest_global(0, start, rounds)
        self.save_state(start)  # also keeps the session, so a restart speaks as this client again
        self.log.info("registered: rounds %d..%d", start, rounds - 1)
        return start, rounds

    def _local_rounds(self) -> int:
        from lesft.schedule import total_rounds

        return total_rounds(self.cfg, [self.party.n_samples], self.party.batch_size)

    def train_round(self, r: int, rounds: int) -> float:
        """Round r: its FORWARD (and those of the next rounds of its window, up to the
        pipeline depth) out, its BACKWARD in, its backward; returns its mean loss. Label-private,
        the FORWARD is answered with HIDDEN and this client's HEAD_GRAD with the BACKWARD."""
        if self.server is None:
            return float(self.party.local_step(r).loss.detach())
        while True:
            for x in self.rounds_to_send(r, rounds):
                self.send_forward(x)
            reply, loss = self.inflight.wait(r), None
            if reply.type != MsgType.HIDDEN:
                break
            try:
                reply, loss = self.head_grad(r, reply)
                break
            except WireError as e:
                self.forward_lost(r, e)
        valid = reply.meta["valid_rows"]
        self.party.backward(reply.tensors.get("grad"), valid, r)
        if loss is not None:
            return loss
        # label-private, a round answered before this client restarted: its loss went with that process
        return float("nan") if reply.meta.get("loss_sum") is None else mean_loss(reply.meta["loss_sum"], valid)

    def rounds_to_send(self, r: int, rounds: int) -> list[int]:
        """The rounds from r on to have in flight: up to ``--pipeline-depth``, never past the
        end of r's accumulation window (the weights change there: aggregation rounds are
        step rounds too), less those in flight already."""
        window: list[int] = []
        for x in range(r, min(r + self.cfg.train.pipeline_depth, rounds)):
            window.append(x)
            if is_step_round(x, rounds, self.cfg.train.grad_accum):
                break
        return [x for x in window if x not in self.inflight]

    def send_forward(self, r: int) -> None:
        """Client forward of round r, sent without waiting (its graph waits in the party).
        Label-private: without label ids, answered with HIDDEN (or, a round answered before
        a restart, BACKWARD)."""
        rows = self.party.forward(r)
        knows = wire.Knows(grad_shape=tuple(rows.act.shape) if self.method.client_trains else None)
        expect = {MsgType.BACKWARD}
        if self.cfg.model.label_private:
            w, w_ref = private.widths(rows, everywhere=self.cfg.model.client_tail_layers > 0)
            knows = replace(knows, private=True, reference=sends_reference(self.method, self.cfg),
                            hidden_shape=(len(rows), w), ref_hidden_shape=(len(rows), w_ref))
            rows, expect = private.without_labels(rows), {MsgType.HIDDEN, MsgType.BACKWARD}
        if self.inflight.sent:
            self.meter.count("forwards_ahead")  # sent while an earlier round is still awaited
        self.inflight.send(wire.forward(self.origin, r, self.next_seq(), rows), expect, knows)

    def head_grad(self, r: int, hidden: Message) -> tuple[Message, float]:
        """Label-private, round r's second leg: this client's loss and dL/dH from the server's
        HIDDEN, sent as HEAD_GRAD while the next rounds stay in flight; returns the BACKWARD and
        the round's mean loss."""
        tl, grad = private.client_loss(self.party, r, hidden.tensors["hidden"], hidden.tensors.get("ref_hidden"))
        self.inflight.follow(wire.head_grad(self.origin, r, self.next_seq(), grad), {MsgType.BACKWARD})
        return self.inflight.wait(r), float(tl.loss.detach())

    def forward_lost(self, r: int, e: WireError) -> None:
        """A HEAD_GRAD refused because the server holds no forward of round r while the round is
        still open (it restarted, or gave up waiting for this HEAD_GRAD): round r goes again from
        its FORWARD (the same rows: nothing of it reached this client's gradients yet), with the
        server's reason in one line. A round that went on without this client (a straggler)
        re-raises, for :meth:`catch_up`."""
        if e.code != ErrorCode.STALE_ROUND or int(e.meta.get("server_round", r + 1)) > r:
            raise e
        self.log.warning("round %d: %s; sending the round again", r, e.text)
        self.meter.count("rounds_resent")

    # ------------------------------------------------------------------ aggregation

    def join_aggregator(self, hello: Callable[[int], Message]) -> Message:
        """Subscribe, wait until the subscription is live (a heartbeat arrives), then HELLO.

        The aggregator therefore knows every registered client is a connected subscriber
        before it broadcasts anything.
        """
        net = self.cfg.net
        self.agg = Peer("aggregator", self._dealer(net.aggregator_address), self.meter, prefix="agg.",
                        address=net.aggregator_address)
        sub = make_socket(self.ctx, zmq.SUB, self.cfg, connect=net.aggregator_pub, identity=f"client-{self.id}")
        sub.setsockopt(zmq.SUBSCRIBE, MsgType.ADAPTERS.value.encode())
        sub.setsockopt(zmq.SUBSCRIBE, MsgType.HEARTBEAT.value.encode())
        self.sub = Channel(sub, self.meter, routed=False, topic=True, prefix="agg.")
        started = time.monotonic()
        next_note = started + NOTE_EVERY_S
        self.log.info("registering with the aggregator at %s", net.aggregator_address)
        while not self.sub.sock.poll(200):
            now = time.monotonic()
            if self.stop.is_set() or now - started > net.register_timeout_s:
                raise WorkerError(f"no broadcast from the aggregator at {net.aggregator_pub} within "
                                  f"{net.register_timeout_s:.0f} s (--register-timeout-s): is it running?")
            if now >= next_note:
                next_note = now + NOTE_EVERY_S
                self.log.info("waiting for the aggregator's broadcasts at %s for %.0f s (giving up after %.0f s, "
                              "--register-timeout-s)", net.aggregator_pub, now - started, net.register_timeout_s)
        return self.ask(self.agg, hello, {MsgType.ACK})

    def aggregate(self, r: int) -> None:
        """UPLOAD this client's adapters for round r; load the global adapters of round r."""
        try:
            self.ask(self.agg, lambda seq: wire.upload(self.origin, r, seq, n_samples=self.party.n_samples,
                                                       adapters=self.party.adapters()), {MsgType.ACK})
            got = self.wait_broadcast(r)
            self.load_global(got if got is not None else self.fetch(r))
        except WireError as e:
            if e.code != ErrorCode.STALE_ROUND:
                raise
            self.log.warning("%s: keeping this client's own adapters", e.text)
            self.meter.count("aggregations_failed")

    def wait_broadcast(self, r: int) -> Message | None:
        deadline = time.monotonic() + self.cfg.net.request_timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            if not self.sub.sock.poll(100):
                continue
            msg = self.sub.recv().msg
            if msg is None or msg.type != MsgType.ADAPTERS or msg.round < r:
                continue
            try:
                wire.check(msg, wire.Knows())
            except WireError as e:
                raise unusable_adapters(msg, e) from None
            return msg
        return None

    def fetch(self, r: int) -> Message:
        """Ask the aggregator for the global adapters of round r (-1: the latest)."""
        return self.ask(self.agg, lambda seq: wire.fetch(self.origin, r, seq), {MsgType.ADAPTERS})

    def load_global(self, msg: Message) -> None:
        """Load checked global adapters (a broadcast, or the answer to a FETCH)."""
        try:
            self.party.load_adapters(msg.tensors)
        except ValueError as e:
            raise unusable_adapters(msg, e) from None
        self.global_round = msg.round

    # ------------------------------------------------------------------ end

    def shutdown(self) -> None:
        """Save what only this client has, then BYE; the server answers DONE once all are done."""
        if self.method.client_trains and not self.method.aggregate:
            from lesft.lora import save_adapters

            save_adapters(self.party.adapters(), self.run_dir / client_file(self.id),
                          adapter_meta(self.cfg, self.source, self.method))
        # the server first: its DONE means its files are saved; the aggregator's BYE comes
        # last, so under honcho no other role can exit (and stop the rest) before that
        if self.server is not None:
            self.ask(self.server, lambda seq: wire.bye(self.origin, seq), {MsgType.DONE})
        if self.agg is not None:
            self.ask(self.agg, lambda seq: wire.bye(self.origin, seq), {MsgType.ACK})
        self.log.info("done")


def unusable_adapters(msg: Message, e: Exception) -> WorkerError:
    return WorkerError(f"the aggregator's adapters of round {msg.round} are unusable ({e})")
