"""Help screens: real types and defaults, only the settings a command reads, help text for
every option, and a ``bench`` group that names its commands (issue 13, item 6)."""
from __future__ import annotations

import re

import typer.main
from typer.testing import CliRunner

from lesft.cli import app


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _line(text: str, flag: str) -> str:
    return next(line for line in text.splitlines() if re.search(rf"(?<![\w-]){re.escape(flag.strip())}(?![\w-])", line))


def test_train_help_shows_types_and_defaults():
    text = _help("train")
    lr = _line(text, "--lr ")
    assert "FLOAT" in lr and "[default: 5e-05]" in lr
    assert "INTEGER" in _line(text, "--clients ") and "[default: 4]" in _line(text, "--clients ")
    assert "INTEGER" in _line(text, "--epochs ")
    assert "TEXT" in _line(text, "--method ") and "[default: lesft]" in _line(text, "--method ")
    assert "<str>" not in text and "<bool>" not in text  # not even on --help or --inprocess


def test_commands_list_only_the_settings_they_read():
    prepare = _help("prepare")
    assert "--model" in prepare and "--cache-dir" in prepare
    assert not re.search(r"--lr\b(?!-)", prepare) and "--clients" not in prepare and "--split-ratio" not in prepare
    ev = _help("eval")
    assert "--dataset" in ev and "--model" in ev and not re.search(r"--lr\b(?!-)", ev) and "--p-sal" not in ev
    assert "whole split" in _line(ev, "--limit")
    assert re.search(r"--lr\b(?!-)", _help("train"))


def test_every_option_has_help_text():
    from workers.main import app as worker_app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    missing = [f"{' '.join(path)} {p.opts[0]}" for root in (app, worker_app)
               for path, cmd in walk(typer.main.get_command(root), ["lesft"]) for p in cmd.params
               if not getattr(p, "help", None)]
    assert not missing, missing


def test_bench_help_names_every_bench_command():
    from lesft.cli.bench import bench_app

    text = _help("bench")
    names = list(typer.main.get_command(bench_app).commands)
    assert len(names) >= 7
    for name in names:
        assert name in bench_app.info.help, name
