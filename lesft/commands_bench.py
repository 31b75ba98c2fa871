"""``lesft bench ...``: micro-benchmarks of the transport and of the server's microbatching.

Each command measures a candidate against a baseline in the same process and run,
prints a rich table and the targets it reports against, and writes CSV, JSON (rows,
settings, machine description) and markdown into ``--out`` (default
``<runs dir>/bench/<name>-<timestamp>/``), with the resolved config beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lesft.cli import app, console
from lesft.cli_options import config_command, fail
from lesft.config import Config

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="The paper's tables and figures on real runs (overhead, accuracy, sweep) and micro-benchmarks "
                             "(transport, microbatch, pipeline, load).")
app.add_typer(bench_app, name="bench")


def _out_dir(out: Optional[str], name: str, cfg: Config) -> Path:
    from bench.common import default_out_dir

    path = Path(out) if out else default_out_dir(name, cfg.run.runs_dir)
    path.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, not after the measurements
    return path


def _print_targets(targets: list[dict]) -> None:
    for t in targets:
        mark = "[green]met[/]" if t["met"] else "[red]missed[/]"
        console.print(f"target: {t['target']}: {t['value']:.4g} -> {mark}", highlight=False)


def _print_table(table) -> None:
    """Print a wide table whole when the output is a file or pipe (rich assumes 80 columns there)."""
    if console.is_terminal:
        console.print(table)
    else:
        from rich.console import Console

        Console(file=console.file, width=200).print(table)


def _threads(cfg: Config) -> None:
    if cfg.train.threads > 0:
        import torch

        torch.set_num_threads(cfg.train.threads)


@bench_app.command("transport")
@config_command(only=("max_message_mb", "threads", "runs_dir"))
def transport_command(
    sizes: Optional[str] = typer.Option(None, "--sizes", help="activation shapes BxTxH, comma-separated "
                                        "\\[default: 1x128x576,4x128x576,4x512x576,8x512x896,4x1024x2048]"),
    dtypes: str = typer.Option("fp32,bf16,fp16", "--dtypes", help="wire dtypes to measure"),
    repeat: int = typer.Option(10, "--repeat", help="timing samples per measurement (median reported)"),
    min_time: float = typer.Option(0.05, "--min-time", help="seconds each sample lasts at least (short calls repeat)"),
    echo: str = typer.Option("process", "--echo", help="where the echo ROUTER runs: process (a child, like the "
                                                      "real server) or thread"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder \\[default: <runs dir>/bench/transport-<time>]"),
    *, cfg: Config) -> None:
    """Codec and loopback DEALER->ROUTER throughput of activations vs a memory copy; bytes on the wire."""
    from bench import transport as tb
    from bench.common import BenchError, machine_info, machine_line, rich_table, write_results

    if repeat < 1:
        fail(f"--repeat {repeat} is not valid: take at least 1 sample.")
    if min_time < 0:
        fail(f"--min-time {min_time} is not valid: it must be >= 0 seconds.")
    try:
        shapes = tb.parse_shapes(sizes) if sizes else list(tb.DEFAULT_SHAPES)
        settings = tb.TransportSettings(shapes=shapes, dtypes=tb.parse_dtypes(dtypes), repeat=repeat,
                                        min_seconds=min_time, echo=echo, max_message_mb=cfg.net.max_message_mb)
        if echo not in ("process", "thread"):
            raise BenchError(f"--echo {echo!r} unknown: use process or thread.")
        biggest = max(b * t * h * 4 for b, t, h in shapes)
        if biggest > cfg.net.max_message_mb * 2**20:
            raise BenchError(f"the largest size needs {biggest / 2**20:.0f} MiB per message, over "
                                f"--max-message-mb {cfg.net.max_message_mb}: raise it or use smaller --sizes.")
        _threads(cfg)
        out_dir = _out_dir(out, "transport", cfg)
        with console.status("transport bench") as status:
            def on_case(row: dict) -> None:
                status.update(f"transport bench: done {'x'.join(map(str, row['shape']))} {row['dtype']}")

            rows = tb.run_transport(settings, on_case)
    except BenchError as e:
        fail(str(e))
    machine = machine_info()
    targets = tb.check_targets(rows)
    config = {"bench": "transport", "sizes": [list(s) for s in shapes], "dtypes": settings.dtypes,
              "repeat": repeat, "min_time": min_time, "echo": echo, "targets": targets,
              "units": {"GBps": "1e9 bytes of activation per second", "oneway_s": "round trip / 2",
                        "wire_bytes": "delimiter + header + tensor frames + ZMTP framing"},
              "settings": cfg.to_dict()}
    notes = [f"{t['target']}: {t['value']:.4g} ({'met' if t['met'] else 'missed'})" for t in targets]
    notes.append("memcpy = bytearray(memoryview) of the activation in its wire dtype (one single-threaded copy); codec = encode (fp32 -> wire dtype) + "
                 "decode of a FORWARD; loopback = DEALER -> ROUTER echo over tcp://127.0.0.1 "
                 f"({echo}), one way = round trip / 2, including both codecs and checks; raw zmq = the same bytes "
                 "echoed as one bare frame over the same sockets (no codec).")
    paths = write_results(out_dir, "transport", rows, config, tb.COLUMNS, title="lesft bench transport",
                          notes=notes, machine=machine)
    cfg.save(out_dir / "config.json")
    _print_table(rich_table(rows, tb.COLUMNS, title="lesft bench transport"))
    _print_targets(targets)
    console.print(f"machine: {machine_line(machine)}", highlight=False)
    console.print(f"results: {paths['csv']}  {paths['json']}  {paths['md']}", highlight=False)


@bench_app.command("microbatch")
@config_command
def microbatch_command(
    clients_list: str = typer.Option("1,2,4,8,16", "--clients-list", help="numbers of clients per round to measure"),
    repeat: int = typer.Option(3, "--repeat", help="timing samples per mode (median reported)"),
    warmup: int = typer.Option(1, "--warmup", help="untimed rounds per mode before timing"),
    profile: bool = typer.Option(False, "--profile/--no-profile",
                                 help="write torch.profiler tables of the largest N (both modes)"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder \\[default: <runs dir>/bench/microbatch-<time>]"),
    *, cfg: Config) -> None:
    """Server seconds per round: N clients' rows in ONE ServerParty.process call vs N calls."""
    from bench import microbatch as mb
    from bench.common import BenchError, machine_info, machine_line, rich_table, write_results

    if repeat < 1:
        fail(f"--repeat {repeat} is not valid: take at least 1 sample.")
    if warmup < 0:
        fail(f"--warmup {warmup} is not valid: it must be >= 0.")
    try:
        settings = mb.MicrobatchSettings(mb.parse_clients(clients_list), repeat=repeat, warmup=warmup,
                                         profile=profile)
        _threads(cfg)
        out_dir = _out_dir(out, "microbatch", cfg)
        with console.status("microbatch bench") as status:
            rows, info = mb.run_microbatch(cfg, settings, out_dir=out_dir,
                                           progress=lambda text: status.update(f"microbatch bench: {text}"))
    except BenchError as e:
        fail(str(e))
    machine = machine_info()
    targets = mb.check_targets(rows, info["device"])
    config = {"bench": "microbatch", "clients_list": settings.clients_list, "repeat": repeat, "warmup": warmup,
              "workload": info, "targets": targets, "settings": cfg.to_dict()}
    notes = [f"{t['target']}: {t['value']:.4g} ({'met' if t['met'] else 'missed'})" for t in targets]
    notes += [f"{info['model']}, method {info['method']}, server on {info['device']}, "
              f"{info['batch_size']} row(s) per client; {mb.lengths_note(info)}",
              "tokens = real tokens of both paths through the server; ratio = batched / one-at-a-time seconds "
              "(medians, sampled in turn); adapter grads reset between calls, no optimiser step."]
    paths = write_results(out_dir, "microbatch", rows, config, mb.COLUMNS, title="lesft bench microbatch",
                          notes=notes, machine=machine)
    cfg.save(out_dir / "config.json")
    _print_table(rich_table(rows, mb.COLUMNS, title=f"lesft bench microbatch ({info['model']}, {info['device']})"))
    _print_targets(targets)
    if info.get("profiles"):
        console.print("profiles: " + "  ".join(info["profiles"].values()), highlight=False)
    console.print(f"machine: {machine_line(machine)}", highlight=False)
    console.print(f"results: {paths['csv']}  {paths['json']}  {paths['md']}", highlight=False)
