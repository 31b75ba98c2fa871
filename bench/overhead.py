"""``lesft bench overhead``: the paper's Table 2 for real processes on this machine.

Each method runs through the launcher (loopback) for ``warmup`` rounds plus one epoch;
every worker's metrics file carries running totals (bytes, compute seconds, wall
clock) in its round records, so the epoch is the difference between the last record
and the one that closes the warm-up. Per party:

- memory: peak RSS of the process (CPU) or ``torch.cuda.max_memory_allocated`` (GPU);
- communication: bytes sent + received in the epoch (clients summed, as the paper's
  "total"); the aggregator's traffic is counted apart;
- latency: compute seconds in the epoch (forward, backward, loss, optimizer; the mean
  over clients), beside the epoch's wall time.

For LESFT the paper's own accounting of the same run is computed from the padded tokens
the server saw: fp32 activations of both paths up, fp32 gradients of both paths down,
int64 labels of both paths.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import typer

from bench.common import (BenchError, Column, bench_command, console, link_note, machine_info, machine_line,
                          make_out_dir, parse_methods, print_table, print_targets, random_note, rich_table,
                          target_note, write_results)
from lesft.config import Config
from lesft.methods import get_method, table_order
from lesft.metrics import read_jsonl
from lesft.schedule import rounds_per_epoch
from workers.launch import launch

METHODS = table_order()
MB = 2**20
MEM_HELP = "memory: peak RSS per process (CPU), torch.cuda.max_memory_allocated (GPU)"


@dataclasses.dataclass
class PartyEpoch:
    """One process's cost over the measured epoch."""

    bytes_total: float
    bytes_split: float  # to/from the server (not the aggregator)
    compute_s: float
    wall_s: float
    peak_mb: float | None
    sent_by_type: dict
    received_by_type: dict
    loss_s_per_round: float | None = None  # a client's head + loss compute per round, over the whole run


def _window(records: list[dict], warmup: int) -> tuple[dict, dict]:
    """(record closing the warm-up or zeros, last record) among the round-like records."""
    zero = {"total_sent": 0, "total_received": 0, "compute_total_s": 0.0, "t": None,
            "sent_by_type": {}, "received_by_type": {}}
    before = [r for r in records if r.get("round", -1) < warmup]
    return (before[-1] if before and warmup > 0 else zero), records[-1]


def _delta_types(end: dict, start: dict, key: str) -> dict:
    a, b = end.get(key, {}), start.get(key, {})
    return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}


def party_epoch(path: Path, warmup: int, device: str) -> PartyEpoch | None:
    """The epoch of one worker from its metrics file (None when it has no round records)."""
    if not path.is_file():
        return None
    recs = read_jsonl(path)
    rounds = [r for r in recs if r.get("event") in ("round", "aggregation") and "total_sent" in r]
    final = next((r for r in reversed(recs) if r.get("event") == "final"), {})
    if not rounds:
        return None
    start, end = _window(rounds, warmup)
    sent, recv = _delta_types(end, start, "sent_by_type"), _delta_types(end, start, "received_by_type")
    split = sum(v for d in (sent, recv) for k, v in d.items() if not k.startswith("agg."))
    t0 = start["t"] or 0.0  # without warm-up the window starts at process start (model loading included)
    peak = final.get("cuda_peak_mb") if device == "cuda" and final.get("cuda_peak_mb") else final.get("peak_rss_mb")
    n_loss = final.get("compute_n", {}).get("loss")
    return PartyEpoch(loss_s_per_round=final["compute_s"]["loss"] / n_loss if n_loss else None,
                      bytes_total=(end["total_sent"] + end["total_received"])
                      - (start["total_sent"] + start["total_received"]),
                      bytes_split=split, compute_s=end["compute_total_s"] - start["compute_total_s"],
                      wall_s=end["t"] - t0, peak_mb=peak, sent_by_type=sent, received_by_type=recv)


def paper_accounting_bytes(server_rounds: list[dict], warmup: int, hidden: int) -> float:
    """The paper's LESFT communication for the same rounds: fp32 activations of both paths
    up, fp32 gradients of both paths down, int64 labels of both paths."""
    tokens = sum(r.get("act_tokens", 0) + r.get("ref_tokens", 0) for r in server_rounds if r["round"] >= warmup)
    return tokens * (4 * hidden * 2 + 8)


