"""Fuzzing the server (through the broker) and the aggregator while two honest clients train.

A fuzzer thread in the test process sends more than 10,000 malformed messages: random
bytes, wrong frame counts, no empty delimiter, truncated frames, unknown versions and
types, header fields of the wrong type, dtypes outside the allow-list, shapes that do
not match the frame length or the model, NaN/Inf, label ids out of range, strangers'
ids, honest clients' ids without their session (duplicate HELLOs, FORWARDs, replays),
FETCH/BYE from strangers, and - with an honest client's session, as a buggy client
would - FORWARDs the model cannot take, stale rounds and UPLOADs with bad adapters or
``n_samples``. Messages are valid ones built with :func:`lesft.wire.encode`, then
mutated (or headers packed by hand where ``encode`` itself would refuse them).

Every burst of messages ends with a probe (a HEARTBEAT from an unregistered id, which
each worker answers without counting it as rejected); once the probe is answered every
message before it has been handled, so nothing is lost to queue limits and the count is
exact: the sum of the workers' ``rejected.*`` counters equals what reached them.
Messages over ``--max-message-mb`` in one frame, which ZeroMQ drops by closing the
connection before the application sees them, go on throw-away sockets and are only
checked for survival. The honest run must end exactly as without the fuzzer: every
worker exits 0 and the adapters equal the reference bit for bit.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter

import msgpack
import pytest
import torch
import zmq

from conftest import LiveRun, assert_same_adapters
from lesft import wire
from lesft.wire import Message, MsgType

pytestmark = pytest.mark.e2e

ROUNDS = 16
SPREAD = 9  # rounds the fuzzing during training is spread over
FREEZE_AT = 10  # rounds closed when the clients are frozen should the fuzzer lag behind
TARGET = 11_000  # messages in all (at least MIN_MESSAGES reach the workers)
MIN_MESSAGES = 10_000
MIN_DURING_TRAINING = 3_000
CLIENTS_AFTER = 4_000  # messages sent before the honest clients are started
PHASE_A_CAP = TARGET - MIN_DURING_TRAINING  # most sent before they train
BURST = 100
STRANGER = 999  # the probes' sender: an id no client has
PROBE_SEQ = 1 << 40  # probes' seq numbers start here (fuzz messages stay below)


class Fuzzer(threading.Thread):
    """Sends malformed messages to the server (a DEALER on the broker frontend) and the
    aggregator (a DEALER on its ROUTER) in probe-terminated bursts; counts what it sent."""

    def __init__(self, run: LiveRun, schema: dict[str, tuple], seed: int = 0) -> None:
        super().__init__(daemon=True, name="fuzzer")
        from lesft.engine import run_fingerprint
        from lesft.models import source_for

        self.run_, cfg = run, run.cfg
        self.cfg, self.run_id = cfg, cfg.run.run_id
        source = source_for(cfg)
        self.fingerprint, self.parts = run_fingerprint(cfg, source)
        self.hidden, self.vocab = int(source.config.hidden_size), int(source.config.vocab_size)
        self.schema = schema
        self.rng = random.Random(seed)
        torch.manual_seed(seed)
        self.ctx = zmq.Context()
        self.socks = {"server": self._dealer(cfg.net.broker_frontend),
                      "aggregator": self._dealer(cfg.net.aggregator_address)}
        self.sent: Counter = Counter()  # target -> malformed messages handed to it
        self.kinds: Counter = Counter()  # (target, kind) -> n
        self.errors: Counter = Counter()  # target -> ERROR replies received
        self.unexpected: list = []  # any reply but an ERROR or a probe's HEARTBEAT
        self.oversize = 0
        self.oversize_cut = 0  # of those, how many made the receiver close the connection
        self.sessions: dict[int, str] = {}
        self.last_round_seen = (0, 0.0)  # (server rounds closed, when that number was first seen)
        self.aggregated = False
        self.seq = 0
        self.probe_seq = PROBE_SEQ
        self.in_flight: dict[str, int] = {}  # target -> seq of the last probe sent
        self.clients_may_start = threading.Event()
        self.phase_b_start = 0  # messages sent before the clients trained
        self.marks: dict[str, float] = {"start": time.monotonic()}  # when each phase began
        self.failure: BaseException | None = None

    def _dealer(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return sock

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        try:
            self.wait_paths()
            self.marks["a"] = time.monotonic()
            self.phase_a()
            self.wait_training()
            self.marks["b"] = time.monotonic()
            self.send_oversize()
            self.phase_b()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.failure = e
        finally:
            self.marks["end"] = time.monotonic()
            self.clients_may_start.set()
            for sock in self.socks.values():
                sock.close(linger=0)
            self.ctx.term()

    def total(self) -> int:
        return sum(self.sent.values())

    def rounds_closed(self) -> int:
        n = len(self.run_.server_rounds())
        if n != self.last_round_seen[0]:
            self.last_round_seen = (n, time.monotonic())
        return n

    def wait_paths(self) -> None:
        """Until both workers answer a probe (the server may not be connected to the broker yet)."""
        for target in self.socks:
            deadline = time.monotonic() + 240
            while not self.probe(target, timeout=1.0):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the {target} never answered a probe")

    def phase_a(self) -> None:
        """Before the clients train: everything that needs no honest session. The clients are
        started after the first CLIENTS_AFTER messages; the fuzzing goes on while they start."""
        while self.rounds_closed() == 0 and self.total() < PHASE_A_CAP:
            self.burst(self.generic_kinds())
            if self.total() >= CLIENTS_AFTER:
                self.clients_may_start.set()
        self.drain(timeout=60.0)

    def wait_training(self) -> None:
        deadline = time.monotonic() + 300
        while self.rounds_closed() < 1 or not all(
                (self.run_.run_dir / f"client-{i}-state.pt").is_file() for i in range(2)):
            if time.monotonic() > deadline:
                raise AssertionError("training never started")
            time.sleep(0.05)
        for i in range(2):
            state = torch.load(self.run_.run_dir / f"client-{i}-state.pt", map_location="cpu", weights_only=True)
            self.sessions[i] = state["session"]

    def phase_b(self) -> None:
        """While the clients train: everything, including honest ids and sessions, spread over
        the rounds (so that many rounds see fuzzing) until TARGET messages are out. Should
        the rounds outpace the fuzzer, the clients are frozen (SIGSTOP: without a straggler
        timeout that changes nothing) before the last rounds until it has caught up."""
        kinds = self.generic_kinds() + self.training_kinds()
        self.phase_b_start = self.total()
        need = max(TARGET - self.total(), MIN_DURING_TRAINING)
        share = need / SPREAD
        frozen = False
        try:
            while self.total() - self.phase_b_start < need:
                closed = self.rounds_closed()
                if closed >= FREEZE_AT and not frozen:
                    self.run_.freeze()
                    frozen = True
                if not frozen and self.total() - self.phase_b_start >= share * closed:
                    time.sleep(0.02)  # this round had its share
                    continue
                self.aggregated = self.aggregated or bool(self.run_.records("aggregator-0", "aggregation"))
                self.burst(kinds)
            self.drain(timeout=60.0)
        finally:
            if frozen:
                self.marks["froze"] = time.monotonic()
                self.run_.thaw()

    def burst(self, kinds: list) -> None:
        """BURST messages, a probe behind them to each worker that got some, then wait for
        the probes of the previous burst (two bursts in flight: well under the queue limits)."""
        probes = {}
        for _ in range(BURST):
            kind = self.rng.choice(kinds)
            out = kind()
            if out is None:  # not allowed right now
                continue
            target, frames = out
            self.socks[target].send_multipart(frames, copy=True)
            self.sent[target] += 1
            self.kinds[(target, kind.__name__)] += 1
            probes.setdefault(target, None)
        for target in probes:
            probes[target] = self.send_probe(target)
        self.drain(timeout=60.0)
        self.in_flight = probes

    def drain(self, timeout: float) -> None:
        """Wait until the probes in flight are answered: all before them has been handled."""
        for target, seq in self.in_flight.items():
            if not self.await_probe(target, seq, timeout):
                raise AssertionError(f"the {target} stopped answering (after {self.total()} messages)")
        self.in_flight = {}

    def send_probe(self, target: str) -> int:
        self.probe_seq += 1
        beat = Message(MsgType.HEARTBEAT, "client", STRANGER, self.run_id, -1, self.probe_seq, {})
        self.socks[target].send_multipart([b""] + wire.encode(beat))
        return self.probe_seq

    def probe(self, target: str, timeout: float) -> bool:
        return self.await_probe(target, self.send_probe(target), timeout)

    def await_probe(self, target: str, seq: int, timeout: float) -> bool:
        """Read the target's replies until the answer to probe ``seq``; True when it came in time."""
        sock = self.socks[target]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sock.poll(50):
                continue
            frames = sock.recv_multipart()
            try:
                msg = wire.decode(wire.split_envelope(frames)[1])
            except wire.WireError as e:
                self.unexpected.append((target, f"undecodable reply: {e}"))
                continue
            if msg.type == MsgType.ERROR:
                self.errors[target] += 1
            elif msg.type == MsgType.HEARTBEAT and msg.seq >= PROBE_SEQ and msg.meta.get("have") is False:
                if msg.seq == seq:
                    return True
            else:
                self.unexpected.append((target, msg.type.value, msg.sender, msg.round, msg.meta))
        return False

    def send_oversize(self) -> None:
        """One frame over --max-message-mb to each worker, on a socket of its own: ZeroMQ drops
        it and closes that connection before the worker sees it (the socket monitor shows
        the connection made, then closed by the peer)."""
        from zmq.utils.monitor import recv_monitor_message

        big = b"\0" * (self.cfg.net.max_message_mb * 2**20 + 1024)
        for address in (self.cfg.net.broker_frontend, self.cfg.net.aggregator_address):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sock.connect(address)
            sock.send_multipart([b"", self.header(), big])
            events, deadline = [], time.monotonic() + 10
            while zmq.EVENT_DISCONNECTED not in events and time.monotonic() < deadline:
                if monitor.poll(100):
                    events.append(recv_monitor_message(monitor)["event"])
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            self.oversize += 1
            self.oversize_cut += events[:2] == [zmq.EVENT_CONNECTED, zmq.EVENT_DISCONNECTED]

    # ------------------------------------------------------------------ building blocks

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def message(self, t: MsgType, sender: int = STRANGER, round_: int = -1, meta: dict | None = None,
                tensors: dict | None = None, role: str = "client", run_id: str | None = None) -> Message:
        return Message(t, role, sender, self.run_id if run_id is None else run_id, round_, self.next_seq(),
                       meta or {}, tensors or {})

    def frames(self, msg: Message, delimiter: bool = True) -> list:
        return ([b""] if delimiter else []) + [bytes(f) for f in wire.encode(msg)]

    def header(self, **over) -> bytes:
        """A msgpack header as ``encode`` would write it, with any field replaced (or removed: None)."""
        h = {"v": wire.PROTOCOL_VERSION, "t": "forward", "role": "client", "id": STRANGER, "run": self.run_id,
             "r": 0, "seq": self.next_seq(), "m": {}, "ts": []}
        for k, v in over.items():
            if v is None:
                h.pop(k, None)
            else:
                h[k] = v
        return msgpack.packb(h, use_bin_type=True)

    def forward_tensors(self, rows: int = 1, t: int = 16, ty: int = 4, **over) -> dict[str, torch.Tensor]:
        """A FORWARD the model takes (``[rows, t, hidden]``), with any tensor replaced (or removed: None)."""
        full = lambda v: torch.full((rows,), v, dtype=torch.int64)  # noqa: E731
        d = {"act": torch.randn(rows, t, self.hidden), "lengths": full(t), "y_start": full(t - ty),
             "targets": torch.randint(0, self.vocab, (rows, ty)), "y_len": full(ty),
             "ref_act": torch.randn(rows, t, self.hidden), "ref_lengths": full(t), "ref_y_start": full(t - ty)}
        d.update(over)
        return {k: v for k, v in d.items() if v is not None}

    def adapters(self, **over) -> dict[str, torch.Tensor]:
        d = {k: torch.randn(shape) * 0.01 for k, shape in self.schema.items()}
        d.update(over)
        return {k: v for k, v in d.items() if v is not None}

    def hello_meta(self, cid: int, **over) -> dict:
        meta = {"client_id": cid, "n_samples": 4, "fingerprint": self.fingerprint, "parts": self.parts,
                "session": "%032x" % self.rng.getrandbits(128)}
        meta.update(over)
        return {k: v for k, v in meta.items() if v is not None}

    def target(self) -> str:
        return self.rng.choice(("server", "aggregator"))

    def fake_session(self) -> dict:
        return self.rng.choice([{}, {"session": "%032x" % self.rng.getrandbits(128)}, {"session": 12345678}])

    # ------------------------------------------------------------------ kinds without any session

    def generic_kinds(self) -> list:
        return [self.random_bytes, self.no_delimiter, self.wrong_frame_count, self.truncated_tensor,
                self.truncated_header, self.bad_version, self.bad_type, self.header_keys,
                self.wrong_field_type, self.bad_dtype, self.size_mismatch, self.bad_dims, self.not_finite,
                self.bool_out_of_range, self.not_a_map, self.bad_meta, self.wrong_run, self.not_taken,
                self.stranger, self.bad_hello, self.too_many_frames, self.over_total]

    def random_bytes(self):
        n = self.rng.randint(1, 4)
        frames = [self.rng.randbytes(self.rng.randint(0, 200)) for _ in range(n)]
        if self.rng.random() < 0.5:
            frames.insert(0, b"")
        return self.target(), frames

    def no_delimiter(self):
        msg = self.message(MsgType.FORWARD, self.rng.choice([0, 1, STRANGER]), 0, tensors=self.forward_tensors())
        return self.target(), self.frames(msg, delimiter=False)

    def wrong_frame_count(self):
        frames = self.frames(self.message(MsgType.FORWARD, STRANGER, 0, tensors=self.forward_tensors()))
        if self.rng.random() < 0.5:
            del frames[self.rng.randrange(2, len(frames))]
        else:
            frames.append(self.rng.randbytes(16))
        return self.target(), frames

    def truncated_tensor(self):
        frames = self.frames(self.message(MsgType.FORWARD, STRANGER, 0, tensors=self.forward_tensors()))
        i = self.rng.randrange(2, len(frames))
        frames[i] = frames[i][: self.rng.randrange(0, len(frames[i]))]
        return self.target(), frames

    def truncated_header(self):
        frames = self.frames(self.message(MsgType.HELLO, STRANGER, meta=self.hello_meta(STRANGER)))
        frames[1] = frames[1][: self.rng.randrange(1, len(frames[1]))]
        return self.target(), frames

    def bad_version(self):
        return self.target(), [b"", self.header(v=self.rng.choice([0, 2, 99, -1, True, "1", 1.0]))]

    def bad_type(self):
        return self.target(), [b"", self.header(t=self.rng.choice(["", "launch", "FORWARD", "x" * 500]))]

    def header_keys(self):
        if self.rng.random() < 0.5:
            return self.target(), [b"", self.header(**{self.rng.choice(["t", "role", "id", "run", "r", "seq", "m",
                                                                        "ts"]): None})]
        return self.target(), [b"", self.header(extra=1)]

    def wrong_field_type(self):
        field, value = self.rng.choice([("r", True), ("id", False), ("seq", 1.5), ("id", "0"), ("run", 5),
                                        ("m", [1, 2]), ("ts", {}), ("role", "hacker"), ("role", 7),
                                        ("r", -2), ("seq", -1), ("id", -5), ("t", 3), ("m", "x")])
        return self.target(), [b"", self.header(**{field: value})]

    def bad_dtype(self):
        code = self.rng.choice(["f64", "c64", "i8", "q4", "", "float32"])
        return self.target(), [b"", self.header(ts=[["act", code, [1, 4]]]), b"\0" * 32]

    def size_mismatch(self):
        frames = self.frames(self.message(MsgType.FORWARD, STRANGER, 0, tensors=self.forward_tensors()))
        i = self.rng.randrange(2, len(frames))
        frames[i] = frames[i] + self.rng.randbytes(self.rng.randint(1, 64))
        return self.target(), frames

    def bad_dims(self):
        shape = self.rng.choice([[-1, 4], [1, 2, 3, 4, 5], [1.5, 2], ["3"], [True, 2], [1 << 40, 1 << 40],
                                 [2048, 2048]])
        return self.target(), [b"", self.header(ts=[["act", "f32", shape]]), b"\0" * 16]

    def not_finite(self):
        bad = self.rng.choice([math.nan, math.inf, -math.inf])
        dtype = self.rng.choice([torch.float32, torch.float16, torch.bfloat16])
        if self.rng.random() < 0.5:
            act = torch.randn(1, 16, self.hidden)
            act[0, self.rng.randrange(16), self.rng.randrange(self.hidden)] = bad
            msg = self.message(MsgType.FORWARD, self.rng.choice([0, 1, STRANGER]), 0,
                               tensors=self.forward_tensors(act=act.to(dtype)))
            return self.target(), self.frames(msg)
        ad = self.adapters()
        name = self.rng.choice(list(ad))
        ad[name].view(-1)[0] = bad
        msg = self.message(MsgType.UPLOAD, self.rng.choice([0, 1, STRANGER]), 3, {"n_samples": 4},
                           {k: v.to(dtype) for k, v in ad.items()})
        return self.target(), self.frames(msg)

    def bool_out_of_range(self):
        return self.target(), [b"", self.header(ts=[["mask", "b1", [4]]]), bytes([0, 1, 2, 1])]

    def not_a_map(self):
        value = self.rng.choice([[1, 2, 3], "hello", 42, None, b"bytes"])
        return self.target(), [b"", msgpack.packb(value, use_bin_type=True)]

    def bad_meta(self):
        kind = self.rng.random()
        if kind < 0.33:  # a non-string key: strict_map_key refuses it while unpacking
            raw = msgpack.packb({"v": 1, "t": "hello", "role": "client", "id": 1, "run": self.run_id, "r": -1,
                                 "seq": 1, "m": {1: 2}, "ts": []}, use_bin_type=True)
            return self.target(), [b"", raw]
        if kind < 0.66:
            deep: object = 1
            for _ in range(40):
                deep = {"d": deep}
            return self.target(), [b"", self.header(m=deep)]
        return self.target(), [b"", self.header(m={"x": b"binary"})]

    def wrong_run(self):
        msg = self.message(self.rng.choice([MsgType.FORWARD, MsgType.HELLO, MsgType.UPLOAD, MsgType.FETCH]),
                           self.rng.choice([0, 1, STRANGER]), 0, run_id=self.rng.choice(["", "other", "x" * 300]))
        return self.target(), self.frames(msg)

    def not_taken(self):
        """Types the worker does not take (checked before the sender)."""
        if self.rng.random() < 0.5:
            t = self.rng.choice([MsgType.WELCOME, MsgType.BACKWARD, MsgType.UPLOAD, MsgType.ACK, MsgType.ADAPTERS,
                                 MsgType.FETCH, MsgType.ERROR, MsgType.DONE])
            return "server", self.frames(self.message(t, self.rng.choice([0, 1, STRANGER]), 0,
                                                      role=self.rng.choice(["client", "server", "aggregator"])))
        t = self.rng.choice([MsgType.WELCOME, MsgType.FORWARD, MsgType.BACKWARD, MsgType.ACK, MsgType.ADAPTERS,
                             MsgType.ERROR, MsgType.DONE])
        return "aggregator", self.frames(self.message(t, self.rng.choice([0, 1, STRANGER]), 0))

    def stranger(self):
        """Well-formed requests from ids no client has (FETCH/BYE/UPLOAD/FORWARD)."""
        sender = self.rng.choice([2, 7, STRANGER, 1 << 40])
        if self.rng.random() < 0.5:
            t = self.rng.choice([MsgType.FORWARD, MsgType.BYE])
            tensors = self.forward_tensors() if t == MsgType.FORWARD else None
            return "server", self.frames(self.message(t, sender, 0, self.fake_session(), tensors))
        t = self.rng.choice([MsgType.UPLOAD, MsgType.FETCH, MsgType.BYE])
        meta = dict(self.fake_session(), **({"n_samples": 4} if t == MsgType.UPLOAD else {}))
        tensors = self.adapters() if t == MsgType.UPLOAD else None
        return "aggregator", self.frames(self.message(t, sender, 3 if t != MsgType.BYE else -1, meta, tensors))

    def bad_hello(self):
        """HELLOs that must never register anyone: bad fields, ids out of range, no valid
        session; a wrong fingerprint only to the server (the aggregator does not check it)."""
        cid = self.rng.choice([0, 1])
        choice = self.rng.randrange(8)
        if choice == 0:
            meta, sender = self.hello_meta(cid, client_id=self.rng.choice([True, -1, "0", 1.0, None])), cid
        elif choice == 1:
            meta, sender = self.hello_meta(cid, n_samples=self.rng.choice([0, -3, True, "4", None])), cid
        elif choice == 2:
            meta, sender = self.hello_meta(cid, fingerprint=self.rng.choice(["", 5, None])), cid
        elif choice == 3:  # claims another id than it sends as
            meta, sender = self.hello_meta(cid), 1 - cid
        elif choice == 4:  # an id the run does not have
            sender = self.rng.choice([2, 3, 64])
            meta = self.hello_meta(sender)
        elif choice == 5:  # no usable session
            meta, sender = self.hello_meta(cid, session=self.rng.choice([None, "short", 7, "x" * 200])), cid
        elif choice == 6:
            msg = self.message(MsgType.HELLO, cid, meta=self.hello_meta(cid, fingerprint="0" * 16))
            return "server", self.frames(msg)
        else:
            msg = self.message(MsgType.HELLO, cid, meta=self.hello_meta(cid, fingerprint=self.fingerprint[::-1]))
            return "server", self.frames(msg)
        return self.target(), self.frames(self.message(MsgType.HELLO, sender, meta=meta))

    def too_many_frames(self):
        if self.rng.random() < 0.99:
            return None  # rare: 4,097 frames each
        return self.target(), [b"", self.header()] + [b"x"] * 4097

    def over_total(self):
        """Tensors within the frame limit but together over --max-message-mb: they reach
        the worker, whose decode refuses them."""
        if self.rng.random() < 0.9:
            return None  # rare: 1.2 MB each
        n = (self.cfg.net.max_message_mb * 2**20) // 4 // 3 + 1024
        specs = [[f"t{i}", "f32", [n]] for i in range(3)]
        return self.target(), [b"", self.header(t="upload", ts=specs)] + [b"\0" * (4 * n)] * 3

    # ------------------------------------------------------------------ kinds once the clients train

    def training_kinds(self) -> list:
        return [self.impostor, self.impostor, self.duplicate_hello, self.replay, self.bad_forward, self.bad_forward,
                self.bad_forward, self.stale_forward, self.bad_upload, self.bad_upload]

    def impostor(self):
        """An honest client's id without its session: FORWARD, BYE, HEARTBEAT, UPLOAD, FETCH."""
        cid = self.rng.choice([0, 1])
        meta = self.fake_session()
        if self.rng.random() < 0.5:
            t = self.rng.choice([MsgType.FORWARD, MsgType.BYE, MsgType.HEARTBEAT])
            tensors = self.forward_tensors() if t == MsgType.FORWARD else None
            return "server", self.frames(self.message(t, cid, self.rng.randrange(ROUNDS), meta, tensors))
        t = self.rng.choice([MsgType.UPLOAD, MsgType.FETCH, MsgType.BYE, MsgType.HEARTBEAT])
        if t == MsgType.UPLOAD:
            meta = dict(meta, n_samples=4)
        tensors = self.adapters() if t == MsgType.UPLOAD else None
        return "aggregator", self.frames(self.message(t, cid, 3, meta, tensors))

    def duplicate_hello(self):
        """A well-formed HELLO for an honest id with a new session. The server is sent one
        only right after a round closed (the clients were just heard), so it can never
        look like the takeover of a silent client's id."""
        cid = self.rng.choice([0, 1])
        msg = self.message(MsgType.HELLO, cid, meta=self.hello_meta(cid))
        if self.rng.random() < 0.5:
            return "aggregator", self.frames(msg)
        if time.monotonic() - self.last_round_seen[1] > 1.0:
            return None
        return "server", self.frames(msg)

    def replay(self):
        """A FORWARD of an honest client replayed or out of order, without its session."""
        cid = self.rng.choice([0, 1])
        round_ = self.rng.choice([0, self.last_round_seen[0] - 1, self.last_round_seen[0], ROUNDS + 3])
        msg = self.message(MsgType.FORWARD, cid, max(round_, 0), self.fake_session(), self.forward_tensors())
        return "server", self.frames(msg)

    def bad_forward(self):
        """With client 0's session: FORWARDs that fail the model-aware checks."""
        h, v, r = self.hidden, self.vocab, self.last_round_seen[0]
        lim = self.cfg.data.max_length
        bad = self.rng.choice([
            dict(act=torch.randn(1, 16, h // 2)),  # hidden size
            dict(act=torch.randn(1, lim + 1, h), ref_act=torch.randn(1, lim + 1, h)),  # too long
            "rows",  # more rows than the batch limit
            dict(targets=torch.full((1, 4), v)), dict(targets=torch.full((1, 4), -1)),  # label ids
            dict(y_start=torch.zeros(1, dtype=torch.int64)), dict(lengths=torch.full((1,), 99)),
            dict(act=torch.randint(0, 5, (1, 16, h))), dict(targets=torch.rand(1, 4)),  # dtypes
            dict(act=None), dict(extra=torch.zeros(2)), dict(ref_lengths=None),  # tensors
            dict(act=torch.randn(1, 16)), dict(act=torch.randn(1, 0, h), ref_act=torch.randn(1, 0, h)),
            dict(ref_act=None, ref_lengths=None, ref_y_start=None),  # the run's method sends the reference path
            "session", "not_finite", "frame_size",
        ])
        meta = {"session": self.sessions[0]}
        sender = 0
        if bad == "rows":
            tensors = self.forward_tensors(rows=self.cfg.train.batch_size + 1)
        elif bad == "session":  # client 1's session on a message of client 0
            tensors, meta["session"] = self.forward_tensors(), self.sessions[1]
        elif bad == "not_finite":  # tensors are checked only once the sender is known (cheap checks first)
            act = torch.randn(1, 16, h)
            act[0, self.rng.randrange(16), self.rng.randrange(h)] = self.rng.choice([math.nan, math.inf, -math.inf])
            tensors = self.forward_tensors(act=act)
        elif bad == "frame_size":  # a tensor frame longer than its header says
            frames = self.frames(self.message(MsgType.FORWARD, sender, r, meta, self.forward_tensors()))
            i = self.rng.randrange(2, len(frames))
            frames[i] = frames[i] + self.rng.randbytes(self.rng.randint(1, 64))
            return "server", frames
        else:
            tensors = self.forward_tensors(**bad)
        return "server", self.frames(self.message(MsgType.FORWARD, sender, r, meta, tensors))

    def stale_forward(self):
        """With client 0's session, a valid FORWARD of a round long closed or past the last."""
        closed = self.last_round_seen[0]
        if closed < 2 and self.rng.random() < 0.9:
            return None
        round_ = self.rng.randrange(0, closed - 1) if closed >= 2 else ROUNDS + self.rng.randrange(5)
        if self.rng.random() < 0.3:
            round_ = ROUNDS + self.rng.randrange(5)
        msg = self.message(MsgType.FORWARD, 0, round_, {"session": self.sessions[0]}, self.forward_tensors())
        return "server", self.frames(msg)

    def bad_upload(self):
        """With client 1's session: UPLOADs the aggregator must refuse. Keys or shapes
        that differ from the first upload's only once one has been averaged."""
        choices = ["n_samples", "empty", "int", "zero_size"]
        if self.aggregated:
            choices += ["missing_key", "extra_key", "shape"]
        bad = self.rng.choice(choices)
        meta = {"n_samples": 4, "session": self.sessions[1]}
        tensors = self.adapters()
        name = self.rng.choice(sorted(tensors))
        if bad == "n_samples":
            value = self.rng.choice([0, -4, True, "4", 2.5, None])
            meta.pop("n_samples") if value is None else meta.update(n_samples=value)
        elif bad == "empty":
            tensors = {}
        elif bad == "int":
            tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.int64)
        elif bad == "zero_size":
            tensors[name] = torch.zeros(0, 8)
        elif bad == "missing_key":
            del tensors[name]
        elif bad == "extra_key":
            tensors["layers.9.mlp.up_proj.lora_A"] = torch.zeros(8, 64)
        else:
            tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[-1])
        round_ = self.rng.choice([3, 7, 11, self.last_round_seen[0]])
        return "aggregator", self.frames(self.message(MsgType.UPLOAD, 1, round_, meta, tensors))


