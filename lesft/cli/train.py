"""``lesft config | prepare | train``: the settings, the model, and a fine-tune (in this
process, or as the worker processes of the pipeline)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from lesft.cli.console import console
from lesft.config import Config, leaf_fields
from lesft.options import config_command, fail
from lesft.report import RoundProgress, print_run_summary
from lesft.runs import RunInterrupted, mark_run, new_run_id, run_path
from workers.launch import LaunchError, Proc, interrupt_on_signals, launch, progress_records


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


@config_command(only=("model", "cache_dir"))
def prepare(*, cfg: Config) -> None:
    """Make the model ready offline (dequantise the embedded GGUF once into the cache)."""
    from lesft.models import resolve

    source = resolve(cfg.model.model, cfg.model.cache_dir or None)
    console.print(f"model ready: [bold]{source.label}[/] ({source.n_layers} layers) "
                  f"{'at ' + str(source.folder) if source.folder else ''}")


@config_command
def train(inprocess: bool = typer.Option(False, "--inprocess", help="run all parties in this process (reference trainer)"),
          resume: bool = typer.Option(False, "--resume", help="continue the run in --run-id's folder (pipeline only)"),
          overwrite: bool = typer.Option(False, "--overwrite", help="delete the run already in --run-id's folder first"),
          *, cfg: Config) -> None:
    """Fine-tune: the in-process trainer, or the multi-process pipeline over ZeroMQ (default)."""
    from lesft.trainer import check_local_data  # here, as every use of the trainer: it loads torch and transformers

    for own in check_local_data(cfg):  # every client's own file (--client-data), before any party starts
        console.print(f"own data {own.describe()}", highlight=False)

    if resume and overwrite:
        fail("--resume and --overwrite contradict each other: pick one.")
    if resume and not cfg.run.run_id:
        fail("--resume needs the --run-id of the run to continue.")
    existing = "resume" if resume else "overwrite" if overwrite else "new"
    if not cfg.run.run_id:  # name the folder now, so an interrupted run can say where it is
        cfg = cfg.replace(run_id=new_run_id())
    try:
        if inprocess:
            _train_inprocess(cfg, existing)
        else:
            _train_pipeline(cfg, existing)
    except RunInterrupted as e:
        again = f"lesft train --run-id {cfg.run.run_id} --resume" if not inprocess else \
            f"lesft train --inprocess --run-id {cfg.run.run_id} --overwrite"
        fail(f"{e}: marked incomplete; run `{again}` to {'continue' if not inprocess else 'start it again'}.",
             code=130)


def _train_inprocess(cfg: Config, existing: str = "new") -> None:
    from lesft.trainer import train_inprocess

    history: list[dict] = []
    with RoundProgress(console, f"{cfg.train.method} in-process") as progress:
        def on_round(rec: dict, rounds: int) -> None:
            history.append(rec)
            progress.update(history)

        try:
            with interrupt_on_signals():
                result = train_inprocess(cfg, on_round=on_round, existing=existing)
        except KeyboardInterrupt:
            run_dir = run_path(cfg)
            rounds = history[-1]["rounds"] if history else None
            if run_dir.is_dir():
                mark_run(run_dir, complete=False, round=len(history), rounds=rounds)
            raise RunInterrupted(run_dir, len(history), rounds) from None
    print_run_summary(result.run_dir, console)


def _train_pipeline(cfg: Config, existing: str = "new") -> None:
    """The whole pipeline on this machine, with a progress bar (one line per round when the
    output is not a terminal)."""
    from lesft.trainer import preflight

    with RoundProgress(console, f"{cfg.train.method} pipeline") as progress:
        seen = {"t": 0.0}

        def on_poll(run_dir: Path, procs: list[Proc]) -> None:
            if time.monotonic() - seen["t"] < 1.0:
                return
            seen["t"] = time.monotonic()
            progress.update(progress_records(run_dir))

        try:
            preflight(cfg)
            result = launch(cfg, on_poll=on_poll, existing=existing)
        except LaunchError as e:
            fail(str(e), code=1)
        progress.update(progress_records(result.run_dir))
    print_run_summary(result.run_dir, console)
