"""``lesft bench overhead | pipeline | accuracy | sweep``: the paper's tables and figures
measured on real runs (the micro-benchmarks live in ``commands_bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lesft.cli import console
from lesft.cli_options import config_command, fail
from lesft.commands_bench import _out_dir, _print_table, _print_targets, _threads, bench_app
from lesft.config import Config

_MEM_HELP = "memory: peak RSS per process (CPU), torch.cuda.max_memory_allocated (GPU)"


def _methods(spec: str, allowed: tuple[str, ...]) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in allowed]
    if bad or not names:
        fail(f"--methods {spec!r}: unknown {', '.join(bad) or '(none given)'}; use some of {', '.join(allowed)}.")
    return names


def _random_note(cfg: Config) -> list[str]:
    return ["model with RANDOM WEIGHTS (architecture preset): speed and memory only"] \
        if cfg.model.model.startswith("arch:") else []


@bench_app.command("overhead")
@config_command
def overhead_command(
    methods: str = typer.Option("centralized,sl,splitlora,splitfrozen,fedavg,lesft", "--methods",
                                help="methods to run, comma-separated"),
    wire_dtypes: str = typer.Option("fp32,bf16", "--wire-dtypes",
                                    help="wire dtypes for LESFT (baselines use the first); fp32,bf16 gives both rows"),
    warmup: int = typer.Option(2, "--warmup", help="rounds before the measured epoch"),
    timeout: float = typer.Option(3600, "--timeout", help="seconds allowed per method run"),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="write a PNG bar chart"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder"),
    *, cfg: Config) -> None:
    """Table 2: per-epoch memory, communication and latency per party, each method as real processes."""
    from bench import overhead as ov
    from bench.common import Column, machine_info, machine_line, rich_table, write_results
    from lesft.engine import resolve_device
    from lesft.methods import get_method
    from lesft.models import source_for

    names = _methods(methods, ov.METHODS)
    dtypes = [d.strip() for d in wire_dtypes.split(",") if d.strip()]
    if warmup < 1:
        fail("--warmup must be >= 1: the epoch window starts at the end of the warm-up.")
    out_dir = _out_dir(out, "overhead", cfg)
    source = source_for(cfg)
    device = resolve_device(cfg.train.device).type
    hidden = int(source.config.hidden_size)
    rows = []
    plan = [(m, dtypes[0]) for m in names if m != "lesft"] + ([("lesft", d) for d in dtypes] if "lesft" in names else [])
    for i, (m, dt) in enumerate(plan):
        console.print(f"[bold]{i + 1}/{len(plan)}[/] {get_method(m).label} ({dt} wire) on {source.label} ...")
        run_dir = ov.run_method(cfg, m, warmup, out_dir, dt, timeout, tag=f"-{dt}")
        row = ov.measure(run_dir, m, warmup, hidden, device, cfg.data.clients)
        row.update(row=f"{m}@{dt}", wire_dtype=dt if get_method(m).split else "-", run_dir=str(run_dir))
        if m == "lesft" and len(dtypes) > 1:
            row["label"] += f" [{dt}]"
        rows.append(row)
    cols = [Column("label", "framework"), Column("mem_client_mb", "mem client MB", ".0f"),
            Column("mem_server_mb", "mem server MB", ".0f"), Column("comm_client_mb", "comm client MB", ".2f"),
            Column("comm_server_mb", "comm server MB", ".2f"),
            Column("comm_split_mb", "of which client<->server MB", ".2f"), Column("lat_client_s", "latency client s", ".2f"),
            Column("lat_server_s", "latency server s", ".2f"), Column("wall_epoch_s", "wall/epoch s", ".1f"),
            Column("paper_comm_mb", "paper acct. MB", ".2f")]
    info = machine_info()
    title = (f"Table 2 on {source.label}: {cfg.data.clients} clients x {cfg.data.samples_per_client} samples, "
             f"one epoch after {warmup} warm-up rounds ({_MEM_HELP}; N/A = not applicable)")
    _print_table(rich_table(rows, cols, title=title))
    tg = ov.targets(rows)
    _print_targets(tg)
    notes = _random_note(cfg) + [_MEM_HELP, "comm client = all clients' bytes sent+received in the epoch (summed), "
                                 "aggregator traffic included; 'of which client<->server' leaves it out; "
                                 "latency = compute seconds of the party in the epoch (mean over clients); "
                                 "fedavg's server columns are the aggregator's", machine_line(info)] + \
        [f"target {t['target']}: {t['value']:.4g} ({'met' if t['met'] else 'missed'})" for t in tg]
    write_results(out_dir, "overhead", rows, {"settings": cfg.to_dict(), "warmup": warmup, "targets": tg,
                                              "random_weights": source.random_weights},
                  cols, title=title, notes=notes, machine=info)
    if plot:
        ov.plot(rows, out_dir / "overhead.png", title=f"lesft bench overhead on {source.label}: {cfg.data.clients} "
                f"clients x {cfg.data.samples_per_client} samples, one epoch")
    console.print(f"results in {out_dir}")


@bench_app.command("pipeline")
@config_command
def pipeline_command(
    warmup: int = typer.Option(2, "--warmup", help="rounds before the measured epoch"),
    timeout: float = typer.Option(3600, "--timeout", help="seconds allowed per run"),
    client_threads: int = typer.Option(1, "--client-threads", help="torch threads per client process"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder"),
    *, cfg: Config) -> None:
    """The multi-process pipeline vs the in-process trainer on the same work (wall time per epoch)."""
    from bench.common import machine_info, rich_table, write_results
    from bench.pipeline import compare

    out_dir = _out_dir(out, "pipeline", cfg)
    with console.status("in-process trainer, then the pipeline ..."):
        row = compare(cfg, warmup, out_dir, timeout, client_threads)
    cols = ["method", "model", "clients", "rounds_measured", "inprocess_epoch_s", "pipeline_epoch_s", "ratio"]
    console.print(rich_table([row], cols, title="pipeline / in-process, wall time per epoch"))
    target = {"target": "pipeline wall time / in-process <= 1.05", "value": row["ratio"], "met": row["ratio"] <= 1.05}
    _print_targets([target])
    write_results(out_dir, "pipeline", [row], {"settings": cfg.to_dict(), "target": target}, cols,
                  title="pipeline vs in-process", notes=_random_note(cfg), machine=machine_info())
    console.print(f"results in {out_dir}")


def _grid_progress(total: int):
    """A bar over the grid's cells, and a callback that also prints one line per cell
    (readable in a log file, where the bar does not show)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = progress.add_task("grid", total=total)
    done = {"n": 0}

    def tick(cell, record: dict, cached: bool) -> None:
        done["n"] += 1
        what = "finished earlier" if cached else (f"trained {record.get('train_s', 0):.0f} s, "
                                                  f"evaluated {record.get('eval_s', 0):.0f} s")
        progress.console.print(f"cell {done['n']}/{total} {cell.key}: {100 * record['accuracy']:.1f}% ({what})",
                               highlight=False)
        progress.update(task, advance=1, description=cell.key[:40])

    return progress, tick


