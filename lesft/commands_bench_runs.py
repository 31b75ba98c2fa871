"""``lesft bench overhead | pipeline | accuracy | sweep``: the paper's tables and figures
measured on real runs (the micro-benchmarks live in ``commands_bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lesft.cli import console
from lesft.cli_options import config_command, fail
from lesft.commands_bench import _out_dir, _print_table, _print_targets, bench_app
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    task = progress.add_task("grid", total=total)
    return progress, lambda key: progress.update(task, advance=1, description=key[:40])




@bench_app.command("accuracy")
@config_command
def accuracy_command(
    methods: str = typer.Option("base,centralized,sl,splitlora,splitfrozen,fedavg,lesft", "--methods",
                                help="methods to train and evaluate, comma-separated (base: no fine-tuning)"),
    datasets: str = typer.Option("gsm8k,commonsenseqa,aqua_rat", "--datasets", help="datasets, comma-separated"),
    samples: Optional[int] = typer.Option(None, "--samples", help="training examples in all (split over clients)"),
    limit: int = typer.Option(100, "--limit", help="evaluation questions per cell"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="generation budget per question"),
    eval_batch_size: int = typer.Option(8, "--eval-batch-size", help="prompts generated together"),
    first_line: bool = typer.Option(False, "--first-line", help="stop answers at their first newline (faster; "
                                                               "training targets are one line)"),
    pipeline: bool = typer.Option(False, "--pipeline", help="train through the worker processes (same result)"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder (rerun with it to resume)"),
    *, cfg: Config) -> None:
    """Table 1: for each dataset x method, train then evaluate (a resumable grid)."""
    from bench.common import machine_info, markdown_table, write_results
    from bench.experiments import Cell, run_grid
    from lesft.methods import METHODS

    names = _methods(methods, ("base", *METHODS))
    sets = [d.strip() for d in datasets.split(",") if d.strip()]
    if samples:
        cfg = cfg.replace(samples_per_client=max(1, samples // cfg.data.clients))
    out_dir = _out_dir(out, "accuracy", cfg)
    cells = [Cell(m, {"dataset": d}) for d in sets for m in names]
    progress, tick = _grid_progress(len(cells))
    with progress:
        rows = run_grid(cfg, cells, out_dir, progress=tick, eval_split="test", limit=limit,
                        max_new_tokens=max_new_tokens, batch_size=eval_batch_size, pipeline=pipeline,
                        first_line=first_line)
    from lesft.methods import get_method

    label = {m: ("Base" if m == "base" else get_method(m).label) for m in names}
    table = []
    for d in sets:
        line = {"dataset": d, "model": next((r["model"] for r in rows if r["dataset"] == d), cfg.model.model)}
        for m in names:
            r = next(r for r in rows if r["dataset"] == d and r["method"] == m)
            line[label[m]] = f"{100 * r['accuracy']:.2f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        table.append(line)
    from bench.common import rich_table

    console.print(rich_table(table, title=f"Table 1: accuracy % [95% CI], {limit} test questions per cell"))
    write_results(out_dir, "accuracy", rows, {"settings": cfg.to_dict(), "methods": names, "datasets": sets},
                  title="Table 1 (per cell)", notes=_random_note(cfg), machine=machine_info())
    (out_dir / "table1.md").write_text("# Table 1: accuracy % [95% CI]\n\n" + markdown_table(table) + "\n")
    console.print(f"results in {out_dir}")


@bench_app.command("sweep")
@config_command
def sweep_command(
    param: str = typer.Option(..., "--param", help="name=v1,v2,...: split_ratio, samples_per_client, clients, "
                                                   "paths, gamma_nonsalient or any setting"),
    methods: str = typer.Option("lesft,splitlora,sl", "--methods", help="methods per value, comma-separated"),
    limit: int = typer.Option(100, "--limit", help="evaluation questions per cell"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="generation budget per question"),
    eval_batch_size: int = typer.Option(8, "--eval-batch-size", help="prompts generated together"),
    first_line: bool = typer.Option(False, "--first-line", help="stop answers at their first newline (faster; "
                                                               "training targets are one line)"),
    pipeline: bool = typer.Option(False, "--pipeline", help="train through the worker processes (same result)"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder (rerun with it to resume)"),
    *, cfg: Config) -> None:
    """Figs. 3-5 and 7, Table 3: accuracy over one setting's values, per method (a resumable grid)."""
    from bench.common import machine_info, markdown_table, rich_table, write_results
    from bench.experiments import Cell, parse_param, plot_sweep, run_grid
    from lesft.methods import METHODS

    name, values = parse_param(param)
    names = _methods(methods, ("base", *METHODS))
    for v in values:  # fail before hours of training on a bad value
        cfg.replace(**{name: v})
    out_dir = _out_dir(out, f"sweep-{name}", cfg)
    cells = [Cell(m, {name: v}) for v in values for m in names]
    progress, tick = _grid_progress(len(cells))
    with progress:
        rows = run_grid(cfg, cells, out_dir, progress=tick, eval_split="test", limit=limit,
                        max_new_tokens=max_new_tokens, batch_size=eval_batch_size, pipeline=pipeline,
                        first_line=first_line)
    table = []
    for m in names:
        line = {"method": m}
        for v in values:
            r = next(r for r in rows if r["method"] == m and str(r[name]) == str(v))
            line[f"{name}={v}"] = f"{100 * r['accuracy']:.2f}"
        table.append(line)
    title = f"accuracy % over {name} ({cfg.data.dataset}, {limit} test questions)"
    console.print(rich_table(table, title=title))
    write_results(out_dir, f"sweep-{name}", rows, {"settings": cfg.to_dict(), "param": name, "values": values},
                  title=title, notes=_random_note(cfg), machine=machine_info())
    (out_dir / f"sweep-{name}-table.md").write_text(f"# {title}\n\n" + markdown_table(table) + "\n")
    plot_sweep(rows, name, out_dir / f"sweep-{name}.png", title)
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