def measure(run_dir: Path, method: str, warmup: int, hidden: int, device: str, clients: int) -> dict:
    """One row of the table from a finished run folder."""
    m = get_method(method)
    cl = [p for i in range(clients) if (p := party_epoch(run_dir / f"client-{i}.jsonl", warmup, "cpu"))]
    sv = party_epoch(run_dir / "server-0.jsonl", warmup, device)
    ag = party_epoch(run_dir / "aggregator-0.jsonl", warmup, "cpu")
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    row: dict = {"method": method, "label": m.label}
    if m.centralized:
        row.update(mem_client_mb=None, comm_client_mb=None, lat_client_s=None)
    else:
        row.update(mem_client_mb=mean([p.peak_mb for p in cl if p.peak_mb]),
                   comm_client_mb=sum(p.bytes_total for p in cl) / MB,
                   lat_client_s=mean([p.compute_s for p in cl]))
    if m.split or m.centralized:
        row.update(mem_server_mb=sv.peak_mb if sv else None, lat_server_s=sv.compute_s if sv else None,
                   comm_server_mb=(sv.bytes_total / MB) if sv and m.split else None)
    else:  # fedavg: the aggregator is the only other party
        row.update(mem_server_mb=ag.peak_mb if ag else None, lat_server_s=ag.compute_s if ag else None,
                   comm_server_mb=(ag.bytes_total / MB) if ag else None)
    row["comm_split_mb"] = sum(p.bytes_split for p in cl) / MB if cl else None
    row["comm_aggregator_mb"] = ag.bytes_total / MB if ag else None
    walls = [p.wall_s for p in cl] + ([sv.wall_s] if sv else [])
    row["wall_epoch_s"] = max(walls) if walls else None
    if sv is not None:
        rounds = [r for r in read_jsonl(run_dir / "server-0.jsonl") if r.get("event") == "round"]
        losses = epoch_losses(run_dir, [r for r in rounds if r["round"] >= warmup], clients)
        row["final_loss"] = losses[-1] if losses else None
        row["epoch_loss"] = sum(losses) / len(losses) if losses else None
        if m.split:
            row["paper_comm_mb"] = paper_accounting_bytes(rounds, warmup, hidden) / MB if m.loss == "lesft" else None
            fwd = sum(p.sent_by_type.get("forward", 0) for p in cl)
            bwd = sum(p.received_by_type.get("backward", 0) for p in cl)
            row["forward_mb"], row["backward_mb"] = fwd / MB, bwd / MB
            row.update(split_directions(cl))
    return row


def epoch_losses(run_dir: Path, server_epoch: list[dict], clients: int) -> list[float]:
    """The loss of each round of the epoch: the server's, or in a label-private run (where only
    the clients know it) the mean of the clients' losses of that round."""
    if all(isinstance(r.get("loss"), (int, float)) for r in server_epoch):
        return [r["loss"] for r in server_epoch]
    by_round: dict[int, list[float]] = {}
    for i in range(clients):
        for rec in read_jsonl(run_dir / f"client-{i}.jsonl"):
            if rec.get("event") == "round" and isinstance(rec.get("loss"), (int, float)):
                by_round.setdefault(rec["round"], []).append(rec["loss"])
    return [sum(v) / len(v) for n, v in sorted(by_round.items()) if n >= server_epoch[0]["round"]] if server_epoch \
        else []


def split_directions(clients: Sequence[PartyEpoch]) -> dict:
    """The client<->server traffic of the epoch per direction (clients summed), the label-private
    exchange's own messages (HIDDEN down, HEAD_GRAD up), round trips per round, and the clients'
    head + loss compute per round (the server's, in a standard run)."""
    def total(by: str, kinds: tuple[str, ...] | None = None) -> float:
        return sum(v for p in clients for k, v in getattr(p, by).items()
                   if not k.startswith("agg.") and (kinds is None or k in kinds)) / MB

    hidden = total("received_by_type", ("hidden",))
    heads = [p.loss_s_per_round for p in clients if p.loss_s_per_round is not None]
    return {"up_mb": total("sent_by_type"), "down_mb": total("received_by_type"), "hidden_mb": hidden,
            "head_grad_mb": total("sent_by_type", ("head_grad",)), "round_trips": 2 if hidden else 1,
            "client_loss_s": sum(heads) / len(heads) if heads else None}


