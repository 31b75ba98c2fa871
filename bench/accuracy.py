"""``lesft bench accuracy``: the paper's Table 1, a resumable grid of dataset x method x
seed cells, each trained then evaluated (see :mod:`bench.experiments`); per method the mean,
the std and the paired bootstrap difference to ``--baseline``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.common import (bench_command, console, machine_info, make_out_dir, markdown_table, random_note, rich_table,
                          write_results)
from bench.experiments import (BASELINE_OPTION, EVAL_BATCH_SIZE_OPTION, FIRST_LINE_OPTION, LIMIT_OPTION,
                               MAX_NEW_TOKENS_OPTION, METHODS_HELP, OUT_OPTION, PIPELINE_OPTION, SEEDS_OPTION,
                               check_names, grid_cells, grid_progress, parse_seeds, plot_accuracy, run_grid, stats_json,
                               stats_rows, validate_cells)
from bench.results import write_report
from lesft.config import Config
from lesft.methods import table_order


@bench_command("accuracy", kind="paper", order=5)
def accuracy_command(
    methods: str = typer.Option(",".join(("base", *table_order())), "--methods", help=METHODS_HELP),
    datasets: str = typer.Option("gsm8k,commonsenseqa,aqua_rat", "--datasets", help="datasets, comma-separated"),
    samples: Optional[int] = typer.Option(None, "--samples", help="training examples in all (split over clients)"),
    seeds: Optional[str] = SEEDS_OPTION,
    baseline: str = BASELINE_OPTION,
    limit: int = LIMIT_OPTION,
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    eval_batch_size: int = EVAL_BATCH_SIZE_OPTION,
    first_line: bool = FIRST_LINE_OPTION,
    pipeline: bool = PIPELINE_OPTION,
    out: Optional[str] = OUT_OPTION,
    train_runs: Optional[str] = typer.Option(None, "--train-runs", help="folder for the cells' run folders "
                                                                       "(default <out>/runs)"),
    report: Optional[str] = typer.Option(None, "--report", help="also write this markdown results document"),
    finished_only: bool = typer.Option(False, "--finished-only", help="train nothing: tables, plots and report "
                                                                     "from the cells finished so far"),
    *, cfg: Config) -> None:
    """Table 1: for each dataset x method x seed, train then evaluate (a resumable grid); mean,
    std and the paired bootstrap difference to --baseline per method."""
    from lesft.engine import set_threads  # here: lesft.engine loads transformers
    names = check_names(methods)
    seed_list = parse_seeds(seeds)
    sets = [d.strip() for d in datasets.split(",") if d.strip()]
    if samples:
        cfg = cfg.replace(samples_per_client=max(1, samples // cfg.data.clients))
    out_dir = make_out_dir(out, "accuracy", cfg.run.runs_dir)
    cells = [c for d in sets for c in grid_cells(names, {"dataset": d}, seed_list)]
    validate_cells(cfg, cells)
    set_threads(cfg)
    progress, tick = grid_progress(len(cells))
    with progress:
        rows = run_grid(cfg, cells, out_dir, progress=tick, eval_split="test", limit=limit,
                        max_new_tokens=max_new_tokens, batch_size=eval_batch_size, pipeline=pipeline,
                        first_line=first_line, runs_dir=Path(train_runs) if train_runs else None,
                        finished_only=finished_only)
    all_stats, md = {}, [f"# accuracy % (mean over seeds) [bootstrap 95% CI], {limit} test questions per cell", ""]
    for d in sets:
        stats, table = stats_rows([r for r in rows if r["dataset"] == d], names, seed_list, baseline)
        all_stats[d] = stats_json(stats)
        model = next((r["model"] for r in rows if r["dataset"] == d), cfg.model.model)
        title = f"{d} on {model}: accuracy % over seeds {seeds or '(settings)'}, {limit} questions per cell"
        console.print(rich_table(table, title=title))
        md += [f"## {title}", "", markdown_table(table)]
        plot_accuracy(stats, out_dir / f"accuracy-{d}.png", title, baseline=baseline)
    write_results(out_dir, "accuracy", rows, {"settings": cfg.to_dict(), "methods": names, "datasets": sets,
                                              "seeds": seed_list, "baseline": baseline, "stats": all_stats},
                  title="Table 1 (per cell)", notes=random_note(cfg), machine=machine_info())
    (out_dir / "table1.md").write_text("\n".join(md) + "\n")
    if report:
        missing = [c.key for c in cells if not (out_dir / "cells" / f"{c.key}.json").is_file()]
        write_report(Path(report), out_dir, rows, all_stats, names=names, seeds=seed_list, baseline=baseline,
                     limit=limit, max_new_tokens=max_new_tokens, cfg=cfg, missing=missing)
        console.print(f"report written to {report}")
    console.print(f"results in {out_dir}")
