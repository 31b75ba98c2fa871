"""`lesft bench link` on a tiny model, over an emulated edge link."""

import json

import pytest

from bench.common import BenchError
from bench.link import parse_depths, windows
from test_bench_runs import TINY, invoke, shaped_forwards


def test_depths_need_the_synchronous_baseline_and_windows_follow_the_steps():
    assert parse_depths("1,2,4") == [1, 2, 4]
    for bad in ("2,4", "1,0", "one"):
        with pytest.raises(BenchError, match="--pipeline-depth"):
            parse_depths(bad)
    assert windows(4, 10, 4) == [range(4, 8), range(8, 10)]  # the last window ends with the run


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
