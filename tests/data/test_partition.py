"""Client partitioning: sizes, determinism, skew, errors."""

from collections import Counter

import pytest

from lesft.data import DataError, generate_synthetic, partition


@pytest.fixture(scope="module")
def pool():
    return generate_synthetic(2000, seed=0)


def _mean_tv(clients, pool) -> float:
    """Mean total-variation distance of each client's kind mix from the pool's."""
    kinds = sorted({e.kind for e in pool})
    whole = Counter(e.kind for e in pool)
    dists = []
    for data in clients:
        mine = Counter(e.kind for e in data)
        dists.append(0.5 * sum(abs(mine[k] / len(data) - whole[k] / len(pool)) for k in kinds))
    return sum(dists) / len(dists)


def test_iid_sizes_and_no_reuse(pool):
    clients = partition(pool, 4, 200, seed=1)
    assert [len(c) for c in clients] == [200] * 4
    uids = [e.uid for c in clients for e in c]
    assert len(set(uids)) == 800


def test_iid_default_splits_all_evenly(pool):
    clients = partition(pool[:1003], 4)
    assert [len(c) for c in clients] == [250] * 4


def test_deterministic(pool):
    for scheme in ("iid", "dirichlet"):
        a = partition(pool, 4, 100, scheme=scheme, seed=5)
        b = partition(pool, 4, 100, scheme=scheme, seed=5)
        c = partition(pool, 4, 100, scheme=scheme, seed=6)
        assert a == b and a != c


def test_dirichlet_total_minimum_and_skew(pool):
    clients = partition(pool, 4, 200, scheme="dirichlet", alpha=0.1, seed=0)
    assert sum(len(c) for c in clients) == 800
    assert min(len(c) for c in clients) >= 1
    assert len({e.uid for c in clients for e in c}) == 800
    iid = partition(pool, 4, 200, scheme="iid", seed=0)
    skewed = [_mean_tv(partition(pool, 4, 200, scheme="dirichlet", alpha=0.1, seed=s), pool)
              for s in range(5)]
    assert _mean_tv(iid, pool) < 0.1
    assert min(skewed) > 0.3


def test_dirichlet_every_client_gets_something():
    pool = generate_synthetic(40, seed=0, kinds=["ages"])
    for seed in range(10):
        clients = partition(pool, 8, 2, scheme="dirichlet", alpha=0.01, seed=seed)
        assert sum(map(len, clients)) == 16 and min(map(len, clients)) >= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"n_clients": 0}, "clients must be >= 1"),
    ({"n_clients": 2, "samples_per_client": 0}, "per client must be >= 1"),
    ({"n_clients": 2, "scheme": "dirichlet", "alpha": 0}, "alpha must be > 0"),
    ({"n_clients": 2, "scheme": "pathological"}, "Unknown partition scheme"),
    ({"n_clients": 4, "samples_per_client": 20}, "needs 4 clients x 20 samples = 80 examples but only 30"),
])
def test_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        partition(generate_synthetic(30), **kwargs)
