"""``lesft bench link``: pipelined rounds over an emulated edge link, against the overlap bound.

For each ``--pipeline-depth`` the same config, seed and data run as real processes, the
broker's link emulator (``--link-up/--link-down/--link-latency-ms``) in the path, for a
warm-up of whole accumulation windows and then one epoch. From the run's metrics files
(every record carries its time on the machine's monotonic clock, the compute seconds so
far and the bytes so far; the broker notes every shaped message):

- wall per epoch: from the first party's record closing the warm-up to the last party's
  record of the last round (server and clients);
- the server's busy fraction: its compute seconds (forward, loss, backward, optimiser;
  not checkpoints) in the epoch / that wall;
- bytes per direction: every client's client<->server body bytes (what the link counts);
- the overlap bound: per accumulation window, max(server compute, the slowest client's
  compute, the slowest client's transfer time), summed. A client's transfer time in a
  window is max(up bytes x 8 / up rate, down bytes x 8 / down rate) + the latency of both
  directions: its link's critical path once transfers overlap each other and compute.
  Checkpoints, the aggregator's round trip and microbatch waits are outside the bound;
- ratios: wall / the wall of the first depth-1 run (the synchronous baseline of this
  same invocation) and achieved / bound; and whether every adapter equals depth 1's.

``<out>/link.png`` lays the first windows of each depth on one timeline: per client its
forward and backward (its metrics spans), its uploads and downloads (the broker's link
notes, from arrival to departure), and the server's compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import typer

from bench.common import (BenchError, Column, bench_command, console, link_note, machine_info, make_out_dir,
                          print_table, print_targets, random_note, ratio, rich_table, target_note, write_results)
from lesft.config import Config, leaf_fields
from lesft.lora import load_adapters
from lesft.methods import METHODS, get_method
from lesft.metrics import read_jsonl
from lesft.schedule import is_step_round, rounds_per_epoch
from workers.launch import launch

MB = 2**20
SETTINGS = tuple(name for name in leaf_fields() if name != "pipeline_depth")  # --pipeline-depth is a list here


def parse_depths(spec: str) -> list[int]:
    """``--pipeline-depth 1,2,4`` -> [1, 2, 4]; the first depth-1 run is the baseline."""
    try:
        depths = [int(d) for d in spec.split(",") if d.strip()]
    except ValueError:
        depths = []
    if not depths or min(depths) < 1:
        raise BenchError(f"--pipeline-depth {spec!r} is not a list of depths: use positive integers, e.g. 1,2,4.")
    if 1 not in depths:
        raise BenchError(f"--pipeline-depth {spec!r} has no depth 1: the synchronous run is the baseline, "
                         f"e.g. --pipeline-depth 1,{spec}.")
    return depths


# --------------------------------------------------------------------------- one run


def _rounds(path: Path, total: int) -> dict[int, dict]:
    """A worker's round records by round; every round of the run must be there."""
    got = {r["round"]: r for r in read_jsonl(path) if r.get("event") == "round"}
    missing = sorted(set(range(total)) - set(got))
    if missing:
        raise BenchError(f"{path} has no record of round(s) {missing[:5]}: that worker did not finish its run "
                         f"(see {path.parent / 'logs'}).")
    return got


def windows(first: int, total: int, grad_accum: int) -> list[range]:
    """The accumulation windows of rounds ``first..total-1`` (``first`` starts a window)."""
    out, start = [], first
    for r in range(first, total):
        if is_step_round(r, total, grad_accum):
            out.append(range(start, r + 1))
            start = r + 1
    return out


def _split_bytes(rec: dict, key: str) -> int:
    """Client<->server bytes so far of one direction (the aggregator's ``agg.*`` left out)."""
    return sum(v for k, v in rec.get(key, {}).items() if not k.startswith("agg."))


