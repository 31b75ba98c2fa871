"""The round engine (lesft/rounds.py) driven with a fake clock and no processes: the
server's sequential rounds and the aggregator's independent ones."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from lesft.rounds import (NOT_READY, STALE_ROUND, Decision, Policy, Refused, Request, Rounds, Send, Verdict,
                          Welcome)

TOTAL = 10


def server(expected=2, *, timeout=0.0, min_clients=0, batch_wait=2.0, depth=1, started=True) -> Rounds:
    """Sequential rounds as the server keeps them; with ``started``, every client registered at t=0."""
    counts: Counter = Counter()
    rounds = Rounds(Policy(expected, timeout, min_clients), lambda sizes: TOTAL, depth=depth,
                    batch_wait_s=batch_wait, resend_after_s=4.0, count=lambda name, n: counts.update({name: n}))
    rounds.counts = counts  # for the assertions
    if started:
        for c in range(expected):
            rounds.register(c, 4, 1, f"hello-{c}", 0.0)
    return rounds


def aggregator(expected=2, *, timeout=0.0, min_clients=0, every=4) -> Rounds:
    rounds = Rounds(Policy(expected, timeout, min_clients), lambda sizes: TOTAL, window=2 * every)
    for c in range(expected):
        rounds.register(c, 4, 1, f"hello-{c}", 0.0)
    return rounds


def ask(rounds: Rounds, client: int, r: int, seq: int, now: float, to: str | None = None) -> Send | None:
    return rounds.request(Request(client, r, seq, to or f"env-{client}", f"forward {client}/{r}", now))


def run(rounds: Rounds, now: float) -> list[int]:
    """Run what is ready: every request's reply is ``reply <client>/<round>``."""
    batch = rounds.ready(now)
    for q in batch:
        rounds.result(q.client, q.round, f"reply {q.client}/{q.round}", now)
    return [q.client for q in batch]


def close(rounds: Rounds, now: float) -> tuple[Verdict, list[Send]]:
    verdict = rounds.verdict(now)
    assert verdict is not None
    rounds.close(verdict, now)
    return verdict, rounds.release(now)


def serve_round(rounds: Rounds, r: int, now: float) -> list[Send]:
    for c in range(rounds.policy.expected):
        ask(rounds, c, r, 10 + r, now)
    assert run(rounds, now) == list(range(rounds.policy.expected))
    return close(rounds, now)[1]


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize("results, waited, expected", [
    (1, 2.0, Decision.WAIT),  # within the timeout
    (0, 100.0, Decision.WAIT),  # an empty round is never closed
    (2, 3.5, Decision.ACCEPT),  # enough results once overdue
    (1, 3.5, Decision.WAIT),  # too few, not long enough to fail
    (1, 9.5, Decision.FAIL),  # too few for more than 3 x the timeout
])
def test_policy_accepts_fails_or_waits(results, waited, expected):
    assert Policy(3, straggler_timeout_s=3.0, min_clients=2).decide(results, waited) is expected


def test_policy_without_a_timeout_always_waits():
    assert Policy(2).decide(1, 1e9) is Decision.WAIT
    assert Policy(2).need == 2 and Policy(2, min_clients=1).need == 1


def test_refusals_carry_wire_error_codes():
    from lesft.wire import ErrorCode
    from workers.common import as_wire_error

    err = as_wire_error(Refused(STALE_ROUND, "round 1 is over", server_round=3))
    assert err.code is ErrorCode.STALE_ROUND and err.meta == {"server_round": 3}
    assert ErrorCode(NOT_READY) is ErrorCode.NOT_READY


def test_the_engine_needs_neither_torch_nor_zmq():
    code = "import sys, lesft.rounds; assert not {'torch', 'zmq'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- registration


