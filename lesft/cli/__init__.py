"""The ``lesft`` command: train, evaluate, export, benchmark (typer app).

The only part of :mod:`lesft` that may import ``workers`` and ``bench``. Every command is
a plain function in a module of this package; this file attaches them all to :data:`app`,
in the order the help screen lists them.
"""

from __future__ import annotations

import os

import typer
from rich.console import Console

from lesft.cli import bench, data, keys, run, train
from lesft.cli.eval import eval_command
from lesft.cli.console import console
from lesft.errors import path_error

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["app", "console", "main"]


def _group(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=help_text)


app = _group("LESFT: language-empowered split fine-tuning of LLMs between edge clients and a server.")
app.command("config")(train.show_config)
app.command()(train.prepare)
app.command()(train.train)
app.command("eval")(eval_command)
app.command()(run.summary)
app.command()(run.combine)
app.command()(run.export)

keys_app = _group("CurveZMQ keys: encrypt and authenticate every connection of a run.")
keys_app.command("generate")(keys.generate)
app.add_typer(keys_app, name="keys")

app.add_typer(bench.bench_app, name="bench")

data_app = _group("Data preparation.")
data_app.command("distill")(data.distill)
app.add_typer(data_app, name="data")


def main() -> None:
    try:
        app()
    except OSError as e:  # the last boundary: a path of any command, in one line
        line = path_error(e)
        if line is None:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True, markup=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
