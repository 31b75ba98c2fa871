"""The round bookkeeping of the server and the aggregator: one state machine without I/O.

Events and the time go in, decisions come out; the caller owns the sockets, the clock and
the model (the shape of h11):

- :meth:`Rounds.register`: a HELLO. The run's rounds are fixed once every expected client
  has registered; the registrations to answer with WELCOME come back.
- :meth:`Rounds.request`: a request for (client, round) arrived. It is taken (to run, or,
  a repeat of one in progress, nothing runs twice), answered from the reply cache (a
  repeat of an answered one), or :class:`Refused` (its round is over, or past the last).
- :meth:`Rounds.ready`: the requests to run now, as one microbatch.
- :meth:`Rounds.result`: what running a request gave (its reply, held until the round
  closes), or a result the client sent itself (an upload).
- :meth:`Rounds.verdict`: a round that closes now: its results, its failures (the clients
  it waited for in vain) and whether it is accepted, kept apart as Flower does;
  :meth:`Rounds.close` commits it, :meth:`Rounds.release` hands out its replies (after
  the caller saved what must survive a crash).
- :meth:`Rounds.heartbeat`, :meth:`Rounds.bye`: a waiting client's beat, a client's end.

Rounds come in two orders. *Sequential* (the server, which steps one model): one round is
open at a time, in order; its straggler clock starts when it opens; requests for later
rounds wait for it; a client left out as a straggler is not waited for again until it
sends. *Independent* (the aggregator): every round up to ``window`` past the last outcome
may be open; its clock starts with its first result. The straggler / ``--min-clients``
rule is :class:`Policy`, the same for both.

Everything is keyed by (client, round): one client may have ``depth`` rounds in flight
(``--pipeline-depth``: requests ahead of the open round wait queued and run, in round
order, once their round opens; the replies of its newest ``depth`` rounds are kept for
repeats). Rows are still grouped per round, so the results do not depend on the depth.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# refusals carry the wire error code the peer gets (values of lesft.wire.ErrorCode)
STALE_ROUND = "stale_round"
NOT_READY = "not_ready"


class Refused(Exception):
    """A request the rounds do not take: ``code`` is the wire error code for the peer,
    ``meta`` goes with it (``server_round``: where a client left behind continues)."""

    def __init__(self, code: str, text: str, **meta: Any) -> None:
        super().__init__(text)
        self.code, self.text, self.meta = code, text, meta


class Decision(enum.Enum):
    WAIT = "wait"
    ACCEPT = "accept"
    FAIL = "fail"


@dataclass(frozen=True)
class Policy:
    """When a round closes without every client (Flower's ``accept_failures`` and minimum
    completion), written once for the server and the aggregator."""

    expected: int  # --clients
    straggler_timeout_s: float = 0.0  # 0: wait for every client, however long
    min_clients: int = 0  # fewest results a round may close with (0: all)
    fail_after: float = 3.0  # x the straggler timeout: a round still short of min_clients fails

    @classmethod
    def from_config(cls, cfg) -> Policy:
        return cls(cfg.data.clients, cfg.net.straggler_timeout_s, cfg.net.min_clients)

    @property
    def need(self) -> int:
        return self.min_clients or self.expected

    def overdue(self, waited: float) -> bool:
        """Past the straggler timeout (never, without one)."""
        return bool(self.straggler_timeout_s) and waited > self.straggler_timeout_s

    def decide(self, results: int, waited: float) -> Decision:
        """A round still missing clients after ``waited`` seconds, holding ``results``: close
        it with what it has, give it up (still short of ``need`` long after the timeout), or
        wait. A round without any result is never closed: that helps no one."""
        if not results or not self.overdue(waited):
            return Decision.WAIT
        if results >= self.need:
            return Decision.ACCEPT
        if waited > self.fail_after * self.straggler_timeout_s:
            return Decision.FAIL
        return Decision.WAIT


@dataclass
class Request:
    """A client's request for a round. ``reply_to`` (where its answer goes) and ``payload``
    (what to run) belong to the caller: an envelope and a message, opaque here."""

    client: int
    round: int
    seq: int
    reply_to: Any = None
    payload: Any = None
    arrived: float = 0.0
    started: float = math.inf  # when ready() handed it out to run


@dataclass
class Result:
    """A client's result for a round: a reply (with where, and under which seq, it goes) or
    what the client sent itself (no ``reply_to``). ``sent``: when the reply last went out."""

    value: Any
    reply_to: Any = None
    seq: int = 0
    sent: float = math.inf  # not out yet: never "lost"


@dataclass(frozen=True)
class Send:
    """A reply to send now: ``value`` answers (client, round) under ``seq``, to ``reply_to``."""

    client: int
    round: int
    seq: int
    reply_to: Any
    value: Any


@dataclass(frozen=True)
class Welcome:
    """A registration to answer: the HELLO's seq and where it came from."""

    client: int
    seq: int
    reply_to: Any