def run_method(cfg: Config, method: str, warmup: int, out_dir: Path, wire_dtype: str, timeout_s: float,
               tag: str = "", label_private: bool = False, tail_layers: int = 0) -> Path:
    per_epoch = rounds_per_epoch(cfg.data.samples_per_client, cfg.train.batch_size)
    run_id = f"{method}{tag}"
    c = cfg.replace(method=method, rounds=warmup + per_epoch, run_id=run_id, runs_dir=str(out_dir / "runs"),
                    wire_dtype=wire_dtype, label_private=label_private, client_tail_layers=tail_layers)
    launch(c, timeout_s=timeout_s)
    return out_dir / "runs" / run_id


def targets(rows: Sequence[dict]) -> list[dict]:
    """The issue's targets, each from figures of this run (missing rows: skipped)."""
    by = {r["row"]: r for r in rows}
    out = []
    lb, lf, sl, ce = by.get("lesft@bf16"), by.get("lesft@fp32"), by.get("splitlora@fp32"), by.get("centralized@fp32")
    if lb and lb.get("paper_comm_mb"):
        out.append({"target": "LESFT bf16 communication / paper accounting <= 0.40",
                    "value": lb["comm_split_mb"] / lb["paper_comm_mb"], "limit": 0.40})
    if lb and sl:
        out.append({"target": "LESFT bf16 communication / SplitLoRA fp32 communication <= 1.0",
                    "value": lb["comm_split_mb"] / sl["comm_split_mb"], "limit": 1.0})
    if lb and lf and lf.get("final_loss"):
        out.append({"target": "|final loss bf16 - fp32| / fp32 < 0.01 (LESFT, one epoch)",
                    "value": abs(lb["final_loss"] - lf["final_loss"]) / abs(lf["final_loss"]), "limit": 0.01})
    lesft = lf or lb
    if lesft and ce and ce.get("mem_server_mb") and lesft.get("mem_client_mb"):
        out.append({"target": "LESFT client peak memory / centralized peak <= 0.45",
                    "value": lesft["mem_client_mb"] / ce["mem_server_mb"], "limit": 0.45})
    for t in out:
        t["met"] = t["value"] <= t["limit"] if t["limit"] != 0.01 else t["value"] < t["limit"]
    return out


