"""lesft.schedule: the rounds of a run, the same for every party."""
from __future__ import annotations

from lesft.config import build_config
from lesft.schedule import client_epochs, client_sizes, is_aggregation_round, is_step_round, rounds_per_epoch, \
    total_rounds


def test_rounds_per_epoch_rounds_up_and_is_at_least_one():
    assert [rounds_per_epoch(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [1, 1, 1, 2, 2, 3]


def test_total_rounds_follows_the_longest_client_unless_rounds_is_set():
    cfg = build_config(cli={"epochs": "2", "batch_size": "2"}, env={})
    assert total_rounds(cfg, [3, 7, 4]) == 2 * 4
    assert total_rounds(cfg, [3, 7, 4], batch_size=7) == 2
    assert total_rounds(cfg.replace(rounds=5), [3, 7, 4]) == 5


def test_step_and_aggregation_rounds_end_each_window_and_the_run():
    assert [r for r in range(10) if is_step_round(r, 10, 4)] == [3, 7, 9]
    assert [r for r in range(6) if is_aggregation_round(r, 6, 2)] == [1, 3, 5]


def test_smaller_clients_cycle_more():
    assert client_epochs(2, 1, 8) == 4.0 and client_epochs(8, 1, 8) == 1.0
    assert client_sizes({1: 8, 0: 2}, 1, 8) == {"n_samples": {0: 2, 1: 8}, "epochs": {0: 4.0, 1: 1.0}}
