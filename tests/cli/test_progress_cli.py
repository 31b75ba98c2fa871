"""Progress a user can follow (issue 13, item 7): one line per round when the output is not
a terminal (both train modes, centralized included), a loss.png for every run, and the
clients' rounds for a run without a server (fedavg)."""
from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from lesft.cli import app

TINY = ["--model", "arch:tiny-qwen2", "--clients", "2", "--samples-per-client", "2", "--max-length", "64",
        "--rounds", "3"]


def _rounds_logged(output: str) -> list[str]:
    return re.findall(r"round (\d+)/3 loss \d+\.\d+", output)


def test_inprocess_train_logs_one_line_per_round_and_writes_loss_png(tmp_path):
    res = CliRunner().invoke(app, ["train", "--inprocess", *TINY, "--runs-dir", str(tmp_path), "--run-id", "a"])
    assert res.exit_code == 0, res.output
    assert _rounds_logged(res.output) == ["1", "2", "3"], res.output
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0
    (tmp_path / "a" / "loss.png").unlink()
    again = CliRunner().invoke(app, ["summary", "--run", str(tmp_path / "a"), "--eval-n", "0"])
    assert again.exit_code == 0 and (tmp_path / "a" / "loss.png").is_file(), again.output
    assert "complete" in again.output


@pytest.mark.e2e
def test_centralized_pipeline_logs_one_line_per_round(tmp_path):
    res = CliRunner().invoke(app, ["train", *TINY, "--method", "centralized", "--runs-dir", str(tmp_path),
                                   "--run-id", "c"])
    assert res.exit_code == 0, res.output
    assert _rounds_logged(res.output) == ["1", "2", "3"], res.output
    assert (tmp_path / "c" / "loss.png").is_file()


def test_summary_of_a_run_without_server_shows_the_clients_rounds(tmp_path):
    from lesft.report import round_records, run_summary

    run = tmp_path / "f"
    run.mkdir()
    for cid, losses in ((0, [2.0, 1.0]), (1, [4.0, 3.0])):
        lines = [{"event": "round", "round": r, "rounds": 2, "loss": v} for r, v in enumerate(losses)]
        (run / f"client-{cid}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = round_records(run)
    assert [r["loss"] for r in recs] == [3.0, 2.0] and recs[-1]["rounds"] == 2
    assert run_summary(run)["rounds"] == 2
