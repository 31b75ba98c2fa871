"""workers.transport's :class:`Pipeline` over a real in-process ZeroMQ pair: requests sent
ahead, awaited oldest first, each answered on its own (a later reply kept for its turn,
checked against what its own request knows), none sent twice."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import zmq

from lesft import wire
from lesft.config import build_config
from lesft.metrics import Meter
from lesft.wire import MsgType
from workers.transport import Channel, Peer, Pipeline, WorkerError

CLIENT, SERVER = wire.Origin("client", 0), wire.Origin("server", 0)


@pytest.fixture()
def pair():
    """A Pipeline on a DEALER and, at the other end, the ROUTER a test answers from."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("inproc://pipeline")

    def dealer():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect("inproc://pipeline")
        return sock

    cfg = build_config(cli=dict(request_timeout_s=5, retries=1, heartbeat_s=1), env={})
    peer = Peer("server", dealer, Meter("client", 0))
    pipe = Pipeline(peer, cfg=cfg, stop=threading.Event(), log=logging.getLogger("test"))
    far = Channel(router, Meter("server", 0), routed=True)
    yield pipe, far, peer
    peer.close()
    far.close()
    ctx.term()


def shape(r: int) -> tuple[int, int, int]:
    return (1, 3 + r, 2)  # every round's activations have their own width


def receive(far: Channel) -> tuple[list, wire.Message]:
    assert far.sock.poll(2000)
    got = far.recv()
    assert got.error is None
    return got.envelope, got.msg


def test_replies_out_of_order_are_kept_for_their_turn_and_nothing_is_sent_twice(pair):
    # Prepare: three requests in flight, each expecting a gradient of its own round's shape
    pipe, far, peer = pair
    for r in range(3):
        pipe.send(wire.fetch(CLIENT, r, 10 + r), {MsgType.BACKWARD}, wire.Knows(grad_shape=shape(r)))
    requests = [receive(far) for _ in range(3)]
    assert [m.round for _, m in requests] == [0, 1, 2]

    # Execute: the far end answers the newest first
    for envelope, m in reversed(requests):
        far.send(wire.backward(SERVER, m.round, m.seq, loss_sum=float(m.round), valid_rows=1,
                               grad=torch.full(shape(m.round), float(m.round))), envelope)
    replies = [pipe.wait(r) for r in range(3)]

    # Assert: each round got its own reply, checked against its own shape; no request went out twice
    assert [(m.round, m.meta["loss_sum"], tuple(m.tensors["grad"].shape)) for m in replies] == \
        [(r, float(r), shape(r)) for r in range(3)]
    assert peer.meter.snapshot()["msgs_sent"].get("fetch") == 3


def test_a_kept_reply_that_fails_its_own_check_ends_the_wait_with_one_line(pair):
    pipe, far, _ = pair
    for r in range(2):
        pipe.send(wire.fetch(CLIENT, r, 10 + r), {MsgType.BACKWARD}, wire.Knows(grad_shape=shape(r)))
    requests = [receive(far) for _ in range(2)]
    wrong = shape(0)  # round 1's answer has round 0's shape: fine for any request, not for its own
    for envelope, m in reversed(requests):
        far.send(wire.backward(SERVER, m.round, m.seq, loss_sum=0.0, valid_rows=1,
                               grad=torch.zeros(wrong)), envelope)
    assert pipe.wait(0).round == 0
    with pytest.raises(WorkerError, match=r"unusable answer to .* of round 1 \(bad_shape"):
        pipe.wait(1)


def test_a_second_leg_is_checked_as_its_round_was_while_later_rounds_stay_in_flight(pair):
    # Prepare: rounds 0 and 1 in flight; round 0's first leg answered
    pipe, far, peer = pair
    for r in range(2):
        pipe.send(wire.fetch(CLIENT, r, 10 + r), {MsgType.BACKWARD}, wire.Knows(grad_shape=shape(r)))
    requests = [receive(far) for _ in range(2)]
    envelope, first = requests[0]
    far.send(wire.backward(SERVER, 0, first.seq, loss_sum=0.0, valid_rows=1, grad=torch.zeros(shape(0))), envelope)
    assert pipe.wait(0).seq == first.seq
    with pytest.raises(ValueError, match="round 1 has no answered first leg"):
        pipe.follow(wire.fetch(CLIENT, 1, 30), {MsgType.BACKWARD})

    # Execute: round 0's second leg out; round 1 answered before it, then the second leg with
    # round 1's shape (fine for round 1, not for round 0)
    pipe.follow(wire.fetch(CLIENT, 0, 20), {MsgType.BACKWARD})
    envelope, second = receive(far)
    later_envelope, later = requests[1]
    far.send(wire.backward(SERVER, 1, later.seq, loss_sum=1.0, valid_rows=1, grad=torch.ones(shape(1))),
             later_envelope)
    far.send(wire.backward(SERVER, 0, second.seq, loss_sum=0.0, valid_rows=1, grad=torch.zeros(shape(1))), envelope)

    # Assert: the second leg went out once, under its own seq, and its answer is checked as round 0's
    assert (second.round, second.seq) == (0, 20)
    with pytest.raises(WorkerError, match=r"unusable answer to .* of round 0 \(bad_shape"):
        pipe.wait(0)
    assert pipe.wait(1).meta["loss_sum"] == 1.0  # kept for its turn
    assert peer.meter.snapshot()["msgs_sent"].get("fetch") == 3
