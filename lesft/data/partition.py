"""Split a pool of examples into per-client datasets, IID or non-IID by ``Example.kind``."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

import numpy as np

from lesft.data.records import DataError, Example

SCHEMES = ("iid", "dirichlet")


def _check(examples: Sequence[Example], n_clients: int, samples_per_client: int | None,
           scheme: str, alpha: float) -> int:
    """Validate the arguments; returns the per-client size (or the mean size for dirichlet)."""
    if scheme not in SCHEMES:
        raise DataError(f"Unknown partition scheme {scheme!r}. Choose one of: {', '.join(SCHEMES)}.")
    if n_clients < 1:
        raise DataError(f"Number of clients must be >= 1, got {n_clients}. Pass --clients 1 or more.")
    if samples_per_client is not None and samples_per_client < 1:
        raise DataError(f"Samples per client must be >= 1, got {samples_per_client}. "
                        f"Pass --samples-per-client 1 or more.")
    if scheme == "dirichlet" and not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}. Pass a positive --alpha (e.g. 0.5).")
    per = len(examples) // n_clients if samples_per_client is None else samples_per_client
    need = n_clients * max(per, 1)
    if per < 1 or need > len(examples):
        raise DataError(f"Partition needs {n_clients} clients x {max(per, 1)} samples = {need} examples "
                        f"but only {len(examples)} are available. Lower --samples-per-client or "
                        f"--clients, or load more examples.")
    return per


def _largest_remainder(weights: np.ndarray, total: int) -> list[int]:
    """Integer counts summing to ``total``, proportional to ``weights`` (ties -> lower index)."""
    raw = weights / weights.sum() * total
    counts = np.floor(raw).astype(int)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


def _dirichlet(examples: Sequence[Example], n_clients: int, total: int, alpha: float,
               seed: int) -> list[list[Example]]:
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_kind[ex.kind].append(ex)
    kinds = sorted(by_kind)
    quotas = _largest_remainder(np.array([len(by_kind[k]) for k in kinds], dtype=float), total)
    clients: list[list[Example]] = [[] for _ in range(n_clients)]
    for kind, quota in zip(kinds, quotas):
        pool = [by_kind[kind][i] for i in rng.permutation(len(by_kind[kind]))[:quota]]
        p = rng.dirichlet(np.full(n_clients, alpha))
        if not np.isfinite(p).all() or p.sum() <= 0:  # tiny alpha can underflow to all zeros
            p = np.eye(n_clients)[rng.integers(n_clients)]
        start = 0
        for client, count in enumerate(_largest_remainder(p, quota)):
            clients[client].extend(pool[start:start + count])
            start += count
    # Every client must train on something: move one example from the largest client.
    for client in range(n_clients):
        if not clients[client]:
            donor = max(range(n_clients), key=lambda c: len(clients[c]))
            clients[client].append(clients[donor].pop())
    for data in clients:  # interleave kinds in each client's training order
        order = rng.permutation(len(data))
        data[:] = [data[i] for i in order]
    return clients


def partition(examples: Sequence[Example], n_clients: int, samples_per_client: int | None = None,
              scheme: str = "iid", alpha: float = 0.5, seed: int = 0) -> list[list[Example]]:
    """Give each of ``n_clients`` its own list of examples; deterministic for ``seed``.

    ``samples_per_client=None`` uses ``len(examples) // n_clients`` (the remainder is
    dropped). Both schemes hand out exactly ``n_clients * samples_per_client`` examples
    in all, each at most once.

    - ``"iid"``: shuffle with ``random.Random(seed)``, take the first
      ``n_clients * samples_per_client`` and give client ``i`` the ``i``-th block of
      ``samples_per_client``: every client gets exactly ``samples_per_client``.
    - ``"dirichlet"``: non-IID over ``Example.kind`` (Hsu et al. 2019), with one
      ``numpy.random.default_rng(seed)``:
      1. group examples by kind (kinds in sorted order); each kind's quota of the total
         is proportional to its share of the pool (largest-remainder rounding);
      2. per kind: shuffle its examples and keep its quota; draw client proportions
         ``p ~ Dirichlet(alpha * ones(n_clients))``; round ``p * quota`` to integers by
         largest remainder; deal the kind's examples to clients in client order;
      3. any client left empty takes one example from the currently largest client;
      4. shuffle each client's list so kinds are interleaved.
      Client sizes differ (that is the point); smaller ``alpha`` means more skew.
    """
    per = _check(examples, n_clients, samples_per_client, scheme, alpha)
    if scheme == "dirichlet":
        return _dirichlet(examples, n_clients, n_clients * per, alpha, seed)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [[examples[i] for i in order[c * per:(c + 1) * per]] for c in range(n_clients)]
