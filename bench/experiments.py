"""Train-then-evaluate grids: ``lesft bench accuracy`` (Table 1) and ``lesft bench sweep``
(Figs. 3-5, 7 and Table 3).

A grid is a list of cells (settings overrides + a method); each finished cell is written
to ``<out>/cells/<key>.json`` right away, so an interrupted grid resumes where it stopped
(finished cells are not rerun). ``base`` evaluates the untrained model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from lesft.config import Config

SWEEP_PARAMS = {  # user-facing name -> config field; anything else must be a config field itself
    "split_ratio": "split_ratio", "samples_per_client": "samples_per_client", "clients": "clients",
    "paths": "paths", "gamma_nonsalient": "gamma_nonsalient",
}


@dataclass
class Cell:
    method: str
    overrides: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        blob = json.dumps({"method": self.method, **self.overrides}, sort_keys=True, default=str)
        short = "-".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))
        digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
        return f"{self.method}-{short}-{digest}".replace("/", "_").replace(" ", "")


def parse_param(spec: str) -> tuple[str, list[str]]:
    """``"split_ratio=1/2,1/3"`` -> ("split_ratio", ["1/2", "1/3"])."""
    from lesft.config import ConfigError, leaf_fields

    if "=" not in spec:
        raise ConfigError(f"--param {spec!r} needs the form name=v1,v2 (e.g. split_ratio=1/2,1/3,1/4,1/5).")
    name, values = spec.split("=", 1)
    name = SWEEP_PARAMS.get(name.strip().replace("-", "_"), name.strip().replace("-", "_"))
    if name not in leaf_fields():
        raise ConfigError(f"--param {name!r} is not a setting; sweepable: {', '.join(SWEEP_PARAMS)} "
                          "or any name listed by `lesft config`.")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not vals:
        raise ConfigError(f"--param {spec!r} lists no values.")
    return name, vals


def _atomic_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_cell(cfg: Config, cell: Cell, out_dir: Path, *, eval_split: str, limit: int, max_new_tokens: int,
             batch_size: int, pipeline: bool = False, timeout_s: float = 3600, first_line: bool = False) -> dict:
    """Train (unless ``base``) then evaluate one cell; returns its result record."""
    from lesft.data import load_examples
    from lesft.evaluate import evaluate, load_for_eval
    from lesft.models import source_for

    c = cfg.replace(**cell.overrides, run_id=cell.key, runs_dir=str(out_dir / "runs"),
                    **({"method": cell.method} if cell.method != "base" else {}))
    t0 = time.perf_counter()
    adapter, loss = None, None
    if cell.method != "base":
        from lesft.report import round_records

        if pipeline:
            from workers.launch import launch

            run_dir = launch(c, timeout_s=timeout_s).run_dir
        else:
            from lesft.trainer import train_inprocess

            run_dir = train_inprocess(c).run_dir
        recs = round_records(run_dir)
        adapter = run_dir / "adapter"
        loss = recs[-1].get("loss") if recs else None
    train_s = time.perf_counter() - t0
    source = source_for(c)
    tok = source.load_tokenizer()
    examples = load_examples(c.data.dataset, eval_split, data_dir=c.data.data_dir or None, n=limit,
                             seed=c.data.data_seed)
    t1 = time.perf_counter()
    res = evaluate(load_for_eval(source, adapter, device=_eval_device(c)), tok, examples,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, first_line=first_line)
    return {"key": cell.key, "method": cell.method, **{k: v for k, v in cell.overrides.items()},
            "dataset": c.data.dataset, "model": source.label, "accuracy": res.accuracy, "ci_low": res.ci_low,
            "ci_high": res.ci_high, "n": res.n, "correct": res.correct, "final_loss": loss,
            "train_s": train_s, "eval_s": time.perf_counter() - t1, "adapter": str(adapter) if adapter else None}


def _eval_device(cfg: Config) -> str:
    from lesft.engine import resolve_device

    return str(resolve_device(cfg.train.device))


def run_grid(cfg: Config, cells: Sequence[Cell], out_dir: Path, *, progress: Callable[[str], None] | None = None,
             **kwargs) -> list[dict]:
    """Run every cell not finished yet; return all cells' records in grid order."""
    results = []
    for cell in cells:
        path = out_dir / "cells" / f"{cell.key}.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
        else:
            record = run_cell(cfg, cell, out_dir, **kwargs)
            _atomic_json(path, record)
            results.append(record)
        if progress:
            progress(cell.key)
    return results


def plot_sweep(rows: Sequence[dict], param: str, path: Path, title: str) -> Path:
    """Accuracy against the swept value, one line per method (with 95% intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    values = list(dict.fromkeys(str(r[param]) for r in rows))
    for m in methods:
        pts = {str(r[param]): r for r in rows if r["method"] == m}
        ys = [100 * pts[v]["accuracy"] if v in pts else float("nan") for v in values]
        lo = [100 * (pts[v]["accuracy"] - pts[v]["ci_low"]) if v in pts else 0 for v in values]
        hi = [100 * (pts[v]["ci_high"] - pts[v]["accuracy"]) if v in pts else 0 for v in values]
        ax.errorbar(range(len(values)), ys, yerr=[lo, hi], marker="o", capsize=3, label=m)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(values)
    ax.set_xlabel(param)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