def test_registration_waits_for_everyone_then_welcomes_each_once():
    rounds = server(started=False)
    first = rounds.register(0, 4, 1, "env-0", 0.0)
    assert first.new and not first.started and first.welcome == [] and rounds.unregistered() == [1]
    with pytest.raises(Refused) as e:
        ask(rounds, 0, 0, 2, 0.5)
    assert e.value.code == NOT_READY
    second = rounds.register(1, 6, 1, "env-1", 1.0)
    assert second.started and rounds.total == TOTAL
    assert second.welcome == [Welcome(0, 1, "env-0"), Welcome(1, 1, "env-1")]
    # a restarted client registers again: only it is welcomed, at the open round
    again = rounds.register(0, 4, 7, "env-0b", 2.0)
    assert again.again and not again.new and again.welcome == [Welcome(0, 7, "env-0b")]


def test_plan_sees_every_clients_size():
    seen = []
    rounds = Rounds(Policy(2), lambda sizes: seen.append(sorted(sizes)) or 3)
    rounds.register(0, 4, 1, None, 0.0)
    rounds.register(1, 9, 1, None, 0.0)
    assert seen == [[4, 9]] and rounds.total == 3


def test_a_late_joiner_after_a_resume_is_welcomed_at_the_open_round():
    rounds = server(started=False)
    rounds.restore({"round": 5, "rounds": TOTAL, "clients": {0: 4, 1: 4}, "replies": []}, 0.0)
    joined = rounds.register(1, 4, 3, "env-1", 1.0)
    assert not joined.new and not joined.again and joined.welcome == [Welcome(1, 3, "env-1")]
    assert rounds.current == 5


# ----------------------------------------------------------------------------- one round


def test_a_round_runs_when_everyone_sent_and_replies_leave_when_it_closes():
    rounds = server()
    assert ask(rounds, 1, 0, 11, 0.1) is None and run(rounds, 0.2) == []  # waits for client 0
    assert ask(rounds, 0, 0, 21, 0.3) is None
    assert run(rounds, 0.3) == [0, 1]  # sorted, as one microbatch
    verdict, sends = close(rounds, 0.4)
    assert verdict.accepted and verdict.failures == () and sorted(verdict.results) == [0, 1]
    assert sends == [Send(0, 0, 21, "env-0", "reply 0/0"), Send(1, 0, 11, "env-1", "reply 1/0")]
    assert rounds.current == 1


def test_a_partial_microbatch_runs_after_the_batch_wait():
    rounds = server(batch_wait=2.0)
    ask(rounds, 0, 0, 1, 0.0)
    assert run(rounds, 1.9) == [] and run(rounds, 2.0) == [0]
    assert rounds.verdict(2.0) is None  # still waits for client 1
    ask(rounds, 1, 0, 1, 2.5)
    assert run(rounds, 2.5) == [1]
    verdict, _ = close(rounds, 2.5)
    assert verdict.accepted and sorted(verdict.results) == [0, 1]


def test_stale_and_past_the_end_are_refused():
    rounds = server()
    serve_round(rounds, 0, 0.0)
    serve_round(rounds, 1, 1.0)
    with pytest.raises(Refused) as e:
        ask(rounds, 0, 0, 99, 2.0)  # its reply of round 0 is no longer cached (round 1's is)
    assert e.value.code == STALE_ROUND and e.value.meta == {"server_round": 2}
    with pytest.raises(Refused) as e:
        ask(rounds, 0, TOTAL, 99, 2.0)
    assert e.value.code == STALE_ROUND and "past the last round" in e.value.text


# ----------------------------------------------------------------------------- repeats


def test_a_repeat_of_an_answered_request_gets_the_cached_reply():
    rounds = server()
    serve_round(rounds, 0, 0.0)
    again = ask(rounds, 1, 0, 42, 1.0, to="env-1b")
    assert again == Send(1, 0, 42, "env-1b", "reply 1/0")
    assert rounds.counts["repeated_requests"] == 1


