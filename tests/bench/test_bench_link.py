"""`lesft bench link` on a tiny model, over an emulated edge link."""

import json

import pytest

from bench.common import BenchError
from bench.link import parse_depths, window_costs, windows
from lesft.config import build_config
from test_bench_runs import TINY, invoke, shaped_forwards


def test_depths_need_the_synchronous_baseline_and_windows_follow_the_steps():
    assert parse_depths("1,2,4") == [1, 2, 4]
    for bad in ("2,4", "1,0", "one"):
        with pytest.raises(BenchError, match="--pipeline-depth"):
            parse_depths(bad)
    assert windows(4, 10, 4) == [range(4, 8), range(8, 10)]  # the last window ends with the run


def _rec(compute: float, up: int = 0, down: int = 0, agg: int = 0) -> dict:
    return {"compute_total_s": compute, "sent_by_type": {"forward": up, "agg.upload": agg},
            "received_by_type": {"backward": down, "agg.adapters": agg}}


def test_window_bound_is_the_slowest_of_server_clients_and_links():
    cfg = build_config(cli={"link_up": "8mbit", "link_down": "80mbit", "link_latency_ms": 10}, env={})
    server = {1: _rec(5.0), 3: _rec(5.3)}
    slow_link = {1: _rec(1.0), 3: _rec(1.1, up=1_000_000, down=100_000, agg=10**9)}  # agg.*: not on the link
    slow_cpu = {1: _rec(1.0), 3: _rec(1.2, up=100_000, down=100_000)}
    costs = window_costs(server, [slow_link, slow_cpu], range(2, 4), cfg)
    assert costs["server_s"] == pytest.approx(0.3) and costs["client_s"] == pytest.approx(0.2)
    assert costs["link_s"] == pytest.approx(1.0 + 0.02)  # 1 MB up at 8 Mbit/s, then both latencies
    assert costs["bound_s"] == costs["link_s"] and (costs["up"], costs["down"]) == (1_100_000, 200_000)
    fast = build_config(cli={"link_latency_ms": 10}, env={})  # unshaped rates: the latencies only
    assert window_costs(server, [slow_cpu], range(2, 4), fast)["bound_s"] == pytest.approx(0.3)


@pytest.mark.e2e
@pytest.mark.slow
def test_link_bench_at_depth_1_twice(tmp_path):
    invoke("bench", "link", *TINY, "--samples-per-client", "4", "--grad-accum", "2", "--aggregate-every", "2",
           "--pipeline-depth", "1,1", "--link-up", "4mbit", "--link-down", "20mbit", "--link-latency-ms", "50",
           "--out", str(tmp_path), "--runs-dir", str(tmp_path))
    doc = json.loads((tmp_path / "link.json").read_text())
    rows = doc["rows"]
    assert [r["depth"] for r in rows] == [1, 1] and all(r["adapters_equal"] for r in rows)
    for r in rows:
        assert r["rounds_measured"] == 4 and r["up_mb"] > r["down_mb"] > 0  # the reference path rides up only
        # 2 windows, each at least a round trip of latency: the bound is a floor of the wall
        assert 2 * 0.1 <= r["bound_s"] <= r["wall_epoch_s"]
        assert 0 < r["server_busy"] < 1
        assert shaped_forwards(tmp_path / "runs" / f"depth1-{r['run']}") == 2 * 6
    assert rows[0]["wall_over_sync"] == 1.0
    assert doc["config"]["settings"]["net"]["link_up"] == "4mbit"
    assert "emulated edge link per client" in (tmp_path / "link.md").read_text()
    assert (tmp_path / "link.csv").is_file() and (tmp_path / "link.png").stat().st_size > 10_000
