"""Load: 32 client processes against one server, through the launcher (:mod:`bench.load`).

Pins, from the workers' own metrics: every FORWARD a client sent got exactly one
BACKWARD (requests sent = replies received, nothing lost or sent twice), every round
served all 32 clients, and the server's resident memory after warm-up stays flat to the
end (growth under 10 % or under 50 MB).

On a 2-core machine the 33 processes spend minutes just starting (each imports torch and
transformers), so the test is marked ``slow`` and runs only with ``LESFT_RUN_SLOW=1``
(``LESFT_LOAD_ROUNDS`` sets the rounds, default 50). ``python -m bench.load --clients 32
--rounds 50`` runs the same measurement and writes its tables.
"""

from __future__ import annotations

import os

import pytest

CLIENTS = 32
ROUNDS = int(os.environ.get("LESFT_LOAD_ROUNDS", "50"))
WARMUP = 5

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,  # 32 worker processes take minutes on a small machine (tests/conftest.py)
]


def test_32_clients_lose_no_message_and_server_memory_stays_flat(tmp_path):
    from bench.load import run_load, summary_lines
    from workers.launch import server_rounds

    res = run_load(CLIENTS, ROUNDS, runs_dir=tmp_path / "runs", warmup=WARMUP, timeout_s=3000)
    print("\n".join(summary_lines(res)))

    assert all(code == 0 for code in res["returncodes"].values()), res["returncodes"]
    rows = res["clients"]
    assert len(rows) == CLIENTS
    bad = [r for r in rows if not r["requests"] == r["replies"] == ROUNDS]
    assert not bad, bad
    total = res["total"]
    assert total["requests"] == total["replies"] == CLIENTS * ROUNDS and total["lost"] == 0, total
    rounds = server_rounds(tmp_path / "runs" / f"load-{CLIENTS}x{ROUNDS}")
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    assert all(r["clients"] == list(range(CLIENTS)) for r in rounds)
    mem = res["server"]
    assert mem["warmup_round"] == WARMUP and mem["last_round"] == ROUNDS - 1
    assert mem["flat"], mem