@dataclass(frozen=True)
class Joined:
    new: bool  # this client's first HELLO
    again: bool  # welcomed before in a started run: a restarted client
    started: bool  # this HELLO completed the registrations: the rounds are fixed now
    welcome: list[Welcome]


@dataclass
class Round:
    number: int
    opened: float = 0.0  # when it opened (the previous round closed)
    first_seen: float = math.inf  # when its first request or result arrived
    requests: dict[int, Request] = field(default_factory=dict)  # waiting to run
    running: dict[int, Request] = field(default_factory=dict)  # handed out by ready(), no result yet
    results: dict[int, Result] = field(default_factory=dict)  # replies held until the round closes
    abandoned: set[int] = field(default_factory=set)  # clients whose running request abandon() gave up

    @property
    def idle(self) -> bool:
        return not (self.requests or self.running or self.results)

    def waited(self, now: float) -> float:
        """How long it has waited for its stragglers: from when it was both open and had a
        first request or result. A round opened while every client was busy elsewhere (the
        aggregation before it, a slow server) has no straggler yet: the clients that come
        together after that wait are all on time."""
        return now - max(self.opened, self.first_seen)


@dataclass(frozen=True)
class Verdict:
    """A round that closes now: ``results`` by client, ``failures`` (the clients it waited
    for that sent nothing), ``accepted`` (False: a failed round), after ``waited`` seconds."""

    round: int
    results: dict[int, Any]
    failures: tuple[int, ...]
    accepted: bool
    waited: float


