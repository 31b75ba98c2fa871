"""`lesft bench overhead | pipeline | accuracy | sweep` and `lesft summary` on a tiny model."""

import json

import pytest
from typer.testing import CliRunner

from lesft.cli import app

TINY = ["--model", "arch:tiny-qwen2", "--clients", "2", "--samples-per-client", "2", "--max-length", "48",
        "--microbatch-wait-ms", "60000"]


def invoke(*args):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


def shaped_forwards(run_dir) -> int:
    """FORWARD messages the run's broker held on its emulated link (0: the link flags never reached it)."""
    from lesft.metrics import read_jsonl

    return sum(r.get("type") == "forward" for r in read_jsonl(run_dir / "broker-0.jsonl") if r["event"] == "link")


@pytest.mark.e2e
@pytest.mark.slow  # two full overhead runs: ~2 min (make test-slow)
def test_overhead_table_for_lesft_fp32_and_bf16(tmp_path):
    invoke("bench", "overhead", *TINY, "--methods", "lesft", "--wire-dtypes", "fp32,bf16", "--warmup", "1",
           "--link-latency-ms", "1", "--out", str(tmp_path), "--runs-dir", str(tmp_path))
    doc = json.loads((tmp_path / "overhead.json").read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    fp32, bf16 = rows["lesft@fp32"], rows["lesft@bf16"]
    for r in (fp32, bf16):
        for key in ("mem_client_mb", "mem_server_mb", "comm_client_mb", "comm_server_mb", "lat_client_s",
                    "lat_server_s", "paper_comm_mb", "forward_mb", "backward_mb"):
            assert r[key] is not None and r[key] > 0, key
    # the paper's accounting is independent of the wire dtype; the bytes we send are not
    assert fp32["paper_comm_mb"] == pytest.approx(bf16["paper_comm_mb"])
    assert bf16["forward_mb"] == pytest.approx(fp32["forward_mb"] / 2, rel=0.1)
    assert bf16["comm_split_mb"] < fp32["comm_split_mb"]
    # no gradient for the reference path: what comes back is smaller than what goes up
    assert fp32["backward_mb"] < fp32["forward_mb"]
    assert (tmp_path / "overhead.md").is_file() and (tmp_path / "overhead.png").is_file()
    assert "emulated edge link per client" in (tmp_path / "overhead.md").read_text()
    assert shaped_forwards(tmp_path / "runs" / "lesft-bf16") >= 2 * 3  # 2 clients x (1 warm-up + 2 rounds)
    names = {t["target"] for t in doc["config"]["targets"]}
    assert any("paper accounting" in n for n in names)


def test_accuracy_and_sweep_grids_resume(tmp_path):
    common = [*TINY, "--rounds", "2", "--limit", "3", "--max-new-tokens", "3", "--runs-dir", str(tmp_path)]
    acc = ["bench", "accuracy", "--datasets", "synthetic", "--methods", "base,splitlora", "--seeds", "0,1",
           *common, "--out", str(tmp_path / "acc"), "--train-runs", str(tmp_path / "train-runs")]
    invoke(*acc, "--report", str(tmp_path / "results.md"))
    cells = sorted((tmp_path / "acc" / "cells").glob("*.json"))
    assert len(cells) == 3  # base is not trained: one cell for every seed
    trained = [json.loads(c.read_text()) for c in cells if c.name.startswith("splitlora")]
    assert sorted(r["seed"] for r in trained) == [0, 1]
    for r in trained:
        assert len(r["per_question"]) == 3 and set(r["per_question"]) <= {0, 1}
        assert r["train_tokens"] > 0 and r["train_s"] > 0
        assert r["adapter"].startswith(str(tmp_path / "train-runs"))
    doc = json.loads((tmp_path / "acc" / "accuracy.json").read_text())
    st = {s["method"]: s for s in doc["config"]["stats"]["synthetic"]}
    assert st["splitlora"]["seeds"] == [0, 1] and len(st["splitlora"]["values"]) == 2
    assert st["base"]["diff_low"] <= st["base"]["diff"] <= st["base"]["diff_high"]
    assert (tmp_path / "acc" / "accuracy-synthetic.png").is_file()
    report = (tmp_path / "results.md").read_text()
    assert "vs splitlora" in report and "Every cell of the grid is finished" in report
    stamp = [c.stat().st_mtime_ns for c in cells]
    invoke(*acc)
    assert [c.stat().st_mtime_ns for c in cells] == stamp  # finished cells are not rerun
    # a grown grid reports what is missing without training it
    invoke(*acc[:5], "base,splitlora", "--seeds", "0,1,2", *acc[8:], "--finished-only",
           "--report", str(tmp_path / "results.md"))
    assert len(list((tmp_path / "acc" / "cells").glob("*.json"))) == 3
    assert "seed=2" in (tmp_path / "results.md").read_text()

    invoke("bench", "sweep", "--param", "split_ratio=1/2,1/4", "--methods", "lesft", *common,
           "--out", str(tmp_path / "sw"))
    doc = json.loads((tmp_path / "sw" / "sweep-split_ratio.json").read_text())
    assert sorted(r["split_ratio"] for r in doc["rows"]) == ["1/2", "1/4"]
    assert (tmp_path / "sw" / "sweep-split_ratio.png").is_file()


def test_accuracy_rejects_unknown_method_and_bad_seeds(tmp_path):
    res = CliRunner().invoke(app, ["bench", "accuracy", "--methods", "warp", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "warp" in res.output and "kd-base" in res.output
    res = CliRunner().invoke(app, ["bench", "accuracy", "--methods", "base", "--seeds", "0,x", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--seeds" in res.output


def test_sweep_rejects_unknown_param(tmp_path):
    res = CliRunner().invoke(app, ["bench", "sweep", "--param", "warp=1,2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "warp" in res.output


@pytest.mark.e2e
@pytest.mark.slow  # an in-process and a multi-process run (make test-slow); make demo runs `lesft summary`
def test_pipeline_bench_and_summary(tmp_path):
    invoke("bench", "pipeline", *TINY, "--warmup", "1", "--link-latency-ms", "1", "--out", str(tmp_path),
           "--runs-dir", str(tmp_path))
    row = json.loads((tmp_path / "pipeline.json").read_text())["rows"][0]
    assert row["inprocess_epoch_s"] > 0 and row["pipeline_epoch_s"] > 0
    assert row["ratio"] == pytest.approx(row["pipeline_epoch_s"] / row["inprocess_epoch_s"])
    assert row["max_rel_diff_server"] <= 1e-5 and row["max_rel_diff_client"] <= 1e-5
    assert shaped_forwards(tmp_path / "runs" / "pipeline") >= 2 * 3
    assert "emulated edge link per client" in (tmp_path / "pipeline.md").read_text()
    res = invoke("summary", "--run", str(tmp_path / "runs" / "pipeline"), "--eval-n", "2", "--max-new-tokens", "3")
    assert "accuracy before" in res.output and "accuracy after" in res.output and "bytes client" in res.output


def test_summary_names_the_loss_and_why():
    from lesft.cli.run import _loss_line
    from lesft.config import Config

    line = _loss_line(Config().replace(loss="kd", note="kd learns from the reference path"))
    assert line.startswith("kd (") and line.endswith(": kd learns from the reference path")
    assert _loss_line(Config().replace(lesft_nll_mix=1.0)).startswith("lesft + 1 x NLL")
    assert _loss_line(Config().replace(method="splitlora")).startswith("nll")