def _seeds(spec: Optional[str]) -> list[Optional[int]]:
    if not spec:
        return [None]
    try:
        seeds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        fail(f"--seeds {spec!r}: give integers separated by commas, e.g. --seeds 0,1,2.")
    if not seeds or len(set(seeds)) != len(seeds):
        fail(f"--seeds {spec!r}: give distinct integers, e.g. --seeds 0,1,2.")
    return seeds


def _cells(names: list[str], overrides: dict, seeds: list[Optional[int]]):
    """``base`` once (it trains nothing), then every method seed by seed: a grid cut short
    has all methods on its first seeds."""
    from bench.experiments import Cell

    return ([Cell("base", dict(overrides))] if "base" in names else []) + \
        [Cell(m, dict(overrides), seed=s) for s in seeds for m in names if m != "base"]


def _stats_rows(rows: list[dict], names: list[str], seeds: list[Optional[int]], baseline: str) -> tuple[list, list[dict]]:
    """MethodStats per method and their display rows (percent)."""
    from bench.stats import method_stats

    stats = method_stats(rows, names, seeds, baseline=baseline if baseline in names else None)
    table = []
    for st in stats:
        mine = [r for r in rows if r["method"] == st.method]
        line = {"method": st.method, "seeds": len(st.seeds) or "-",
                "accuracy % [95% CI]": f"{100 * st.mean:.1f} [{100 * st.ci_low:.1f}, {100 * st.ci_high:.1f}]",
                "std": f"{100 * st.std:.1f}", "per seed": " ".join(f"{100 * v:.1f}" for v in st.values)}
        if st.diff is not None and st.method != baseline:
            verdict = {True: "above", False: "below", None: "CI contains 0"}[st.beats_baseline]
            line[f"vs {baseline} (paired) [95% CI]"] = (f"{100 * st.diff:+.1f} [{100 * st.diff_low:+.1f}, "
                                                        f"{100 * st.diff_high:+.1f}] {verdict}")
        else:
            line[f"vs {baseline} (paired) [95% CI]"] = "-"
        line["train s"] = f"{sum(r.get('train_s') or 0 for r in mine) / max(len(mine), 1):.0f}"
        line["train tokens"] = f"{sum(r.get('train_tokens') or 0 for r in mine) / max(len(mine), 1):.0f}"
        table.append(line)
    return stats, table


