"""``lesft bench pipeline``: the multi-process pipeline against the in-process trainer on
the same work (same config, seed and data), after a warm-up, one epoch each.

The in-process epoch is read from the trainer's round records, the pipeline's from the
server's (both carry wall-clock seconds); process start-up and model loading are outside
the window. Both runs write adapters, which must agree (fp32 wire).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lesft.config import Config
from lesft.lora import load_adapters
from lesft.metrics import read_jsonl


def _epoch_seconds(records: list[dict], warmup: int, key: str) -> float:
    rounds = [r for r in records if r.get("event") == "round"]
    start = next((r[key] for r in rounds if r["round"] == warmup - 1), 0.0) if warmup else 0.0
    return rounds[-1][key] - start


def _max_rel_diff(a: Path, b: Path) -> float:
    x, y = load_adapters(a), load_adapters(b)
    return max(float((x[k] - y[k]).abs().max() / y[k].abs().max().clamp(min=1e-12)) for k in y)


def compare(cfg: Config, warmup: int, out_dir: Path, timeout_s: float, client_threads: int = 1) -> dict:
    from lesft.trainer import train_inprocess
    from workers.launch import launch

    per_epoch = max(1, math.ceil(cfg.data.samples_per_client / cfg.train.batch_size))
    base = cfg.replace(rounds=warmup + per_epoch, runs_dir=str(out_dir / "runs"))
    inproc = train_inprocess(base.replace(run_id="inprocess"))
    t_in = _epoch_seconds(inproc.history, warmup, "wall_s")
    launch(base.replace(run_id="pipeline"), timeout_s=timeout_s, client_threads=client_threads)
    pipe_dir = out_dir / "runs" / "pipeline"
    t_pipe = _epoch_seconds(read_jsonl(pipe_dir / "server-0.jsonl"), warmup, "t")
    row = {"method": cfg.train.method, "model": cfg.model.model, "clients": cfg.data.clients,
           "rounds_measured": per_epoch, "warmup_rounds": warmup, "inprocess_epoch_s": t_in,
           "pipeline_epoch_s": t_pipe, "ratio": t_pipe / t_in if t_in > 0 else math.nan,
           "torch_threads_inprocess": torch.get_num_threads(), "client_threads": client_threads}
    for name in ("server-adapters.safetensors", "client-adapters.safetensors"):
        if (pipe_dir / name).is_file():
            row[f"max_rel_diff_{name.split('-')[0]}"] = _max_rel_diff(pipe_dir / name, inproc.run_dir / name)
    return row
