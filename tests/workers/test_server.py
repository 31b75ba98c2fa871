"""The server's answer to a label-private HEAD_GRAD that finds no forward held, without
sockets: the round engine's state is set up directly, and the refusal names the reason
the client logs (it gave up waiting, the round went on, or the server restarted)."""
from __future__ import annotations

import pytest

from conftest import e2e_config
from lesft.rounds import STALE_ROUND, Refused, Request
from lesft.wire import Message, MsgType
from workers.server import Server


@pytest.fixture
def server(tmp_path):
    cfg = e2e_config(tmp_path, label_private=True, straggler_timeout_s=3, min_clients=1, device="cpu")
    s = Server(cfg)
    for c in range(2):
        s.rounds.register(c, 4, 1, f"env-{c}", 0.0)
    yield s
    s.metrics.close()


def head_grad(server: Server, client: int, r: int) -> Refused:
    msg = Message(MsgType.HEAD_GRAD, "client", client, server.run_id, r, 9)
    with pytest.raises(Refused) as e:
        server.on_head_grad(None, msg)
    assert e.value.code == STALE_ROUND
    return e.value


def test_a_head_grad_without_its_forward_is_refused_with_the_reason(server):
    rounds = server.rounds
    for c in range(2):
        rounds.request(Request(c, 0, 5 + c, f"env-{c}", None, 0.0))
    rounds.ready(0.0)
    assert rounds.abandon(3.5, [1]) == [1]

    # the engine gave up waiting for client 1's dL/dH of the open round
    e = head_grad(server, 1, 0)
    assert "gave up waiting for this client's dL/dH (--straggler-timeout-s)" in e.text
    assert e.meta["server_round"] == 0  # the round is still open: the client sends it again

    # once the round closed without it, the client is told the round went on
    rounds.result(0, 0, "reply", 3.6)
    rounds.close(rounds.verdict(3.6), 3.6)
    e = head_grad(server, 1, 0)
    assert "the round went on without this client" in e.text and e.meta["server_round"] == 1

    # a forward of the open round the server never ran: it restarted since
    e = head_grad(server, 0, 1)
    assert "it restarted since it sent the hidden states" in e.text and e.meta["server_round"] == 1
