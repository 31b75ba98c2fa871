"""Run folders and process hygiene (issue 13, items 1 and 2): a finished run is never
mixed with a new one, and killing ``lesft train`` leaves no worker behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lesft.config import build_config
from lesft.runs import COMPLETE_FILE, INTERRUPTED_FILE, RunDirError, open_run_dir

TINY = ["--model", "arch:tiny-qwen2", "--clients", "2", "--samples-per-client", "4", "--max-length", "64"]
BIN = Path(sys.executable).parent


def _cfg(tmp_path, run_id="r"):
    return build_config(cli=dict(runs_dir=str(tmp_path / "runs"), run_id=run_id), env={})


def _finished(tmp_path, run_id="r") -> Path:
    path = open_run_dir(_cfg(tmp_path, run_id))
    _cfg(tmp_path, run_id).save(path / "config.json")
    (path / "trainer-0.jsonl").write_text("{}\n")
    (path / COMPLETE_FILE).write_text("{}\n")
    return path


def test_open_run_dir_refuses_a_finished_or_unfinished_run(tmp_path):
    path = _finished(tmp_path)
    for mode in ("new", "join"):
        with pytest.raises(RunDirError, match="holds a finished run: pick another --run-id, or --resume / --overwrite"):
            open_run_dir(_cfg(tmp_path), mode)
    assert open_run_dir(_cfg(tmp_path), "resume") == path and (path / "trainer-0.jsonl").is_file()
    (path / COMPLETE_FILE).unlink()
    with pytest.raises(RunDirError, match="unfinished run"):
        open_run_dir(_cfg(tmp_path), "new")
    assert open_run_dir(_cfg(tmp_path), "join") == path  # a worker joins a running run
    assert open_run_dir(_cfg(tmp_path), "overwrite") == path and not any(path.iterdir())


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "runs" / "mine"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(RunDirError, match="not a lesft run folder"):
        open_run_dir(_cfg(tmp_path, "mine"), "overwrite")
    assert (folder / "notes.txt").read_text() == "precious"


def _cli(*args, cwd, timeout=300):
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _invoke(app, args, cwd):
    from typer.testing import CliRunner

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(old)


@pytest.mark.e2e
def test_reusing_a_run_id_is_refused_in_every_mode_and_by_hand_started_workers(tmp_path):
    from lesft.cli import app
    from workers.main import app as worker_app

    first = _invoke(app, ["train", "--inprocess", *TINY, "--rounds", "1", "--run-id", "mp1"], tmp_path)
    assert first.exit_code == 0, first.output
    before = sorted(p.name for p in (tmp_path / "runs" / "mp1").iterdir())
    line = "runs/mp1 holds a finished run: pick another --run-id, or --resume / --overwrite."
    for target, cmd in ((app, ["train", "--inprocess", *TINY]), (app, ["train", *TINY]),
                        (worker_app, ["--role", "server", *TINY]), (worker_app, ["--role", "broker"]),
                        (worker_app, ["--role", "client", "--id", "0", *TINY])):
        res = _invoke(target, [*cmd, "--run-id", "mp1"], tmp_path)
        assert res.exit_code == 2 and line in " ".join(res.output.split()), (cmd, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), (cmd, res.exception)
    assert sorted(p.name for p in (tmp_path / "runs" / "mp1").iterdir()) == before  # untouched
    again = _invoke(app, ["train", "--inprocess", *TINY, "--rounds", "1", "--run-id", "mp1", "--overwrite"], tmp_path)
    assert again.exit_code == 0, again.output
    records = (tmp_path / "runs" / "mp1" / "trainer-0.jsonl").read_text().splitlines()
    assert len([r for r in records if '"event":"round"' in r]) == 1  # only the new run's round


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _kill_mid_run(tmp_path, sig) -> tuple[subprocess.Popen, list[int], str]:
    run_dir = tmp_path / "runs" / "k"
    # sl with one client: three processes (broker, server, client) start faster on a busy runner
    proc = subprocess.Popen([str(BIN / "lesft"), "train", *TINY, "--method", "sl", "--clients", "1", "--rounds", "400",
                             "--run-id", "k"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        server = run_dir / "server-0.jsonl"
        if server.is_file() and '"event":"round"' in server.read_text():
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    workers = _children(proc.pid)
    assert len(workers) == 3  # broker, server, client
    proc.send_signal(sig)
    left = _survivors(workers, time.monotonic() + 10)  # none may outlive the signal by 10 s
    for p in left:
        os.kill(p, signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    assert not left, f"workers {left} survived {sig.name} of the launcher; its output:\n{out}"
    return proc, workers, out


def _survivors(pids: list[int], deadline: float) -> list[int]:
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.e2e
def test_sigterm_of_lesft_train_stops_every_worker_and_marks_the_run_incomplete(tmp_path):
    proc, _, out = _kill_mid_run(tmp_path, signal.SIGTERM)
    assert proc.returncode == 130 and "interrupted at round" in out and "of 400; partial run in runs/k" in out, out
    assert "Traceback" not in out
    marker = json.loads((tmp_path / "runs" / "k" / INTERRUPTED_FILE).read_text())
    assert marker["rounds"] == 400 and marker["round"] >= 1
    summary = _cli("lesft", "summary", "--run", "runs/k", "--eval-n", "0", cwd=tmp_path)
    assert summary.returncode == 0 and "incomplete" in summary.stdout, summary.stdout + summary.stderr


@pytest.mark.e2e
def test_sigkill_of_lesft_train_stops_every_worker(tmp_path):
    proc, _, _ = _kill_mid_run(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
