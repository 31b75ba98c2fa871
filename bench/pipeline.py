"""``lesft bench pipeline``: the multi-process pipeline against the in-process trainer on
the same work (same config, seed and data), after a warm-up, one epoch each.

The in-process epoch is read from the trainer's round records, the pipeline's from the
server's (both carry wall-clock seconds); process start-up and model loading are outside
the window. Both runs write adapters, which must agree (fp32 wire) at every
``--pipeline-depth`` of the pipeline (the in-process trainer has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer

from bench.common import (bench_command, console, link_note, machine_info, make_out_dir, print_targets,
                          random_note, ratio, rich_table, write_results)
from lesft.config import Config
from lesft.lora import load_adapters
from lesft.metrics import read_jsonl
from lesft.schedule import rounds_per_epoch
from workers.launch import launch


def _epoch_seconds(records: list[dict], warmup: int, key: str) -> float:
    rounds = [r for r in records if r.get("event") == "round"]
    start = next((r[key] for r in rounds if r["round"] == warmup - 1), 0.0) if warmup else 0.0
    return rounds[-1][key] - start


def _max_rel_diff(a: Path, b: Path) -> float:
    x, y = load_adapters(a), load_adapters(b)
    return max(float((x[k] - y[k]).abs().max() / y[k].abs().max().clamp(min=1e-12)) for k in y)


def compare(cfg: Config, warmup: int, out_dir: Path, timeout_s: float, client_threads: int = 1) -> dict:
    from lesft.trainer import train_inprocess  # here: it loads transformers

    per_epoch = rounds_per_epoch(cfg.data.samples_per_client, cfg.train.batch_size)
    base = cfg.replace(rounds=warmup + per_epoch, runs_dir=str(out_dir / "runs"))
    inproc = train_inprocess(base.replace(run_id="inprocess"))
    t_in = _epoch_seconds(inproc.history, warmup, "wall_s")
    launch(base.replace(run_id="pipeline"), timeout_s=timeout_s, client_threads=client_threads)
    pipe_dir = out_dir / "runs" / "pipeline"
    t_pipe = _epoch_seconds(read_jsonl(pipe_dir / "server-0.jsonl"), warmup, "t")
    row = {"method": cfg.train.method, "model": cfg.model.model, "clients": cfg.data.clients,
           "pipeline_depth": cfg.train.pipeline_depth,
           "rounds_measured": per_epoch, "warmup_rounds": warmup, "inprocess_epoch_s": t_in,
           "pipeline_epoch_s": t_pipe, "ratio": ratio(t_pipe, t_in),
           "torch_threads_inprocess": torch.get_num_threads(), "client_threads": client_threads}
    for name in ("server-adapters.safetensors", "client-adapters.safetensors"):
        if (pipe_dir / name).is_file():
            row[f"max_rel_diff_{name.split('-')[0]}"] = _max_rel_diff(pipe_dir / name, inproc.run_dir / name)
    return row


@bench_command("pipeline", kind="micro", order=4)
def pipeline_command(
    warmup: int = typer.Option(2, "--warmup", help="rounds before the measured epoch"),
    timeout: float = typer.Option(3600, "--timeout", help="seconds allowed per run"),
    client_threads: int = typer.Option(1, "--client-threads", help="torch threads per client process"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder"),
    *, cfg: Config) -> None:
    """The multi-process pipeline vs the in-process trainer on the same work (wall time per epoch)."""
    out_dir = make_out_dir(out, "pipeline", cfg.run.runs_dir)
    with console.status("in-process trainer, then the pipeline ..."):
        row = compare(cfg, warmup, out_dir, timeout, client_threads)
    cols = ["method", "model", "clients", "pipeline_depth", "rounds_measured", "inprocess_epoch_s",
            "pipeline_epoch_s", "ratio"]
    console.print(rich_table([row], cols, title="pipeline / in-process, wall time per epoch"))
    target = {"target": "pipeline wall time / in-process <= 1.05", "value": row["ratio"], "met": row["ratio"] <= 1.05}
    print_targets([target])
    write_results(out_dir, "pipeline", [row], {"settings": cfg.to_dict(), "target": target}, cols,
                  title="pipeline vs in-process", notes=random_note(cfg) + link_note(cfg), machine=machine_info())
    console.print(f"results in {out_dir}")