def rejected(record: dict) -> int:
    return sum(n for k, n in record.get("counters", {}).items() if k.startswith("rejected."))


def test_fuzzing_changes_nothing_and_every_bad_message_is_counted(tmp_path, e2e_cfg, live_run, reference_adapters):
    cfg = e2e_cfg(tmp_path, rounds=ROUNDS, heartbeat_s=2, run_id="fuzz")
    ref = reference_adapters(cfg)
    run = live_run(cfg, start=False)
    for role in ("broker", "server", "aggregator"):
        run.start(role)
    fuzzer = Fuzzer(run, {k: tuple(v.shape) for k, v in ref["client"].items()})
    fuzzer.start()
    try:
        assert fuzzer.clients_may_start.wait(timeout=300)
        for i in range(cfg.data.clients):
            run.start("client", i)
        codes = run.wait_done(timeout=420)
    finally:
        fuzzer.join(timeout=120)
        phases = {k: round(v - fuzzer.marks["start"], 1) for k, v in fuzzer.marks.items()}
        (run.run_dir / "fuzz-summary.txt").write_text(
            f"sent {dict(fuzzer.sent)}, {fuzzer.total() - fuzzer.phase_b_start} while training; "
            f"oversize {fuzzer.oversize}\nphases (s after the fuzzer started) {phases}\nkinds {dict(fuzzer.kinds)}\n")
    broker_alive = run.procs["broker-0"].popen.poll() is None

    assert fuzzer.failure is None, repr(fuzzer.failure)
    assert all(c == 0 for n, c in codes.items() if n != "broker-0") and broker_alive, codes
    assert fuzzer.total() >= MIN_MESSAGES, fuzzer.sent
    assert fuzzer.total() - fuzzer.phase_b_start >= MIN_DURING_TRAINING, (fuzzer.phase_b_start, fuzzer.sent)
    assert fuzzer.oversize == fuzzer.oversize_cut == 2
    assert not fuzzer.unexpected, fuzzer.unexpected[:10]

    server, aggregator = run.final("server-0"), run.final("aggregator-0")
    assert rejected(server) == fuzzer.sent["server"], (server["counters"], fuzzer.sent)
    assert rejected(aggregator) == fuzzer.sent["aggregator"], (aggregator["counters"], fuzzer.sent)
    # the fuzz reached every layer of validation: codec, dispatch, sessions, model checks
    codes_seen = {k.split(".", 1)[1] for rec in (server, aggregator) for k in rec["counters"]
                  if k.startswith("rejected.")}
    wanted = {"bad_frames", "bad_header", "bad_version", "bad_type", "bad_field", "bad_dtype", "bad_shape",
              "size_mismatch", "not_finite", "out_of_range", "too_large", "missing_tensor", "unexpected_tensor",
              "fingerprint_mismatch", "unknown_client", "duplicate_client", "unauthorised", "stale_round",
              "bad_adapter"}
    assert wanted <= codes_seen, wanted - codes_seen

    rounds = run.server_rounds()
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert all(r["clients"] == [0, 1] and not r["failed"] for r in rounds)
    assert_same_adapters(run.run_dir, 2, ref)  # bit for bit