def test_a_repeat_in_progress_runs_once_and_is_answered_on_its_newest_copy():
    rounds = server()
    ask(rounds, 0, 0, 1, 0.0, to="old")
    assert ask(rounds, 0, 0, 2, 0.1, to="new") is None  # waiting: replaced, not queued twice
    ask(rounds, 1, 0, 1, 0.1)
    batch = rounds.ready(0.1)
    assert [(q.client, q.seq) for q in batch] == [(0, 2), (1, 1)]
    rounds.result(0, 0, "reply 0/0", 0.2)
    assert ask(rounds, 1, 0, 5, 0.2, to="newest") is None  # running: nothing runs again
    rounds.result(1, 0, "reply 1/0", 0.3)
    assert ask(rounds, 0, 0, 3, 0.3, to="newer") is None  # answered, round still open: held
    assert rounds.ready(0.3) == []
    _, sends = close(rounds, 0.4)
    assert [(s.client, s.seq, s.reply_to) for s in sends] == [(0, 3, "newer"), (1, 5, "newest")]
    assert rounds.counts["repeated_requests"] == 1  # the replaced waiting one


# ----------------------------------------------------------------------------- stragglers


def test_a_straggler_is_left_out_after_the_deadline_and_catches_up():
    rounds = server(timeout=3.0, min_clients=1)
    ask(rounds, 0, 0, 1, 0.5)  # the round's straggler clock starts here
    assert run(rounds, 2.5) == [0]
    assert rounds.verdict(3.5) is None  # not past the deadline yet
    verdict, sends = close(rounds, 3.6)
    assert verdict.accepted and verdict.failures == (1,) and verdict.waited == pytest.approx(3.1)
    assert [s.client for s in sends] == [0] and rounds.counts["stragglers_dropped"] == 1
    # the next round does not wait for it
    ask(rounds, 0, 1, 2, 3.7)
    assert run(rounds, 3.7) == [0]
    verdict, _ = close(rounds, 3.7)
    assert verdict.failures == () and list(verdict.results) == [0]
    # it comes back: its old round is over, so it continues at the server's round
    with pytest.raises(Refused) as e:
        ask(rounds, 1, 0, 5, 4.0)
    assert e.value.meta == {"server_round": 2}
    ask(rounds, 1, 2, 6, 4.1)
    assert rounds.required() == {0, 1}
    assert run(rounds, 4.1) == []  # waits for client 0 again


def test_a_straggler_round_runs_at_once_without_waiting_for_a_fuller_microbatch():
    rounds = server(timeout=3.0, min_clients=1, batch_wait=10.0)
    ask(rounds, 0, 0, 1, 0.5)
    assert run(rounds, 3.0) == []  # neither overdue nor past the batch wait
    assert run(rounds, 3.6) == [0]  # overdue: the rest of the batch wait is not waited


def test_a_round_opened_while_every_client_was_away_has_no_straggler_until_one_comes():
    # Prepare: round 1 opens at 1.0; the clients are elsewhere (an aggregation) until 10.0
    rounds = server(timeout=3.0, min_clients=1)
    serve_round(rounds, 0, 1.0)

    # Act: client 0 comes back first, client 1 half a second later
    ask(rounds, 0, 1, 20, 10.0)
    first = run(rounds, 10.0)
    ask(rounds, 1, 1, 21, 10.5)

    # Assert: the round waited for client 1 and closes with both
    assert first == [] and run(rounds, 10.5) == [0, 1]
    verdict, sends = close(rounds, 10.5)
    assert verdict.failures == () and [s.client for s in sends] == [0, 1]
    assert rounds.counts["stragglers_dropped"] == 0


def test_below_min_clients_a_round_waits_then_fails_and_still_answers():
    rounds = server(timeout=3.0, min_clients=2)
    ask(rounds, 0, 0, 1, 0.0)
    assert run(rounds, 2.0) == [0]
    assert rounds.verdict(5.0) is None  # overdue, too few, not yet 3 x the timeout
    verdict, sends = close(rounds, 9.1)
    assert not verdict.accepted and verdict.failures == (1,) and list(verdict.results) == [0]
    assert [s.client for s in sends] == [0] and rounds.counts["failed_rounds"] == 1
    assert rounds.required() == {0, 1}  # without client 1 the next round would be short too: wait for all