def _stats_json(stats) -> list[dict]:
    from dataclasses import asdict

    return [dict(asdict(st), beats_baseline=st.beats_baseline) for st in stats]


def _check_names(spec: str) -> list[str]:
    from bench.experiments import method_names

    return _methods(spec, method_names())


@bench_app.command("accuracy")
@config_command
def accuracy_command(
    methods: str = typer.Option("base,centralized,sl,splitlora,splitfrozen,fedavg,lesft", "--methods",
                                help="methods and loss variants (nlft, kd, kd-base, smooth, excess, power)"),
    datasets: str = typer.Option("gsm8k,commonsenseqa,aqua_rat", "--datasets", help="datasets, comma-separated"),
    samples: Optional[int] = typer.Option(None, "--samples", help="training examples in all (split over clients)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="seeds 0,1,2: each sets the training seed and the "
                                                             "data-sample seed; evaluation questions stay fixed"),
    baseline: str = typer.Option("splitlora", "--baseline", help="method the paired differences are taken to"),
    limit: int = typer.Option(100, "--limit", help="evaluation questions per cell"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="generation budget per question"),
    eval_batch_size: int = typer.Option(8, "--eval-batch-size", help="prompts generated together"),
    first_line: bool = typer.Option(False, "--first-line", help="stop answers at their first newline (faster; "
                                                               "training targets are one line)"),
    pipeline: bool = typer.Option(False, "--pipeline", help="train through the worker processes (same result)"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder (rerun with it to resume)"),
    train_runs: Optional[str] = typer.Option(None, "--train-runs", help="folder for the cells' run folders "
                                                                       "(default <out>/runs)"),
    report: Optional[str] = typer.Option(None, "--report", help="also write this markdown results document"),
    finished_only: bool = typer.Option(False, "--finished-only", help="train nothing: tables, plots and report "
                                                                     "from the cells finished so far"),
    *, cfg: Config) -> None:
    """Table 1: for each dataset x method x seed, train then evaluate (a resumable grid); mean,
    std and the paired bootstrap difference to --baseline per method."""
    from bench.common import machine_info, markdown_table, rich_table, write_results
    from bench.experiments import plot_accuracy, run_grid, validate_cells

    names = _check_names(methods)
    seed_list = _seeds(seeds)
    sets = [d.strip() for d in datasets.split(",") if d.strip()]
    if samples:
        cfg = cfg.replace(samples_per_client=max(1, samples // cfg.data.clients))
    out_dir = _out_dir(out, "accuracy", cfg)
    cells = [c for d in sets for c in _cells(names, {"dataset": d}, seed_list)]
    validate_cells(cfg, cells)
    _threads(cfg)
    progress, tick = _grid_progress(len(cells))
    with progress:
        rows = run_grid(cfg, cells, out_dir, progress=tick, eval_split="test", limit=limit,
                        max_new_tokens=max_new_tokens, batch_size=eval_batch_size, pipeline=pipeline,
                        first_line=first_line, runs_dir=Path(train_runs) if train_runs else None,
                        finished_only=finished_only)
    all_stats, md = {}, [f"# accuracy % (mean over seeds) [bootstrap 95% CI], {limit} test questions per cell", ""]
    for d in sets:
        stats, table = _stats_rows([r for r in rows if r["dataset"] == d], names, seed_list, baseline)
        all_stats[d] = _stats_json(stats)
        model = next((r["model"] for r in rows if r["dataset"] == d), cfg.model.model)
        title = f"{d} on {model}: accuracy % over seeds {seeds or '(settings)'}, {limit} questions per cell"
        console.print(rich_table(table, title=title))
        md += [f"## {title}", "", markdown_table(table)]
        plot_accuracy(stats, out_dir / f"accuracy-{d}.png", title, baseline=baseline)
    write_results(out_dir, "accuracy", rows, {"settings": cfg.to_dict(), "methods": names, "datasets": sets,
                                              "seeds": seed_list, "baseline": baseline, "stats": all_stats},
                  title="Table 1 (per cell)", notes=_random_note(cfg), machine=machine_info())
    (out_dir / "table1.md").write_text("\n".join(md) + "\n")
    if report:
        from bench.results import write_report

        missing = [c.key for c in cells if not (out_dir / "cells" / f"{c.key}.json").is_file()]
        write_report(Path(report), out_dir, rows, all_stats, names=names, seeds=seed_list, baseline=baseline,
                     limit=limit, max_new_tokens=max_new_tokens, cfg=cfg, missing=missing)
        console.print(f"report written to {report}")
    console.print(f"results in {out_dir}")


@bench_app.command("sweep")
@config_command
def sweep_command(
    param: str = typer.Option(..., "--param", help="name=v1,v2,...: split_ratio, samples_per_client, clients, "
                                                   "paths, gamma_nonsalient or any setting"),
    methods: str = typer.Option("lesft,splitlora,sl", "--methods",
                                help="methods and loss variants (nlft, kd, kd-base, smooth, excess, power)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="seeds 0,1,2: each sets the training seed and the "
                                                             "data-sample seed; evaluation questions stay fixed"),
    baseline: str = typer.Option("splitlora", "--baseline", help="method the paired differences are taken to"),
    limit: int = typer.Option(100, "--limit", help="evaluation questions per cell"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="generation budget per question"),
    eval_batch_size: int = typer.Option(8, "--eval-batch-size", help="prompts generated together"),
    first_line: bool = typer.Option(False, "--first-line", help="stop answers at their first newline (faster; "
                                                               "training targets are one line)"),
    pipeline: bool = typer.Option(False, "--pipeline", help="train through the worker processes (same result)"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder (rerun with it to resume)"),
    *, cfg: Config) -> None:
    """Figs. 3-5 and 7, Table 3: accuracy over one setting's values, per method and seed (a resumable grid)."""
    from bench.common import machine_info, markdown_table, rich_table, write_results
    from bench.experiments import parse_param, plot_sweep, run_grid, validate_cells

    name, values = parse_param(param)
    names = _check_names(methods)
    seed_list = _seeds(seeds)
    out_dir = _out_dir(out, f"sweep-{name}", cfg)
    cells = [c for v in values for c in _cells(names, {name: v}, seed_list)]
    validate_cells(cfg, cells)  # fail before hours of training on a bad value
    _threads(cfg)
    progress, tick = _grid_progress(len(cells))
    with progress:
        rows = run_grid(cfg, cells, out_dir, progress=tick, eval_split="test", limit=limit,
                        max_new_tokens=max_new_tokens, batch_size=eval_batch_size, pipeline=pipeline,
                        first_line=first_line)
    per_value, series = {}, {m: [] for m in names}
    md = []
    for v in values:
        stats, table = _stats_rows([r for r in rows if str(r[name]) == str(v)], names, seed_list, baseline)
        per_value[v] = _stats_json(stats)
        by_method = {st.method: st for st in stats}
        for m in names:
            series[m].append(by_method.get(m))
        md += [f"## {name} = {v}", "", markdown_table(table)]
        console.print(rich_table(table, title=f"{name} = {v}"))
    title = f"accuracy % over {name} ({cfg.data.dataset}, {limit} test questions, seeds {seeds or '(settings)'})"
    write_results(out_dir, f"sweep-{name}", rows, {"settings": cfg.to_dict(), "param": name, "values": values,
                                                   "seeds": seed_list, "baseline": baseline, "stats": per_value},
                  title=title, notes=_random_note(cfg), machine=machine_info())
    (out_dir / f"sweep-{name}-table.md").write_text(f"# {title}\n\n" + "\n".join(md) + "\n")
    plot_sweep(series, values, name, out_dir / f"sweep-{name}.png", title)
    console.print(f"results in {out_dir}")


@bench_app.command("load")
def load_command(clients: int = typer.Option(32, "--clients", help="client processes"),
                 rounds: int = typer.Option(50, "--rounds", help="rounds of the run"),
                 warmup: int = typer.Option(5, "--warmup", help="round whose server RSS is the baseline"),
                 runs_dir: str = typer.Option("runs", "--runs-dir", help="folder of run outputs"),
                 out: Optional[str] = typer.Option(None, "--out", help="output folder"),
                 timeout: float = typer.Option(3600, "--timeout", help="seconds allowed for the run")) -> None:
    """Many clients (tiny model) against one server: requests = replies, server memory flat."""
    from bench.load import main as load_main

    args = ["--clients", str(clients), "--rounds", str(rounds), "--warmup", str(warmup), "--runs-dir", runs_dir,
            "--timeout-s", str(timeout)] + (["--out", out] if out else [])
    raise typer.Exit(load_main(args))