def window_costs(server: dict, clients: list[dict], w: range, cfg: Config) -> dict:
    """Seconds and bytes of accumulation window ``w`` from the records closing it and the
    window before: the server's compute, the slowest client's compute and link time, both
    directions' bytes, and the window's overlap bound (their max)."""
    a, b = w.start - 1, w.stop - 1
    up_rate, down_rate = cfg.net.link_rates
    latency = 2 * cfg.net.link_latency_ms / 1000
    ups = [_split_bytes(c[b], "sent_by_type") - _split_bytes(c[a], "sent_by_type") for c in clients]
    downs = [_split_bytes(c[b], "received_by_type") - _split_bytes(c[a], "received_by_type") for c in clients]
    link = max(max(u * 8 / up_rate if up_rate else 0.0, d * 8 / down_rate if down_rate else 0.0) + latency
               for u, d in zip(ups, downs))
    srv = server[b]["compute_total_s"] - server[a]["compute_total_s"]
    comp = max(c[b]["compute_total_s"] - c[a]["compute_total_s"] for c in clients)
    return {"server_s": srv, "client_s": comp, "link_s": link, "up": sum(ups), "down": sum(downs),
            "bound_s": max(srv, comp, link)}


def measure(run_dir: Path, cfg: Config, warmup: int) -> dict:
    """The figures of one finished run (see the module docstring)."""
    total = cfg.train.rounds
    server = _rounds(run_dir / "server-0.jsonl", total)
    clients = [_rounds(run_dir / f"client-{i}.jsonl", total) for i in range(cfg.data.clients)]
    costs = [window_costs(server, clients, w, cfg) for w in windows(warmup, total, cfg.train.grad_accum)]
    sums = {k: sum(c[k] for c in costs) for k in costs[0]}
    parties = [server, *clients]
    wall = max(p[total - 1]["clock"] for p in parties) - min(p[warmup - 1]["clock"] for p in parties)
    return {"rounds_measured": total - warmup, "wall_epoch_s": wall, "server_compute_s": sums["server_s"],
            "server_busy": ratio(sums["server_s"], wall), "client_compute_s": sums["client_s"],
            "transfer_s": sums["link_s"], "bound_s": sums["bound_s"],
            "achieved_over_bound": ratio(wall, sums["bound_s"]), "up_mb": sums["up"] / MB, "down_mb": sums["down"] / MB,
            "loss_final": server[total - 1].get("loss")}