def test_a_round_nobody_sent_to_never_closes():
    rounds = server(timeout=3.0, min_clients=1)
    assert rounds.verdict(1000.0) is None and rounds.ready(1000.0) == []


# ----------------------------------------------------------------------------- resume


def test_resume_at_round_r_keeps_the_reply_cache():
    rounds = server()
    for r in range(3):
        serve_round(rounds, r, float(r))
    state = rounds.snapshot()
    resumed = server(started=False)
    resumed.restore(state, 100.0)
    assert (resumed.current, resumed.total, resumed.sizes) == (3, TOTAL, {0: 4, 1: 4})
    assert ask(resumed, 0, 2, 77, 101.0) == Send(0, 2, 77, "env-0", "reply 0/2")
    # a lost reply is sent again on the first heartbeat asking for it
    have, again = resumed.heartbeat(0, 2, 77, "env-0c", 101.5)
    assert have and again == Send(0, 2, 77, "env-0c", "reply 0/2")
    ask(resumed, 0, 3, 1, 102.0)
    ask(resumed, 1, 3, 1, 102.0)
    assert run(resumed, 102.0) == [0, 1]


def test_after_a_resume_from_an_older_checkpoint_the_rounds_move_to_the_clients():
    rounds = server(started=False)
    rounds.restore({"round": 3, "rounds": TOTAL, "clients": {0: 4, 1: 4}, "replies": []}, 0.0)
    ask(rounds, 0, 6, 1, 0.1)
    assert rounds.skip_ahead(0.1) is None  # client 1 may still come for round 3
    ask(rounds, 1, 6, 1, 0.2)
    assert rounds.skip_ahead(0.2) == range(3, 6) and rounds.current == 6
    assert rounds.counts["skipped_rounds"] == 3
    assert run(rounds, 0.2) == [0, 1]


def test_a_client_ahead_keeps_only_its_newest_request():
    rounds = server()
    ask(rounds, 0, 4, 1, 0.0)
    ask(rounds, 0, 5, 2, 0.1)
    assert 4 not in rounds.open and list(rounds.open[5].requests) == [0]


# ----------------------------------------------------------------------------- waiting clients


def test_heartbeats_say_what_is_held_and_resend_what_looks_lost():
    rounds = server(started=False)
    rounds.register(0, 4, 1, "env-0", 0.0)
    assert rounds.heartbeat(0, -1, 1, "beat", 0.1) == (True, None)  # registration held, not welcomed yet
    assert rounds.heartbeat(1, -1, 1, "beat", 0.1) == (False, None)  # unknown client
    rounds.register(1, 4, 1, "env-1", 0.2)
    assert rounds.heartbeat(0, -1, 1, "beat", 0.3) == (True, Welcome(0, 1, "env-0"))
    ask(rounds, 0, 0, 2, 1.0)
    assert rounds.heartbeat(0, 0, 2, "beat", 1.1) == (True, None)  # waiting to run
    assert rounds.heartbeat(0, 0, 3, "beat", 1.1) == (False, None)  # another request: send it again
    ask(rounds, 1, 0, 2, 1.2)
    run(rounds, 1.2)
    assert rounds.heartbeat(1, 0, 2, "beat-1", 1.3) == (True, None)  # answered, round open
    _, sends = close(rounds, 1.4)
    assert {s.reply_to for s in sends} == {"env-0", "beat-1"}  # the newest way to reach it
    assert rounds.heartbeat(0, 0, 2, "beat", 3.0) == (True, None)  # may cross the reply
    assert rounds.heartbeat(0, 0, 2, "beat", 5.5) == (True, Send(0, 0, 2, "beat", "reply 0/0"))
    assert rounds.counts["replies_resent"] == 1


