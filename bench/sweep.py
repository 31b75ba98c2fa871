"""``lesft bench sweep``: Figs. 3-5 and 7 and Table 3 of the paper, accuracy over the
values of one setting, per method and seed (a resumable grid, see :mod:`bench.experiments`)."""

from __future__ import annotations

from typing import Optional

import typer

from bench.common import (bench_command, console, machine_info, make_out_dir, markdown_table, random_note, rich_table,
                          write_results)
from bench.experiments import (BASELINE_OPTION, EVAL_BATCH_SIZE_OPTION, FIRST_LINE_OPTION, LIMIT_OPTION,
                               MAX_NEW_TOKENS_OPTION, METHODS_HELP, OUT_OPTION, PIPELINE_OPTION, SEEDS_OPTION,
                               check_names, grid_cells, grid_progress, parse_param, parse_seeds, plot_sweep, run_grid,
                               stats_json, stats_rows, validate_cells)
from lesft.config import Config


@bench_command("sweep", kind="paper", order=6)
def sweep_command(
    param: str = typer.Option(..., "--param", help="name=v1,v2,...: split_ratio, samples_per_client, clients, "
                                                   "paths, gamma_nonsalient or any setting"),
    methods: str = typer.Option("lesft,splitlora,sl", "--methods", help=METHODS_HELP),
    seeds: Optional[str] = SEEDS_OPTION,
    baseline: str = BASELINE_OPTION,
    limit: int = LIMIT_OPTION,
    max_new_tokens: int = MAX_NEW_TOKENS_OPTION,
    eval_batch_size: int = EVAL_BATCH_SIZE_OPTION,
    first_line: bool = FIRST_LINE_OPTION,
    pipeline: bool = PIPELINE_OPTION,
    out: Optional[str] = OUT_OPTION,
    *, cfg: Config) -> None:
    """Figs. 3-5 and 7, Table 3: accuracy over one setting's values, per method and seed (a resumable grid)."""
    from lesft.engine import set_threads  # here: lesft.engine loads transformers

    name, values = parse_param(param)
    names = check_names(methods)
    seed_list = parse_seeds(seeds)
    out_dir = make_out_dir(out, f"sweep-{name}", cfg.run.runs_dir)
    cells = [c for v in values for c in grid_cells(names, {name: v}, seed_list)]
    validate_cells(cfg, cells)  # fail before hours of training on a bad value
    set_threads(cfg)
    progress, tick = grid_progress(len(cells))
    with progress:
        rows = run_grid(cfg, cells, out_dir, progress=tick, eval_split="test", limit=limit,
                        max_new_tokens=max_new_tokens, batch_size=eval_batch_size, pipeline=pipeline,
                        first_line=first_line)
    per_value, series = {}, {m: [] for m in names}
    md = []
    for v in values:
        stats, table = stats_rows([r for r in rows if str(r[name]) == str(v)], names, seed_list, baseline)
        per_value[v] = stats_json(stats)
        by_method = {st.method: st for st in stats}
        for m in names:
            series[m].append(by_method.get(m))
        md += [f"## {name} = {v}", "", markdown_table(table)]
        console.print(rich_table(table, title=f"{name} = {v}"))
    title = f"accuracy % over {name} ({cfg.data.dataset}, {limit} test questions, seeds {seeds or '(settings)'})"
    write_results(out_dir, f"sweep-{name}", rows, {"settings": cfg.to_dict(), "param": name, "values": values,
                                                   "seeds": seed_list, "baseline": baseline, "stats": per_value},
                  title=title, notes=random_note(cfg), machine=machine_info())
    (out_dir / f"sweep-{name}-table.md").write_text(f"# {title}\n\n" + "\n".join(md) + "\n")
    plot_sweep(series, values, name, out_dir / f"sweep-{name}.png", title)
    console.print(f"results in {out_dir}")
