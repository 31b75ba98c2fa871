"""Which rounds a run has: their number, and after which ones the optimiser steps and the
client adapters are averaged (Algorithm 1). Pure arithmetic, shared by the in-process
trainer and every worker process, so all parties agree on the schedule.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from lesft.config import Config


def rounds_per_epoch(n_samples: int, batch_size: int) -> int:
    """Rounds one client needs to see its ``n_samples`` once, ``batch_size`` per round (at least 1)."""
    return max(1, math.ceil(n_samples / batch_size))


def total_rounds(cfg: Config, sizes: Sequence[int], batch_size: int | None = None) -> int:
    """Rounds of the run: ``--rounds`` or ``epochs x`` the longest client epoch."""
    if cfg.train.rounds:
        return cfg.train.rounds
    b = batch_size or cfg.train.batch_size
    return cfg.train.epochs * max(rounds_per_epoch(n, b) for n in sizes)


def is_step_round(r: int, total: int, grad_accum: int) -> bool:
    """Whether the optimiser steps after round ``r`` (0-based): end of a window or of the run."""
    return (r + 1) % grad_accum == 0 or r == total - 1


def is_aggregation_round(r: int, total: int, every: int) -> bool:
    return (r + 1) % every == 0 or r == total - 1


def client_epochs(n_samples: int, batch_size: int, rounds: int) -> float:
    """Passes over its own data a client of ``n_samples`` makes in ``rounds`` (smaller clients cycle more)."""
    return rounds / rounds_per_epoch(n_samples, batch_size)


def client_sizes(sizes: Mapping[int, int], batch_size: int, rounds: int) -> dict:
    """Every client's ``n_samples`` and epochs, as the trainer, server and aggregator record them."""
    return {"n_samples": dict(sorted(sizes.items())),
            "epochs": {c: client_epochs(n, batch_size, rounds) for c, n in sorted(sizes.items())}}