def test_the_run_is_complete_after_the_last_round_and_every_bye():
    rounds = server()
    for r in range(TOTAL):
        serve_round(rounds, r, float(r))
    assert not rounds.serving and not rounds.bye(0, 30, "bye-0")
    assert rounds.heartbeat(0, -1, 30, "beat", 20.0) == (True, None)
    assert rounds.byes[0] == ("beat", 30)
    assert rounds.bye(1, 31, "bye-1") and rounds.complete


def test_a_bye_before_the_last_round_does_not_complete_the_run():
    rounds = server()
    assert not rounds.bye(0, 1, "a") and not rounds.bye(1, 1, "b")


# ----------------------------------------------------------------------------- rounds in flight


def test_two_rounds_in_flight_for_one_client():
    rounds = server(depth=2)
    ask(rounds, 0, 0, 1, 0.0)
    ask(rounds, 0, 1, 2, 0.1)  # before its reply of round 0
    ask(rounds, 1, 0, 1, 0.2)
    assert run(rounds, 0.2) == [0, 1]
    _, sends = close(rounds, 0.3)
    assert [(s.client, s.round) for s in sends] == [(0, 0), (1, 0)]
    assert rounds.heartbeat(0, 1, 2, "beat", 0.4) == (True, None)  # round 1 waits, held
    ask(rounds, 1, 1, 2, 0.5)
    assert run(rounds, 0.5) == [0, 1]
    close(rounds, 0.6)
    # both of client 0's replies are kept for repeats
    assert ask(rounds, 0, 0, 9, 0.7).value == "reply 0/0"
    assert ask(rounds, 0, 1, 10, 0.7).value == "reply 0/1"


def test_rows_sent_ahead_wait_queued_and_run_in_round_order():
    # Prepare: client 0 pipelines a whole window (rounds 0..3), client 1 is lock-step
    rounds = server(depth=4)
    for r in range(4):
        ask(rounds, 0, r, 1 + r, 0.0)
    ask(rounds, 1, 0, 1, 0.0)

    # Execute: serve the rounds as client 1 catches up, one round at a time
    ran = []
    for r in range(4):
        if r:
            assert run(rounds, 0.1 + r) == []  # round r opened: client 0's early row waits for client 1
            ask(rounds, 1, r, 1 + r, 0.1 + r)
        batch = rounds.ready(0.1 + r)
        assert rounds.ready(0.1 + r) == []  # nothing of a later round runs before this one closes
        ran.append([(q.client, q.round) for q in batch])
        for q in batch:
            rounds.result(q.client, q.round, f"reply {q.client}/{q.round}", 0.1 + r)
        _, sends = close(rounds, 0.1 + r)
        assert [(s.client, s.round, s.seq) for s in sends] == [(0, r, 1 + r), (1, r, 1 + r)]

    # Assert: every early row ran once, grouped with its round, in round order
    assert ran == [[(0, r), (1, r)] for r in range(4)]
    assert sorted(n for c, n in rounds.cache if c == 0) == [0, 1, 2, 3]  # a whole window for repeats
    assert rounds.counts["repeated_requests"] == 0


def test_a_row_sent_ahead_waits_for_a_microbatch_from_when_its_round_opens():
    rounds = server(batch_wait=2.0, depth=2)
    ask(rounds, 0, 1, 2, 0.0)  # round 1, long before round 0 closes
    serve_round(rounds, 0, 5.0)
    assert run(rounds, 6.0) == []  # it came early, but round 1 opened at 5.0: wait for client 1
    assert run(rounds, 7.1) == [0]  # the batch wait is over: a partial microbatch


