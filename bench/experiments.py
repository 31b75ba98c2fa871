"""Train-then-evaluate grids: ``lesft bench accuracy`` (Table 1) and ``lesft bench sweep``
(Figs. 3-5, 7 and Table 3).

A grid is a list of cells (settings overrides + a method + a seed); each finished cell is
written to ``<out>/cells/<key>.json`` right away, so an interrupted grid resumes where it
stopped (finished cells are not rerun). ``base`` evaluates the untrained model.

A cell's seed sets the training seed and the data-sample seed together; the evaluation
questions stay those of the grid's own ``data_seed`` for every seed and method, so cells
pair up question by question (see :mod:`bench.stats`). Each cell stores its per-question
correctness, training seconds and trained target tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from lesft.config import Config

# ``--methods`` names that are method lesft with other loss settings (the loss variants of
# issue 10), in one table: name -> (train method, settings overrides, what it is).
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "nlft": ("lesft", {"loss": "nlft"}, "NLFT's released rule: eq. 17 + plain NLL"),
    "kd": ("lesft", {"loss": "kd", "ref_teacher": "live"}, "NLL + KL to the reference path (live adapters)"),
    "kd-base": ("lesft", {"loss": "kd", "ref_teacher": "base"}, "NLL + KL to the reference path of the frozen base"),
    "smooth": ("lesft", {"loss": "smooth"}, "NLL + label smoothing with kd's lambda (control for kd)"),
    "kd-smooth": ("lesft", {"loss": "smooth"}, "the same as smooth"),
    "excess": ("lesft", {"loss": "excess"}, "NLL up-weighted where log P~ exceeds log P"),
    "power": ("lesft", {"loss": "power", "power_alpha": 1.0}, "(1 - P^alpha)/alpha with alpha = 1"),
}


def resolve_method(name: str) -> tuple[str, dict]:
    """A ``--methods`` name -> (train method or "base", settings overrides)."""
    if name in VARIANTS:
        method, overrides, _ = VARIANTS[name]
        return method, dict(overrides)
    return name, {}


def method_names() -> tuple[str, ...]:
    """Every name ``--methods`` accepts."""
    from lesft.methods import METHODS

    return ("base", *METHODS, *VARIANTS)


SWEEP_PARAMS = {  # user-facing name -> config field; anything else must be a config field itself
    "split_ratio": "split_ratio", "samples_per_client": "samples_per_client", "clients": "clients",
    "paths": "paths", "gamma_nonsalient": "gamma_nonsalient",
}


@dataclass
class Cell:
    method: str  # a --methods name (a variant resolves through VARIANTS)
    overrides: dict = field(default_factory=dict)
    seed: int | None = None  # training + data-sample seed; None: the settings' own

    @property
    def key(self) -> str:
        own = dict(self.overrides, **({"seed": self.seed} if self.seed is not None else {}))
        blob = json.dumps({"method": self.method, **own}, sort_keys=True, default=str)
        short = "-".join(f"{k}={v}" for k, v in sorted(own.items()))
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


def cell_config(cfg: Config, cell: Cell, runs_dir: Path) -> Config:
    """The settings one cell trains with (its method, variant, overrides and seed)."""
    method, variant = resolve_method(cell.method)
    seeds = {"seed": cell.seed, "data_seed": cell.seed} if cell.seed is not None else {}
    return cfg.replace(**variant, **cell.overrides, **seeds, run_id=cell.key, runs_dir=str(runs_dir),
                       **({"method": method} if method != "base" else {}))


def trained_target_tokens(cfg: Config, tokenizer) -> int:
    """Target tokens the run trains on, all parties and epochs together (a cell's compute)."""
    from lesft.batching import encode_all
    from lesft.engine import total_rounds
    from lesft.methods import get_method
    from lesft.trainer import client_shards, party_layout

    shards, b = party_layout(get_method(cfg.train.method), cfg, client_shards(cfg))
    rounds = total_rounds(cfg, [len(s) for s in shards], b)
    total = 0.0
    for shard in shards:  # each party cycles through its shard, b examples a round
        per_example = sum(len(e.target) for e in encode_all(tokenizer, shard, cfg.data.max_length)) / len(shard)
        total += per_example * rounds * b
    return round(total)


def run_cell(cfg: Config, cell: Cell, out_dir: Path, *, eval_split: str, limit: int, max_new_tokens: int,
             batch_size: int, pipeline: bool = False, timeout_s: float = 3600, first_line: bool = False,
             runs_dir: Path | None = None) -> dict:
    """Train (unless ``base``) then evaluate one cell; returns its result record.

    Run folders go to ``runs_dir`` (default ``<out>/runs``); the evaluation questions are
    drawn with ``cfg``'s data seed, whatever the cell's seed.
    """
    from lesft.data import load_examples
    from lesft.evaluate import evaluate, load_for_eval
    from lesft.models import source_for

    c = cell_config(cfg, cell, runs_dir or out_dir / "runs")
    method = resolve_method(cell.method)[0]
    t0 = time.perf_counter()
    adapter, loss, tokens = None, None, 0
    if method != "base":
        from lesft.report import round_records

        stale = Path(c.run.runs_dir) / c.run.run_id
        if stale.is_dir():  # an interrupted earlier try of this cell (it has no cell file): start afresh
            shutil.rmtree(stale)

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
    if method != "base":
        tokens = trained_target_tokens(c, tok)
    examples = load_examples(c.data.dataset, eval_split, data_dir=c.data.data_dir or None, n=limit,
                             seed=cfg.data.data_seed)
    t1 = time.perf_counter()
    res = evaluate(load_for_eval(source, adapter, device=_eval_device(c)), tok, examples,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, first_line=first_line)
    return {"key": cell.key, "method": cell.method, **{k: v for k, v in cell.overrides.items()},
            "seed": cell.seed, "train_method": method, "loss": getattr(c.loss, "loss", "lesft") if method == "lesft" else None,
            "settings": resolve_method(cell.method)[1],
            "dataset": c.data.dataset, "model": source.label, "accuracy": res.accuracy, "ci_low": res.ci_low,
            "ci_high": res.ci_high, "n": res.n, "correct": res.correct, "final_loss": loss,
            "train_s": train_s, "train_tokens": tokens, "eval_s": time.perf_counter() - t1,
            "eval_seed": cfg.data.data_seed, "max_new_tokens": max_new_tokens, "first_line": first_line,
            "eval_batch_size": batch_size,
            "per_question": [int(r["correct"]) for r in res.records],
            "adapter": str(adapter) if adapter else None}


def _eval_device(cfg: Config) -> str:
    from lesft.engine import resolve_device

    return str(resolve_device(cfg.train.device))


_EVAL_KEYS = {"limit": "n", "max_new_tokens": "max_new_tokens", "first_line": "first_line"}


def _check_same_evaluation(record: dict, path: Path, kwargs: Mapping) -> None:
    """A finished cell evaluated otherwise (another --limit, --max-new-tokens, --first-line)
    must not be mixed into this grid."""
    from lesft.config import ConfigError

    for arg, key in _EVAL_KEYS.items():
        if arg in kwargs and key in record and record[key] != kwargs[arg]:
            flag = "--" + arg.replace("_", "-")
            raise ConfigError(f"{path} was evaluated with {flag} {record[key]}, this grid asks {kwargs[arg]}: "
                              "pass the same value, or another --out for a new grid.")


def validate_cells(cfg: Config, cells: Sequence[Cell]) -> None:
    """Fail (ConfigError, one line) before hours of training if a cell's settings are invalid."""
    for cell in cells:
        cell_config(cfg, cell, Path("runs"))


def run_grid(cfg: Config, cells: Sequence[Cell], out_dir: Path, *,
             progress: Callable[[Cell, dict, bool], None] | None = None, run: Callable[..., dict] | None = None,
             finished_only: bool = False, **kwargs) -> list[dict]:
    """Run every cell not finished yet; return all cells' records in grid order.

    ``progress(cell, record, cached)`` follows each cell; ``run`` replaces
    :func:`run_cell` (tests). ``finished_only`` runs nothing and returns the finished
    cells only.
    """
    results = []
    for cell in cells:
        path = out_dir / "cells" / f"{cell.key}.json"
        cached = path.is_file()
        if cached:
            record = json.loads(path.read_text())
            _check_same_evaluation(record, path, kwargs)
        elif finished_only:
            continue
        else:
            record = (run or run_cell)(cfg, cell, out_dir, **kwargs)
            _atomic_json(path, record)
        results.append(record)
        if progress:
            progress(cell, record, cached)
    return results


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = "osD^vP*Xh<>"


def plot_accuracy(stats: Sequence, path: Path, title: str, baseline: str | None = None) -> Path:
    """Mean accuracy per method with its bootstrap 95% interval, every seed as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(stats) + 2), 4.2))
    for i, st in enumerate(stats):
        ax.errorbar([i], [100 * st.mean], yerr=[[100 * (st.mean - st.ci_low)], [100 * (st.ci_high - st.mean)]],
                    marker="o", capsize=4, color="tab:red" if st.method == baseline else "tab:blue")
        ax.scatter([i + 0.15] * len(st.values), [100 * v for v in st.values], s=12, color="gray", zorder=3)
    ax.set_xticks(range(len(stats)))
    ax.set_xticklabels([s.method for s in stats], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%): mean, 95% CI; dots = seeds")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(series: Mapping[str, Sequence], values: Sequence[str], param: str, path: Path, title: str) -> Path:
    """Accuracy against the swept value, one line per method (mean over seeds, bootstrap
    95% interval). ``series[method][i]`` is the MethodStats at ``values[i]`` (or None).
    Methods sit at small x offsets with their own markers, so equal series stay visible."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    k = len(series)
    for j, (m, pts) in enumerate(series.items()):
        off = (j - (k - 1) / 2) * 0.06
        xs = [i + off for i in range(len(values))]
        ys = [100 * p.mean if p else float("nan") for p in pts]
        lo = [100 * (p.mean - p.ci_low) if p else 0 for p in pts]
        hi = [100 * (p.ci_high - p.mean) if p else 0 for p in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker=_MARKERS[j % len(_MARKERS)], capsize=3, label=m, alpha=0.85)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(values)
    ax.set_xlabel(param)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