def adapters_of(run_dir: Path, clients: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapter set a finished run holds: the server's, the aggregator's global client
    adapters (methods that aggregate), each client's own (from its state file)."""
    out = {name: load_adapters(run_dir / f"{name}-adapters.safetensors") for name in ("server", "client")
           if (run_dir / f"{name}-adapters.safetensors").is_file()}
    for i in range(clients):
        state = torch.load(run_dir / f"client-{i}-state.pt", map_location="cpu", weights_only=True)
        out[f"client-{i}"] = state["party"]["adapters"]
    return out


def same_adapters(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Bit for bit: the same sets, names, shapes and values."""
    return a.keys() == b.keys() and all(a[s].keys() == b[s].keys() and all(torch.equal(a[s][k], b[s][k])
                                                                            for k in a[s]) for s in a)


# --------------------------------------------------------------------------- timeline

# lane -> (legend, colour, sub-row): compute on a row's upper half, transfers on its lower half
LANES = {"forward": ("forward", "tab:blue", 0), "backward": ("backward", "tab:purple", 0),
         "up": ("upload", "tab:orange", 1), "down": ("download", "tab:green", 1), "server": ("server", "tab:red", 0)}
SERVER_PHASES = ("forward", "loss", "backward", "optimizer")


def timeline_bars(run_dir: Path, clients: int, t0: float, t1: float) -> dict[str, list[tuple[str, float, float]]]:
    """Per row (``client <i>``, ``server``): (lane, start, end) of what it did in [t0, t1]."""
    rows: dict[str, list] = {f"client {i}": [] for i in range(clients)}
    rows["server"] = []

    def add(row: str, lane: str, a: float, b: float) -> None:
        if b >= t0 and a <= t1 and row in rows:
            rows[row].append((lane, a, b))

    for i in range(clients):
        for rec in read_jsonl(run_dir / f"client-{i}.jsonl"):
            for name, a, b in rec.get("spans", []):
                if name in ("forward", "backward"):
                    add(f"client {i}", name, a, b)
    for rec in read_jsonl(run_dir / "server-0.jsonl"):
        for name, a, b in rec.get("spans", []):
            if name in SERVER_PHASES:
                add("server", "server", a, b)
    for rec in read_jsonl(run_dir / "broker-0.jsonl"):
        if rec.get("event") == "link" and rec.get("type") in ("forward", "backward") and rec.get("client") is not None:
            add(f"client {rec['client']}", rec["dir"], rec["in"], rec["out"])
    return rows


def plot_timeline(runs: Sequence[tuple[str, Path, float, float]], clients: int, path: Path, title: str) -> Path:
    """One panel per run (label, run folder, t0, t1): a row per client and the server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(runs), 1, figsize=(13, 1.2 + (0.55 * (clients + 1) + 0.6) * len(runs)),
                             squeeze=False)
    for ax, (label, run_dir, t0, t1) in zip(axes[:, 0], runs):
        rows = timeline_bars(run_dir, clients, t0, t1)
        for y, (row, bars) in enumerate(rows.items()):
            for lane, a, b in bars:
                _, color, sub = LANES[lane]
                ax.broken_barh([(a - t0, max(b - a, (t1 - t0) * 1e-3))], (y - 0.4 + 0.42 * sub, 0.38),
                               facecolors=color)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(list(rows))
        ax.invert_yaxis()
        ax.set_xlim(0, t1 - t0)
        ax.set_title(label, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds since the end of the warm-up")
    legend = [Patch(color=c, label=n) for n, c, _ in LANES.values()]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timeline_span(run_dir: Path, cfg: Config, warmup: int, n_windows: int) -> tuple[float, float]:
    """[t0, t1]: from the end of the warm-up to the end of the first ``n_windows`` windows."""
    ws = windows(warmup, cfg.train.rounds, cfg.train.grad_accum)[:n_windows]
    parties = [_rounds(run_dir / "server-0.jsonl", cfg.train.rounds)] + \
        [_rounds(run_dir / f"client-{i}.jsonl", cfg.train.rounds) for i in range(cfg.data.clients)]
    return (min(p[warmup - 1]["clock"] for p in parties), max(p[ws[-1].stop - 1]["clock"] for p in parties))


# --------------------------------------------------------------------------- command

COLUMNS = [Column("depth"), Column("wall_epoch_s", "wall/epoch s", ".2f"), Column("wall_over_sync", "/ depth 1", ".3f"),
           Column("server_busy", "server busy", ".2f"), Column("server_compute_s", "server s", ".2f"),
           Column("client_compute_s", "slowest client s", ".2f"), Column("transfer_s", "slowest link s", ".2f"),
           Column("bound_s", "overlap bound s", ".2f"), Column("achieved_over_bound", "achieved / bound", ".2f"),
           Column("up_mb", "up MB", ".2f"), Column("down_mb", "down MB", ".2f"),
           Column("adapters_equal", "adapters == depth 1")]


def run_depth(cfg: Config, depth: int, warmup: int, out_dir: Path, tag: str, timeout_s: float,
              client_threads: int) -> tuple[Config, Path]:
    """One real run at ``depth``: the warm-up and one epoch; its config and its folder."""
    per_epoch = rounds_per_epoch(cfg.data.samples_per_client, cfg.train.batch_size)
    c = cfg.replace(pipeline_depth=depth, rounds=warmup + per_epoch, run_id=f"depth{depth}{tag}",
                    runs_dir=str(out_dir / "runs"))
    launch(c, timeout_s=timeout_s, client_threads=client_threads)
    return c, out_dir / "runs" / c.run.run_id


def targets(rows: Sequence[dict]) -> list[dict]:
    """The issue's two figures for the best pipelined depth (none without a depth > 1)."""
    piped = [r for r in rows if r["depth"] > 1]
    if not piped:
        return []
    best = min(piped, key=lambda r: r["wall_epoch_s"])
    out = [{"target": f"pipelined (depth {best['depth']}) wall / synchronous <= 0.7", "value": best["wall_over_sync"],
            "limit": 0.7},
           {"target": f"achieved / overlap bound (depth {best['depth']}) <= 1.2", "value": best["achieved_over_bound"],
            "limit": 1.2}]
    for t in out:
        t["met"] = t["value"] <= t["limit"]
    return out


@bench_command("link", kind="micro", order=8, only=SETTINGS)
def link_command(
    depths: str = typer.Option("1,2,4", "--pipeline-depth", help="pipeline depths to run, comma-separated "
                               "(the first depth-1 run is the baseline; 1,1 measures the run-to-run spread)"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="rounds before the measured epoch, a multiple "
                                         "of --grad-accum [default: one window]"),
    timeline_windows: int = typer.Option(2, "--timeline-windows", help="accumulation windows per depth in link.png"),
    timeout: float = typer.Option(3600, "--timeout", help="seconds allowed per run"),
    client_threads: int = typer.Option(1, "--client-threads", help="torch threads per client process"),
    draw: bool = typer.Option(True, "--plot/--no-plot", help="write the PNG timeline"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder"),
    *, cfg: Config) -> None:
    """Pipeline depths over an emulated edge link: wall, server busy, bytes, the overlap bound."""
    plan = parse_depths(depths)
    g = cfg.train.grad_accum
    warmup = g if warmup is None else warmup
    if warmup < g or warmup % g:
        raise BenchError(f"--warmup {warmup} is not a positive multiple of --grad-accum {g}: the measured "
                         f"epoch must start at a window boundary; use --warmup {g}.")
    if timeline_windows < 1:
        raise BenchError(f"--timeline-windows {timeline_windows}: draw at least one window (or pass --no-plot).")
    if not get_method(cfg.train.method).split:
        split = ", ".join(name for name, m in METHODS.items() if m.split)
        raise BenchError(f"method {cfg.train.method} has no server: the link bench needs a split method ({split}).")
    out_dir = make_out_dir(out, "link", cfg.run.runs_dir)
    rows, runs, base = [], [], None
    for i, depth in enumerate(plan):
        console.print(f"[bold]{i + 1}/{len(plan)}[/] depth {depth} ...")
        c, run_dir = run_depth(cfg, depth, warmup, out_dir, f"-{i}", timeout, client_threads)
        row = {"depth": depth, "run": i, **measure(run_dir, c, warmup), "run_dir": str(run_dir)}
        adapters = adapters_of(run_dir, cfg.data.clients)
        if base is None and depth == 1:
            base = (row, adapters)
        rows.append(row)
        runs.append((depth, i, run_dir, c, adapters))
    for row, (_, _, _, _, adapters) in zip(rows, runs):
        row["wall_over_sync"] = ratio(row["wall_epoch_s"], base[0]["wall_epoch_s"])
        row["adapters_equal"] = same_adapters(adapters, base[1])
    _report(cfg, rows, runs, out_dir, warmup, timeline_windows if draw else 0)


def _report(cfg: Config, rows: list[dict], runs: list, out_dir: Path, warmup: int, timeline_windows: int) -> None:
    info = machine_info()
    title = (f"lesft bench link on {cfg.model.model}: {cfg.train.method}, {cfg.data.clients} clients, "
             f"{cfg.net.wire_dtype} wire, one epoch after {warmup} warm-up rounds")
    print_table(rich_table(rows, COLUMNS, title=title))
    tg = targets(rows)
    print_targets(tg)
    notes = random_note(cfg) + link_note(cfg) + [
        "wall/epoch: first party's record closing the warm-up to the last party's record of the epoch; "
        "server busy = server compute / wall; overlap bound = per accumulation window max(server compute, "
        "slowest client's compute, slowest client's link time = max(up bytes*8/up rate, down bytes*8/down rate) "
        "+ both latencies), summed; checkpoints and the aggregator round trip are outside the bound",
        "bytes: client<->server message bodies (header + tensor frames), all clients; the aggregator's "
        "traffic is not shaped"] + \
        [f"target {target_note(t)}" for t in tg]
    write_results(out_dir, "link", rows, {"settings": cfg.to_dict(), "depths": [r["depth"] for r in rows],
                                          "warmup": warmup, "targets": tg},
                  COLUMNS, title=title, notes=notes, machine=info)
    if timeline_windows:
        panels = [(f"depth {d} (run {i})", run_dir, *timeline_span(run_dir, c, warmup, timeline_windows))
                  for d, i, run_dir, c, _ in runs]
        plot_timeline(panels, cfg.data.clients, out_dir / "link.png",
                      f"{title}\n{'; '.join(link_note(cfg)) or 'unshaped loopback'}")
    console.print(f"results in {out_dir}")