def test_a_restarted_pipelined_client_resending_its_rounds_gets_each_run_once():
    # Prepare: client 0 had rounds 0..2 in flight; round 0 is answered, round 1 runs, round 2 waits
    rounds = server(depth=4)
    for r in range(3):
        ask(rounds, 0, r, 1 + r, 0.0)
    ask(rounds, 1, 0, 1, 0.0)
    run(rounds, 0.1)
    close(rounds, 0.1)
    ask(rounds, 1, 1, 2, 0.2)
    batch = rounds.ready(0.2)

    # Execute: the restarted client sends rounds 0..2 again, with new seqs from a new socket
    again = [ask(rounds, 0, r, 100 + r, 0.3, to="new") for r in range(3)]
    for q in batch:
        rounds.result(q.client, q.round, f"reply {q.client}/{q.round}", 0.4)
    _, sends = close(rounds, 0.4)

    # Assert: round 0 from the cache, round 1 answered once on its newest copy, round 2 still queued
    assert again[0] == Send(0, 0, 100, "new", "reply 0/0") and again[1:] == [None, None]
    assert [(s.client, s.round, s.seq, s.reply_to) for s in sends] == [(0, 1, 101, "new"), (1, 1, 2, "env-1")]
    assert rounds.open[2].requests[0].seq == 102
    assert [q.round for q in batch] == [1, 1]


def test_with_depth_one_only_the_newest_reply_is_kept():
    rounds = server(depth=1)
    serve_round(rounds, 0, 0.0)
    serve_round(rounds, 1, 1.0)
    assert sorted(rounds.cache) == [(0, 1), (1, 1)]


# ----------------------------------------------------------------------------- the aggregator


def test_aggregator_round_closes_when_every_client_uploaded():
    rounds = aggregator()
    assert rounds.result(0, 3, "up 0", 1.0)
    assert rounds.verdict(1.0) is None
    assert rounds.result(1, 3, "up 1", 2.0)
    verdict = rounds.verdict(2.0)
    assert verdict.accepted and verdict.results == {0: "up 0", 1: "up 1"}
    rounds.close(verdict, 2.0)
    assert rounds.release(2.0) == []  # uploads are not replies
    assert not rounds.result(0, 3, "retry", 3.0)  # already aggregated
    rounds.check_outcome(3)
    rounds.check_outcome(-1)
    with pytest.raises(Refused) as e:
        rounds.check_outcome(7)
    assert e.value.code == NOT_READY


def test_aggregator_takes_uploads_only_within_its_window():
    rounds = aggregator(every=4)
    rounds.check_window(7)
    with pytest.raises(Refused) as e:
        rounds.result(0, 8, "far", 0.0)
    assert e.value.code == NOT_READY and "too far ahead" in e.value.text
    for c in range(2):
        rounds.result(c, 3, "up", 0.0)
    rounds.close(rounds.verdict(0.0), 0.0)
    rounds.check_window(11)  # the window moved with the outcome


def test_aggregator_straggler_clock_starts_with_the_first_upload():
    rounds = aggregator(timeout=3.0, min_clients=1)
    rounds.result(0, 3, "up 0", 10.0)
    assert rounds.verdict(13.0) is None
    verdict = rounds.verdict(13.1)
    assert verdict.accepted and verdict.failures == (1,) and verdict.results == {0: "up 0"}
    rounds.close(verdict, 13.1)
    # independent rounds: the next aggregation waits for client 1 again
    rounds.result(0, 7, "up 0", 20.0)
    assert rounds.verdict(21.0) is None and rounds.required() == {0, 1}


def test_aggregator_failed_round_refuses_later_uploads_and_fetches():
    rounds = aggregator(timeout=3.0, min_clients=2)
    rounds.result(0, 3, "up 0", 0.0)
    assert rounds.verdict(5.0) is None
    verdict = rounds.verdict(9.5)
    assert not verdict.accepted
    rounds.close(verdict, 9.5, note="aggregation of round 3 failed")
    for refuse in (lambda: rounds.result(1, 3, "late", 10.0), lambda: rounds.check_outcome(3)):
        with pytest.raises(Refused) as e:
            refuse()
        assert e.value.code == STALE_ROUND and e.value.text == "aggregation of round 3 failed"
    rounds.check_window(11)  # a failed round moves the window too


def test_aggregator_run_is_complete_once_every_client_said_bye():
    rounds = aggregator()
    assert not rounds.bye(0, 5, "a") and rounds.bye(1, 5, "b")


# ------------------------------------------------------------- label-private: two exchanges per request