class Rounds:
    """Registrations, requests, results and outcomes of every round of one run.

    ``plan`` gives the number of rounds from the clients' sizes |D_i|. ``window``: how far
    past the last outcome independent rounds are taken (None: sequential rounds, up to the
    last). ``batch_wait_s``: longest a request waits for a fuller microbatch.
    ``resend_after_s``: how long a reply may go unacknowledged before a heartbeat asking for
    it gets it again. ``count(name, n)`` receives the events worth counting.
    """

    def __init__(self, policy: Policy, plan: Callable[[Sequence[int]], int], *, window: int | None = None,
                 depth: int = 1, batch_wait_s: float = 0.0, resend_after_s: float = math.inf,
                 count: Callable[[str, int], None] | None = None) -> None:
        self.policy, self.plan, self.window, self.depth = policy, plan, window, depth
        self.sequential = window is None
        self.batch_wait_s, self.resend_after_s = batch_wait_s, resend_after_s
        self.count = count or (lambda name, n=1: None)
        self.sizes: dict[int, int] = {}  # client -> n_samples
        self.total: int | None = None  # rounds of the run, once every client registered
        self.current = 0  # sequential: the open round
        self.open: dict[int, Round] = {}
        self.cache: dict[tuple[int, int], Result] = {}  # (client, round) -> the reply it got
        self.dropped: set[int] = set()  # sequential: stragglers not waited for until they send
        self.failed: dict[int, str] = {}  # round -> why it failed
        self.last_closed: int | None = None  # the last accepted round
        self.byes: dict[int, tuple[Any, int]] = {}  # client -> (reply_to, seq) of its BYE
        self._hellos: dict[int, tuple[int, Any]] = {}  # client -> (seq, reply_to) of its last HELLO
        self._welcomed: set[int] = set()
        self._unsent: list[Send] = []

    # ------------------------------------------------------------------ registration

    @property
    def started(self) -> bool:
        return self.total is not None

    @property
    def serving(self) -> bool:
        """Sequential: rounds are left to run."""
        return self.total is not None and self.current < self.total

    @property
    def complete(self) -> bool:
        """Every client said BYE (and, sequential, every round is closed)."""
        done = not self.sequential or (self.started and not self.serving)
        return done and len(self.byes) >= self.policy.expected

    def unregistered(self) -> list[int]:
        return sorted(set(range(self.policy.expected)) - set(self.sizes))

    def register(self, client: int, n_samples: int, seq: int, reply_to: Any, now: float) -> Joined:
        """A HELLO of a valid client id. Registrations wait until every expected client has
        registered; then each is welcomed once, and a late joiner (or a restarted client)
        at once, at the open round."""
        new = client not in self.sizes
        again = not new and self.started and client in self._welcomed
        self.sizes[client] = n_samples
        self._hellos[client] = (seq, reply_to)
        started = not self.started and len(self.sizes) == self.policy.expected
        if started:
            self.total = self.plan(list(self.sizes.values()))
            if self.sequential:
                self._open(self.current, now)
        welcome = []
        if self.started:
            welcome = [Welcome(c, s, to) for c, (s, to) in self._hellos.items()
                       if c not in self._welcomed or c == client]
            self._welcomed.update(w.client for w in welcome)
        return Joined(new, again, started, welcome)

    def snapshot(self) -> dict:
        """What a resumed run needs (plain values, for ``torch.load(weights_only=True)``)."""
        return {"round": self.current, "rounds": self.total, "clients": dict(self.sizes),
                "replies": [[c, r, res.value] for (c, r), res in self.cache.items()]}

    def restore(self, state: dict, now: float) -> None:
        """Continue from a :meth:`snapshot` at its open round; the clients HELLO again."""
        self.current, self.total = int(state["round"]), int(state["rounds"])
        self.sizes = {int(c): int(n) for c, n in state["clients"].items()}
        self.cache = {(int(c), int(r)): Result(v, sent=0.0) for c, r, v in state["replies"]}
        if self.serving:
            self._open(self.current, now)

    # ------------------------------------------------------------------ requests

    def check_started(self) -> None:
        if not self.started:
            raise Refused(NOT_READY, "the run has not started: waiting for all clients to register")

    def request(self, req: Request) -> Send | None:
        """A request for (client, round) arrived (sequential rounds). Returns the reply of an
        answered one (a repeat); None when it is taken: to run, or, in progress, its newest
        copy gets the answer. :class:`Refused` for a round that is over or past the last."""
        self.check_started()
        c, r = req.client, req.round
        cached = self.cache.get((c, r))
        if cached is not None:
            self.count("repeated_requests", 1)
            cached.seq = req.seq
            return Send(c, r, req.seq, req.reply_to, cached.value)
        held = self._in_progress(c, r)
        if held is not None:
            held.reply_to, held.seq = req.reply_to, req.seq
            return None
        if r < self.current:
            raise Refused(STALE_ROUND, f"round {r} is over (the server is at round {self.current})",
                          server_round=self.current)
        if r >= self.total:
            raise Refused(STALE_ROUND, f"round {r} is past the last round {self.total - 1}")
        if r > self.current:
            self._keep_newest_ahead(c, r)
        rnd = self.open.setdefault(r, Round(r))
        if c in rnd.requests:
            self.count("repeated_requests", 1)
        rnd.requests[c] = req
        rnd.first_seen = min(rnd.first_seen, req.arrived)
        self.dropped.discard(c)
        return None

    def _in_progress(self, client: int, r: int) -> Request | Result | None:
        """The running request or the held reply of (client, round), if any."""
        rnd = self.open.get(r)
        if rnd is None:
            return None
        return rnd.running.get(client) or rnd.results.get(client)

    def holds(self, client: int, r: int) -> bool:
        """Whether (client, round) is running or its reply is held until the round closes."""
        return self._in_progress(client, r) is not None

    def _keep_newest_ahead(self, client: int, r: int) -> None:
        """A client ahead of the open round (it resumed past a server that resumed from an
        older checkpoint) keeps at most ``depth`` requests waiting: the newest."""
        ahead = sorted((rnd.requests[client].arrived, n) for n, rnd in self.open.items()
                       if n > self.current and n != r and client in rnd.requests)
        for _, n in ahead[:max(0, len(ahead) - self.depth + 1)]:
            del self.open[n].requests[client]
            if self.open[n].idle:
                del self.open[n]

    def required(self) -> set[int]:
        """The clients a round waits for: every expected one not left out as a straggler, as
        long as those still make ``--min-clients`` (else all: the round may then fail)."""
        everyone = set(range(self.policy.expected))
        active = everyone - self.dropped
        return active if len(active) >= self.policy.need else everyone

    def skip_ahead(self, now: float) -> range | None:
        """When the open round holds nothing and every client it waits for asks for a later
        round already (the server resumed from an older checkpoint), move to the earliest
        of those; returns the rounds given up."""
        rnd = self._open_round()
        if rnd is None or not rnd.idle:
            return None
        firsts = []
        for c in self.required():
            later = [n for n, o in self.open.items() if n > self.current and c in o.requests]
            if not later:
                return None
            firsts.append(min(later))
        skipped = range(self.current, min(firsts))
        for n in [n for n in self.open if n < skipped.stop]:
            del self.open[n]
        self.current = skipped.stop
        self._open(self.current, now)
        self.count("skipped_rounds", len(skipped))
        return skipped

    def ready(self, now: float) -> list[Request]:
        """The requests of the open round to run now, as one microbatch: once every client it
        waits for has sent, once the first has waited ``batch_wait_s``, or once the round is
        overdue (a straggler's round must not also wait for a full microbatch). A request
        sent ahead (pipelined) waits for a microbatch only from when its round opened: it
        must not run alone just because it came early."""
        rnd = self._open_round()
        if rnd is None or not rnd.requests:
            return []
        waiting = self.required() - set(rnd.results) - set(rnd.running)
        first = max(rnd.opened, min(q.arrived for q in rnd.requests.values()))
        if not (set(rnd.requests) >= waiting or now - first >= self.batch_wait_s
                or self.policy.overdue(rnd.waited(now))):
            return []
        batch = [rnd.requests.pop(c) for c in sorted(rnd.requests)]
        for q in batch:
            q.started = now
        rnd.running.update((q.client, q) for q in batch)
        return batch

    # ------------------------------------------------------------------ results and outcomes

    def check_window(self, r: int) -> None:
        """Independent rounds are taken only up to ``window`` rounds past the last outcome,
        so a peer cannot make this keep far-future rounds."""
        if self.window is None:
            return
        end = max(-1 if self.last_closed is None else self.last_closed, max(self.failed, default=-1)) + self.window
        if r > end:
            raise Refused(NOT_READY, f"round {r} is too far ahead: rounds up to {end} are taken now")

    def result(self, client: int, r: int, value: Any, now: float) -> bool:
        """A client's result for round r: the reply of a request :meth:`ready` handed out
        (held until the round closes), or what the client sent itself (an upload, in
        independent rounds; a resent one replaces it). False when that round's outcome is
        out already; :class:`Refused` when it failed or is too far ahead."""
        req = self.open[r].running.pop(client, None) if r in self.open else None
        if req is not None:
            self.open[r].results[client] = Result(value, req.reply_to, req.seq)
            return True
        self.check_window(r)
        if self.last_closed is not None and r <= self.last_closed:
            return False
        if r in self.failed:
            raise Refused(STALE_ROUND, self.failed[r])
        rnd = self.open.setdefault(r, Round(r, opened=now))
        rnd.first_seen = min(rnd.first_seen, now)
        rnd.results[client] = Result(value)
        return True

    def verdict(self, now: float) -> Verdict | None:
        """The next round to close now, if any: every client it waits for has a result
        (accepted), or it has waited past the straggler timeout and :class:`Policy` decides.
        A round with requests still to run is not judged."""
        rounds = [self._open_round()] if self.sequential else [self.open[n] for n in sorted(self.open)]
        for rnd in rounds:
            if rnd is None or rnd.requests or rnd.running:
                continue
            missing = self.required() - set(rnd.results)
            waited = rnd.waited(now)
            decision = self.policy.decide(len(rnd.results), waited) if missing else Decision.ACCEPT
            if decision is not Decision.WAIT:
                return Verdict(rnd.number, {c: res.value for c, res in rnd.results.items()},
                               tuple(sorted(missing)), decision is Decision.ACCEPT, waited)
        return None

    def abandon(self, now: float, clients: Sequence[int]) -> list[int]:
        """Sequential: give up those of these ``clients``' running requests of the open round that
        have run past the straggler timeout (a label-private round's second half, ``dL/dH``, that
        never came), so the round can be judged without them; returns those given up. Timed from
        when each started: one that only started in an overdue round still gets its full time."""
        rnd = self._open_round()
        if rnd is None:
            return []
        gone = sorted(c for c in clients if c in rnd.running and self.policy.overdue(now - rnd.running[c].started))
        for c in gone:
            del rnd.running[c]
        rnd.abandoned.update(gone)
        return gone

    def abandoned(self, client: int, r: int) -> bool:
        """Whether :meth:`abandon` gave up (client, round) in r, still open (once it closes, the
        round went on without the client: a later request of it is refused as over)."""
        rnd = self.open.get(r)
        return rnd is not None and client in rnd.abandoned

    def check_outcome(self, r: int) -> None:
        """Refuse a question about the outcome of round r (-1: the latest) that has none yet,
        or whose round failed (with the note :meth:`close` kept)."""
        if r in self.failed:
            raise Refused(STALE_ROUND, self.failed[r])
        if self.last_closed is None or self.last_closed < r:
            raise Refused(NOT_READY, f"round {r} has no outcome yet")

    def close(self, verdict: Verdict, now: float, note: str = "") -> None:
        """Commit a verdict. Its replies are cached for repeats and wait for
        :meth:`release`; a failed round keeps ``note`` to answer later questions about it.
        Sequential: the next round opens, without the clients this one left out."""
        rnd = self.open.pop(verdict.round)
        if verdict.accepted:
            self.last_closed = verdict.round
            if verdict.failures:
                self.count("stragglers_dropped", len(verdict.failures))
        else:
            self.failed[verdict.round] = note
            self.count("failed_rounds", 1)
        for c, res in sorted(rnd.results.items()):
            if res.reply_to is not None:
                self._cache(c, verdict.round, res)
                self._unsent.append(Send(c, verdict.round, res.seq, res.reply_to, res.value))
        if self.sequential:
            self.dropped |= set(verdict.failures)
            self.current = verdict.round + 1
            if self.serving:
                self._open(self.current, now)

    def release(self, now: float) -> list[Send]:
        """The replies of closed rounds, to send now."""
        out, self._unsent = self._unsent, []
        for s in out:
            self.cache[(s.client, s.round)].sent = now
        return out

    def _cache(self, client: int, r: int, res: Result) -> None:
        """Keep the replies of a client's newest ``depth`` rounds."""
        self.cache[(client, r)] = res
        mine = sorted(n for c, n in self.cache if c == client)
        for n in mine[:max(0, len(mine) - self.depth)]:
            del self.cache[(client, n)]

    # ------------------------------------------------------------------ waiting clients

    def heartbeat(self, client: int, r: int, seq: int, reply_to: Any, now: float) -> tuple[bool, Welcome | Send | None]:
        """A client waiting on its request (round r, seq) asks whether it is held here; the
        answer comes with what to send it again: the WELCOME of its registration, or a
        cached reply that looks lost (a beat may cross the reply: only after
        ``resend_after_s``)."""
        if client not in self.sizes:
            return False, None
        hello = self._hellos.get(client)
        if r == -1 and hello is not None and hello[0] == seq:
            return True, Welcome(client, *hello) if client in self._welcomed else None
        cached = self.cache.get((client, r))
        if cached is not None and cached.seq == seq:
            if now - cached.sent <= self.resend_after_s:
                return True, None
            cached.sent = now
            self.count("replies_resent", 1)
            return True, Send(client, r, seq, reply_to, cached.value)
        held = self._in_progress(client, r)
        if held is not None and held.seq == seq:
            held.reply_to = reply_to
            return True, None
        waiting = self.open[r].requests.get(client) if r in self.open else None
        if waiting is not None and waiting.seq == seq:
            return True, None
        bye = self.byes.get(client)
        if bye is not None and bye[1] == seq:
            self.byes[client] = (reply_to, seq)
            return True, None
        return False, None

    def bye(self, client: int, seq: int, reply_to: Any) -> bool:
        """A client is done; returns whether the whole run is :attr:`complete`."""
        self.byes[client] = (reply_to, seq)
        return self.complete

    # ------------------------------------------------------------------ internals

    def _open(self, r: int, now: float) -> None:
        self.open.setdefault(r, Round(r)).opened = now

    def _open_round(self) -> Round | None:
        return self.open.get(self.current) if self.sequential and self.serving else None
