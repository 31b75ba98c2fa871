"""A path the user got wrong ends in one line, never a traceback (issue 13, item 5)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TINY = ["--model", "arch:tiny-qwen2", "--clients", "1", "--samples-per-client", "2", "--max-length", "64",
        "--rounds", "1"]


def unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create anything in (read-only for a user; /sys for root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").mkdir()
    except OSError:
        return ro
    (ro / "probe").rmdir()
    try:
        os.mkdir("/sys/lesft-probe")
    except OSError:
        return Path("/sys")
    os.rmdir("/sys/lesft-probe")
    pytest.skip("no unwritable folder on this machine (root without a read-only /sys)")


def _run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=300)


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:"), res.stderr
    return errors[0]


@pytest.mark.e2e
@pytest.mark.parametrize("cmd", [["lesft", "train", "--inprocess"], ["lesft", "train"],
                                 ["lesft-worker", "--role", "server"]], ids=["inprocess", "pipeline", "worker"])
def test_unwritable_runs_dir_is_one_line(tmp_path, cmd):
    ro = unwritable(tmp_path)
    line = _one_line_error(_run([*cmd, *TINY, "--runs-dir", str(ro / "runs")], tmp_path))
    assert str(ro) in line and ("--runs-dir" in line), line


def test_path_errors_are_one_line_in_process(tmp_path):
    from typer.testing import CliRunner

    from lesft.cli import app

    a_file = tmp_path / "file"
    a_file.write_text("x")
    res = CliRunner().invoke(app, ["train", "--inprocess", *TINY, "--runs-dir", str(a_file / "runs")])
    assert res.exit_code == 1 and "Not a directory" in res.output and "check the path" in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    res = CliRunner().invoke(app, ["eval", "--model", "arch:tiny-qwen2", "--limit", "1", "--out",
                                   str(a_file / "e.jsonl")])
    assert res.exit_code == 1 and "a file is in the way" in res.output and len(res.output.splitlines()) == 1, res.output


def test_run_id_cannot_leave_the_runs_dir():
    from lesft.config import ConfigError, build_config

    for bad in ("../x", "a/b", ".", ".hidden"):
        with pytest.raises(ConfigError, match="a run id names one folder"):
            build_config(cli={"run_id": bad}, env={})


def test_damaged_adapter_file_is_one_line(tmp_path):
    from lesft.lora import AdapterError, load_adapters

    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterError, match="is not a readable safetensors file"):
        load_adapters(bad)