def test_a_running_request_is_held_and_a_second_message_of_it_only_retargets_the_reply():
    rounds = server()
    ask(rounds, 0, 0, 5, 0.0)
    ask(rounds, 1, 0, 6, 0.0)
    batch = rounds.ready(0.0)  # forwarded; the dL/dH of each comes later
    assert [q.client for q in batch] == [0, 1] and rounds.holds(0, 0) and not rounds.holds(0, 1)
    assert ask(rounds, 0, 0, 7, 1.0, to="head-grad-0") is None  # the HEAD_GRAD of client 0
    assert rounds.ready(1.0) == [] and rounds.verdict(1.0) is None  # nothing runs twice, nothing closes
    for c in (0, 1):
        rounds.result(c, 0, f"reply {c}/0", 1.0)
    _, sent = close(rounds, 1.0)
    assert [(s.client, s.seq, s.reply_to) for s in sent] == [(0, 7, "head-grad-0"), (1, 6, "env-1")]
    again = ask(rounds, 0, 0, 8, 2.0, to="head-grad-0-again")  # its reply was lost: the cache answers
    assert (again.seq, again.reply_to, again.value) == (8, "head-grad-0-again", "reply 0/0")


def test_a_running_request_is_given_up_once_it_has_run_past_the_timeout_and_the_round_closes_without_it():
    rounds = server(expected=3, timeout=3.0, min_clients=1)
    for c in range(3):
        ask(rounds, c, 0, 5 + c, 0.0)
    rounds.ready(0.0)
    assert rounds.abandon(2.0, [1, 2]) == []  # not overdue yet
    assert rounds.abandon(3.5, [1, 2, 9]) == [1, 2] and not rounds.holds(1, 0) and rounds.holds(0, 0)
    rounds.result(0, 0, "reply 0/0", 3.6)  # client 0's dL/dH came: its microbatch finishes without 1 and 2
    verdict, sent = close(rounds, 3.6)
    assert verdict.failures == (1, 2) and verdict.accepted and [(s.client, s.seq) for s in sent] == [(0, 5)]
    assert rounds.abandon(10.0, [0]) == []


def test_the_engine_remembers_whom_it_gave_up_until_the_round_closes():
    rounds = server(expected=2, timeout=3.0, min_clients=1)
    for c in range(2):
        ask(rounds, c, 0, 5 + c, 0.0)
    rounds.ready(0.0)
    assert not rounds.abandoned(1, 0)
    assert rounds.abandon(3.5, [1]) == [1]
    assert rounds.abandoned(1, 0) and not rounds.abandoned(0, 0) and not rounds.abandoned(1, 1)
    ask(rounds, 1, 0, 9, 3.6)  # it sends the round again: still the one given up, until the round closes
    assert rounds.abandoned(1, 0)
    rounds.result(0, 0, "reply 0/0", 3.7)
    assert [q.client for q in rounds.ready(3.7)] == [1]
    rounds.result(1, 0, "reply 1/0", 3.8)
    close(rounds, 3.8)
    assert not rounds.abandoned(1, 0) and rounds.current == 1


def test_a_request_that_starts_running_in_an_overdue_round_gets_its_full_time():
    # Prepare: client 1's request of round 0 ran at 0.0 (and min_clients 2 keeps the round
    # open without client 0); client 0 sends only at 5.0, when the round is overdue
    rounds = server(expected=2, timeout=3.0, min_clients=2)
    ask(rounds, 1, 0, 4, 0.0)
    assert run(rounds, 2.0) == [1] and rounds.verdict(5.0) is None
    ask(rounds, 0, 0, 5, 5.0)
    assert [q.client for q in rounds.ready(5.0)] == [0]

    # Assert: its dL/dH is awaited for the timeout from then, not given up at once
    assert rounds.abandon(5.1, [0]) == [] and rounds.holds(0, 0)
    assert rounds.abandon(8.5, [0]) == [0] and not rounds.holds(0, 0)
