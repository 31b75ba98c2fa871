"""The ``lesft`` command: train, evaluate, export, benchmark (typer app)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lesft.cli_options import config_command, fail, guarded
from lesft.config import Config, leaf_fields

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LESFT: language-empowered split fine-tuning of LLMs between edge clients and a server.")
console = Console()


@app.command("config")
@config_command
def show_config(as_json: bool = typer.Option(False, "--json", help="print JSON"), *, cfg: Config) -> None:
    """Print the resolved settings (defaults < --config TOML < LESFT_* env < flags)."""
    if as_json:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    table = Table("setting", "value", "group", title="lesft settings")
    fields = leaf_fields()
    for name, (group, _) in fields.items():
        value = getattr(getattr(cfg, group), name)
        table.add_row(f"--{name.replace('_', '-')}", ",".join(value) if isinstance(value, tuple) else str(value), group)
    console.print(table)


@app.command()
@config_command
def prepare(*, cfg: Config) -> None:
    """Make the model ready offline (dequantise the embedded GGUF once into the cache)."""
    from lesft.models import resolve

    source = resolve(cfg.model.model, cfg.model.cache_dir or None)
    console.print(f"model ready: [bold]{source.label}[/] ({source.n_layers} layers) "
                  f"{'at ' + str(source.folder) if source.folder else ''}")


@app.command()
@config_command
def train(inprocess: bool = typer.Option(False, "--inprocess", help="run all parties in this process (reference trainer)"),
          *, cfg: Config) -> None:
    """Fine-tune: the in-process trainer, or the multi-process pipeline over ZeroMQ (default)."""
    from lesft.trainer import check_local_data

    for own in check_local_data(cfg):  # every client's own file (--client-data), before any party starts
        console.print(f"own data {own.describe()}", highlight=False)
    if inprocess:
        _train_inprocess(cfg)
    else:
        from workers.launch import run_pipeline_cli

        run_pipeline_cli(cfg, console)


def _train_inprocess(cfg: Config) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from lesft.report import print_run_summary
    from lesft.trainer import train_inprocess

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task(f"{cfg.train.method} in-process", total=None, loss="-")

        def on_round(rec: dict, rounds: int) -> None:
            progress.update(task, total=rounds, completed=rec["round"] + 1, loss=f"{rec['loss']:.4f}")

        result = train_inprocess(cfg, on_round=on_round)
    print_run_summary(result.run_dir, console)


def main() -> None:
    app()


from lesft import commands  # noqa: E402,F401  (registers the remaining commands on ``app``)


if __name__ == "__main__":
    main()
