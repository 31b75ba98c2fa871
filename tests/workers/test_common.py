"""Tests for workers.common's dispatcher: a handler sees only messages that passed
admission and their type's checker; everything else is one ERROR reply and a count."""
from __future__ import annotations

import pytest
import torch

from lesft import wire
from lesft.config import build_config
from lesft.wire import ErrorCode, MsgType
from workers.common import Sessions, Worker
from workers.transport import Inbound

ENVELOPE = [b"\x00id", b""]


class FakeChannel:
    """What :meth:`Worker.serve` answers on: records every message sent."""

    routed = True

    def __init__(self) -> None:
        self.sent: list[wire.Message] = []

    def send(self, msg, envelope=(), float_dtype=None) -> int:  # noqa: ARG002
        self.sent.append(msg)
        return 0


@pytest.fixture()
def worker(tmp_path):
    cfg = build_config(cli=dict(model="arch:tiny-qwen2", runs_dir=str(tmp_path), run_id="x", clients=2), env={})
    w = Worker(cfg, -1)
    yield w
    w.finish()


def serve(worker, msg, handlers):
    chan, sessions = FakeChannel(), Sessions(takeover_after=1.0)
    sessions.register(0, "s" * 16)
    worker.serve(chan, Inbound(ENVELOPE, msg), handlers, sessions)
    return chan.sent


def test_a_checked_message_reaches_its_handler(worker):
    seen = []
    msg = wire.hello(wire.Origin("client", 0, "x", "s" * 16), 1, client_id=0, n_samples=4, fingerprint="f", parts={})
    assert serve(worker, msg, {MsgType.HELLO: lambda inbound, m: seen.append(m)}) == []
    assert seen == [msg]


@pytest.mark.parametrize("case", ["bad meta", "bad tensors", "no checker", "not taken"])
def test_the_dispatcher_refuses_before_the_handler(worker, monkeypatch, case):
    seen = []
    origin = wire.Origin("client", 0, "x", "s" * 16)
    msg = wire.hello(origin, 1, client_id=0, n_samples=4, fingerprint="f", parts={})
    expected = ErrorCode.BAD_TYPE
    if case == "bad meta":
        msg.meta["n_samples"], expected = 0, ErrorCode.OUT_OF_RANGE
    elif case == "bad tensors":
        msg = wire.upload(origin, 0, 2, n_samples=4, adapters={"a": torch.zeros(2, dtype=torch.int64)})
        expected = ErrorCode.BAD_DTYPE
    elif case == "no checker":
        monkeypatch.delitem(wire.CHECKERS, MsgType.HELLO)
    handlers = {MsgType.HELLO: lambda i, m: seen.append(m), MsgType.UPLOAD: lambda i, m: seen.append(m)}
    if case == "not taken":
        handlers.pop(MsgType.HELLO)

    sent = serve(worker, msg, handlers)

    assert seen == []
    assert [m.type for m in sent] == [MsgType.ERROR] and sent[0].meta["code"] == expected.value
    assert (sent[0].round, sent[0].seq) == (msg.round, msg.seq)
    assert worker.meter.counters[f"rejected.{expected.value}"] == 1
