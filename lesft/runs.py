"""The layout of a run's output folder ``<runs_dir>/<run_id>``, the one place that creates it.

Every party of a run (the in-process trainer, each worker process, the launcher) writes
into the same folder: this module decides whether a run may write into a folder that
already holds one, names the files the parties leave there, and writes the completion
or interruption marker that tells a finished run from a broken one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from lesft.config import Config
from lesft.atomic import atomic_write

COMPLETE_FILE = "run-complete.json"
INTERRUPTED_FILE = "run-interrupted.json"


class RunDirError(ValueError):
    """A run folder that must not be written into as asked (it holds another run)."""


def run_state(path: Path) -> str:
    """``finished`` (a completion marker, or the combined adapter of an older run),
    ``unfinished`` (files but no marker: running, interrupted or failed) or ``empty``."""
    if (path / COMPLETE_FILE).is_file() or (path / "adapter").is_dir():
        return "finished"
    if path.is_dir() and any(path.iterdir()):
        return "unfinished"
    return "empty"


def new_run_id() -> str:
    """The id of a run not given ``--run-id``: its start time (``20261104-153012``)."""
    return time.strftime("%Y%m%d-%H%M%S")


def run_path(cfg: Config, default_id: str = "") -> Path:
    """``<runs_dir>/<run_id>``; without a run id, ``default_id`` (workers agree on ``default``)
    or a new timestamp."""
    return Path(cfg.run.runs_dir) / (cfg.run.run_id or default_id or new_run_id())


def open_run_dir(cfg: Config, existing: str = "new", default_id: str = "") -> Path:
    """The run folder ``<runs_dir>/<run_id>``, created; the one place that decides whether a
    run may write into a folder that already holds one.

    ``existing``: ``new`` (a fresh run: refuse any folder with files), ``overwrite`` (a fresh
    run: move the old one aside and delete it first), ``resume`` (continue what is there),
    ``join`` (a worker of a running run: refuse only a finished one) or ``join-overwrite``
    (the same, but delete a finished one); ``any`` only creates it (a worker object, once
    its entry point has decided). Raises :class:`RunDirError`.
    """
    if existing not in ("new", "overwrite", "resume", "join", "join-overwrite", "any"):
        raise ValueError(f"existing={existing!r}")
    run_id = cfg.run.run_id or default_id or new_run_id()
    root = Path(cfg.run.runs_dir)
    path = root / run_id
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{run_id}.lock", "w") as lock:  # workers started together decide one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = run_state(path)
        refuse = state == "finished" if existing == "join" else (state != "empty" and existing == "new")
        clear = (state != "empty" and existing == "overwrite") or (state == "finished" and existing == "join-overwrite")
        if refuse:
            what = "a finished run" if state == "finished" else "an unfinished run (running, interrupted or failed)"
            raise RunDirError(f"{path} holds {what}: pick another --run-id, or --resume / --overwrite.")
        if clear:
            if not (path / "config.json").is_file() and state != "finished":
                raise RunDirError(f"{path} is not a lesft run folder (no config.json): not deleting it; "
                                  "pick another --run-id.")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)  # atomic: nothing ever sees half of each run
            shutil.rmtree(old, ignore_errors=True)
        if existing == "resume":
            (path / INTERRUPTED_FILE).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
    return path


def mark_run(run_dir: Path, *, complete: bool, **fields) -> Path:
    """Write the completion (or interruption) marker of a run folder (atomically)."""
    name = COMPLETE_FILE if complete else INTERRUPTED_FILE
    atomic_write(run_dir / name, json.dumps({"time": time.time(), **fields}) + "\n")
    if complete:
        (run_dir / INTERRUPTED_FILE).unlink(missing_ok=True)
    return run_dir / name


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C or a signal; its folder is marked incomplete."""

    def __init__(self, run_dir: Path, round_: int | None, rounds: int | None) -> None:
        self.run_dir, self.round, self.rounds = Path(run_dir), round_, rounds
        where = f"round {round_} of {rounds}" if round_ is not None and rounds else "the start"
        super().__init__(f"interrupted at {where}; partial run in {self.run_dir}")


SERVER_FILE = "server-adapters.safetensors"
GLOBAL_CLIENT_FILE = "client-adapters.safetensors"


def client_file(client_id: int) -> str:
    return f"client-{client_id}-adapters.safetensors"