def plot(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Bar charts of memory, communication and latency per method and party; ``title``
    names the model and the setting (the legend sits below the bars, never over one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["row"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (panel, keys) in zip(axes, (("peak memory (MB)", ("mem_client_mb", "mem_server_mb")),
                                        ("communication per epoch (MB)", ("comm_client_mb", "comm_server_mb")),
                                        ("compute per epoch (s)", ("lat_client_s", "lat_server_s")))):
        width = 0.4
        for j, (key, party) in enumerate(zip(keys, ("client", "server"))):
            vals = [r.get(key) or 0.0 for r in rows]
            ax.bar([i + (j - 0.5) * width for i in range(len(rows))], vals, width, label=party)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(panel)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- command

COLUMNS = [Column("label", "framework"), Column("mem_client_mb", "mem client MB", ".0f"),
           Column("mem_server_mb", "mem server MB", ".0f"), Column("comm_client_mb", "comm client MB", ".2f"),
           Column("comm_server_mb", "comm server MB", ".2f"),
           Column("comm_split_mb", "of which client<->server MB", ".2f"),
           Column("lat_client_s", "latency client s", ".2f"), Column("lat_server_s", "latency server s", ".2f"),
           Column("wall_epoch_s", "wall/epoch s", ".1f"), Column("paper_comm_mb", "paper acct. MB", ".2f")]
# with --label-private: what the label-private exchange costs beside the standard rows
PRIVATE_COLUMNS = [Column("label", "framework"), Column("round_trips", "round trips", "d"),
                   Column("up_mb", "up MB", ".3f"), Column("down_mb", "down MB", ".3f"),
                   Column("hidden_mb", "of which hidden MB", ".3f"), Column("head_grad_mb", "of which dL/dH MB", ".3f"),
                   Column("mem_client_mb", "mem client MB", ".0f"), Column("client_loss_s", "client head+loss s/round", ".4f"),
                   Column("lat_client_s", "latency client s", ".2f"), Column("wall_epoch_s", "wall/epoch s", ".1f")]


@bench_command("overhead", kind="paper", order=3)
def overhead_command(
    methods: str = typer.Option(",".join(METHODS), "--methods", help="methods to run, comma-separated"),
    wire_dtypes: str = typer.Option("fp32,bf16", "--wire-dtypes",
                                    help="wire dtypes for LESFT (baselines use the first); fp32,bf16 gives both rows"),
    warmup: int = typer.Option(2, "--warmup", help="rounds before the measured epoch"),
    timeout: float = typer.Option(3600, "--timeout", help="seconds allowed per method run"),
    draw: bool = typer.Option(True, "--plot/--no-plot", help="write a PNG bar chart"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder"),
    *, cfg: Config) -> None:
    """Table 2: per-epoch memory, communication and latency per party, each method as real processes."""
    from lesft.engine import resolve_device  # here: lesft.engine loads transformers
    from lesft.models import source_for

    names = parse_methods(methods, METHODS)
    dtypes = [d.strip() for d in wire_dtypes.split(",") if d.strip()]
    if warmup < 1:
        raise BenchError("--warmup must be >= 1: the epoch window starts at the end of the warm-up.")
    out_dir = make_out_dir(out, "overhead", cfg.run.runs_dir)
    source = source_for(cfg)
    device = resolve_device(cfg.train.device).type
    hidden = int(source.config.hidden_size)
    rows = []
    plan = [(m, dtypes[0]) for m in names if m != "lesft"] + ([("lesft", d) for d in dtypes] if "lesft" in names else [])
    plan = [(m, dt, False) for m, dt in plan]
    cfg_private = cfg.model.label_private
    if cfg_private:  # beside every split method's standard row
        plan += [(m, dt, True) for m, dt, _ in plan if get_method(m).split]
    tail = cfg.model.client_tail_layers  # the label-private runs of methods whose client trains keep them
    cfg = cfg.replace(label_private=False, client_tail_layers=0)  # each run says its own; the baselines refuse it
    for i, (m, dt, lp) in enumerate(plan):
        tail_layers = tail if lp and get_method(m).client_trains else 0
        what = f"{dt} wire{', label-private' if lp else ''}{f', {tail_layers} tail layers' if tail_layers else ''}"
        console.print(f"[bold]{i + 1}/{len(plan)}[/] {get_method(m).label} ({what}) on {source.label} ...")
        run_dir = run_method(cfg, m, warmup, out_dir, dt, timeout, tag=f"-{dt}" + ("-private" if lp else ""),
                             label_private=lp, tail_layers=tail_layers)
        row = measure(run_dir, m, warmup, hidden, device, cfg.data.clients)
        row.update(row=f"{m}@{dt}" + ("+private" if lp else ""), wire_dtype=dt if get_method(m).split else "-",
                   run_dir=str(run_dir), label_private=lp)
        if m == "lesft" and len(dtypes) > 1:
            row["label"] += f" [{dt}]"
        if lp:
            row["label"] += f" [label-private, tail {tail_layers}]" if tail_layers else " [label-private]"
        rows.append(row)
    info = machine_info()
    title = (f"Table 2 on {source.label}: {cfg.data.clients} clients x {cfg.data.samples_per_client} samples, "
             f"one epoch after {warmup} warm-up rounds ({MEM_HELP}; N/A = not applicable)")
    print_table(rich_table(rows, COLUMNS, title=title))
    private_title = "label-private rows beside the standard ones (client<->server traffic per epoch, clients summed)"
    split_rows = [r for r in rows if get_method(r["method"]).split] if cfg_private else []
    if split_rows:
        print_table(rich_table(split_rows, PRIVATE_COLUMNS, title=private_title))
    tg = targets(rows)
    print_targets(tg)
    notes = random_note(cfg) + link_note(cfg) + [
        MEM_HELP, "comm client = all clients' bytes sent+received in the epoch (summed), "
        "aggregator traffic included; 'of which client<->server' leaves it out; "
        "latency = compute seconds of the party in the epoch (mean over clients); "
        "fedavg's server columns are the aggregator's", machine_line(info)] + \
        [f"target {target_note(t)}" for t in tg]
    write_results(out_dir, "overhead", rows, {"settings": cfg.to_dict(), "warmup": warmup, "targets": tg,
                                              "random_weights": source.random_weights},
                  COLUMNS, title=title, notes=notes, machine=info)
    if split_rows:
        write_results(out_dir, "overhead-private", split_rows, {"settings": cfg.to_dict(), "warmup": warmup},
                      PRIVATE_COLUMNS, title=private_title, notes=notes, machine=info)
    if draw:
        plot(rows, out_dir / "overhead.png", title=f"lesft bench overhead on {source.label}: {cfg.data.clients} "
             f"clients x {cfg.data.samples_per_client} samples, one epoch")
    console.print(f"results in {out_dir}")
