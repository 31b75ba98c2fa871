"""``lesft bench load`` (or ``python -m bench.load``): many clients against one server, as real processes.

Runs ``--clients`` (default 32) clients of a tiny model (``arch:tiny-qwen2``, sequences
of at most 32 tokens, one sample per client per round) for ``--rounds`` (default 50)
through the launcher, with the broker, the server and the aggregator, and reports from
the workers' own metrics:

- **requests vs replies**: per client and in total, the FORWARD messages sent and the
  BACKWARD messages received (a request sent again after a timeout counts twice on the
  left), the difference (``lost``, must be 0) and the retries (``resent`` /
  ``reconnects`` counters of the Lazy Pirate loop);
- **server memory**: its resident set after warm-up (the round record of round
  ``--warmup``, default 5) and at its last round; "flat" means a growth under 10 % or
  under 50 MB;
- wall time and rounds per second of the training part.

Results go to ``load.json``, ``load.csv`` and ``load.md`` (see :mod:`bench.common`).
On a 2-core machine the 32 processes take most of the time just to start (each imports
torch and transformers): expect several minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from bench.common import Column, bench_command, console, machine_info, make_out_dir, rich_table, write_results
from lesft.config import build_config
from lesft.metrics import read_jsonl
from workers.launch import LaunchError, launch

FLAT_PCT = 10.0
FLAT_MB = 50.0


def load_config(clients: int, rounds: int, runs_dir: str | Path, run_id: str = "", **over: Any):
    """The load run's settings: tiny model, 32-token sequences, batch 1, ``rounds`` rounds."""
    cli = dict(model="arch:tiny-qwen2", clients=clients, rounds=rounds, samples_per_client=4, max_length=32,
               batch_size=1, runs_dir=str(runs_dir), run_id=run_id or f"load-{clients}x{rounds}")
    cli.update(over)
    return build_config(cli=cli, env={})


def client_rows(run_dir: Path, clients: int) -> list[dict]:
    """One row per client from its final metrics record: requests sent, replies received."""
    rows = []
    for i in range(clients):
        recs = [r for r in read_jsonl(run_dir / f"client-{i}.jsonl") if r.get("event") == "final"]
        final = recs[-1]
        sent, received = final["msgs_sent"].get("forward", 0), final["msgs_received"].get("backward", 0)
        counters = final.get("counters", {})
        rows.append({"client": i, "requests": sent, "replies": received, "lost": sent - received,
                     "resent": counters.get("resent.server", 0), "reconnects": counters.get("reconnects.server", 0),
                     "peak_rss_mb": round(final.get("peak_rss_mb", 0.0), 1)})
    return rows


def server_memory(run_dir: Path, warmup: int) -> dict:
    """The server's RSS at round ``warmup`` and at its last round (from its round records)."""
    rounds = [r for r in read_jsonl(run_dir / "server-0.jsonl") if r.get("event") == "round"]
    if not rounds or "rss_mb" not in rounds[-1]:
        raise ValueError(f"{run_dir / 'server-0.jsonl'} has no round records with rss_mb")
    at = next((r for r in rounds if r["round"] >= warmup), rounds[0])
    start, end = at["rss_mb"], rounds[-1]["rss_mb"]
    growth = end - start
    pct = 100.0 * growth / start if start > 0 else 0.0
    train_s = rounds[-1]["wall_s"] - rounds[0]["wall_s"]
    return {"warmup_round": at["round"], "rss_warmup_mb": start, "last_round": rounds[-1]["round"], "rss_end_mb": end,
            "rss_growth_mb": round(growth, 1), "rss_growth_pct": round(pct, 2),
            "flat": growth < FLAT_MB or pct < FLAT_PCT, "rounds": len(rounds),
            "rounds_per_s": (len(rounds) - 1) / train_s if train_s > 0 else float("nan")}


def run_load(clients: int = 32, rounds: int = 50, *, runs_dir: str | Path = "runs", warmup: int = 5,
             timeout_s: float = 3600.0, run_id: str = "", **over: Any) -> dict:
    """Launch the run, wait for it, and return ``{"clients": rows, "total": row, "server": memory,
    "run_dir", "wall_s", "returncodes"}``; raises :class:`workers.launch.LaunchError` when a worker fails."""

    cfg = load_config(clients, rounds, runs_dir, run_id, **over)
    result = launch(cfg, timeout_s=timeout_s)
    rows = client_rows(result.run_dir, clients)
    total = {"client": "total", **{k: sum(r[k] for r in rows) for k in ("requests", "replies", "lost", "resent",
                                                                         "reconnects")},
             "peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}
    return {"clients": rows, "total": total, "server": server_memory(result.run_dir, warmup),
            "run_dir": str(result.run_dir), "wall_s": result.wall_s, "returncodes": result.returncodes,
            "config": cfg.to_dict()}


COLUMNS = [Column("client"), Column("requests", "FORWARD sent"), Column("replies", "BACKWARD received"),
           Column("lost"), Column("resent"), Column("reconnects"), Column("peak_rss_mb", "peak RSS MB", ".0f")]


def summary_lines(res: dict) -> list[str]:
    t, s = res["total"], res["server"]
    return [f"{len(res['clients'])} clients x {s['rounds']} rounds in {res['wall_s']:.0f}s "
            f"({s['rounds_per_s']:.2f} rounds/s once training); run folder {res['run_dir']}",
            f"requests sent {t['requests']} = replies received {t['replies']}: messages lost {t['lost']} "
            f"(resent {t['resent']}, reconnects {t['reconnects']})",
            f"server RSS {s['rss_warmup_mb']:.1f} MB at round {s['warmup_round']} -> {s['rss_end_mb']:.1f} MB at round "
            f"{s['last_round']}: {s['rss_growth_mb']:+.1f} MB ({s['rss_growth_pct']:+.2f}%) -> "
            f"{'flat' if s['flat'] else 'GROWING'} (flat: < {FLAT_PCT:.0f}% or < {FLAT_MB:.0f} MB)"]


@bench_command("load", kind="micro", order=7, settings=False)
def load_command(clients: int = typer.Option(32, "--clients", help="client processes"),
                 rounds: int = typer.Option(50, "--rounds", help="rounds of the run"),
                 warmup: int = typer.Option(5, "--warmup", help="round whose server RSS is the baseline"),
                 runs_dir: str = typer.Option("runs", "--runs-dir", help="folder of run outputs"),
                 out: Optional[str] = typer.Option(None, "--out", help="output folder"),
                 timeout: float = typer.Option(3600, "--timeout", help="seconds allowed for the run")) -> None:
    """Many clients (tiny model) against one server: requests = replies, server memory flat."""
    folder = make_out_dir(out, "load", runs_dir)
    try:
        res = run_load(clients, rounds, runs_dir=runs_dir, warmup=warmup, timeout_s=timeout)
    except (LaunchError, ValueError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from None
    rows = res["clients"] + [res["total"]]
    notes = summary_lines(res)
    console.print(rich_table(rows, COLUMNS, title="load: requests and replies per client"))
    for line in notes:
        console.print(line, highlight=False)
    config = {"clients": clients, "rounds": rounds, "warmup": warmup, "server": res["server"],
              "total": res["total"], "wall_s": res["wall_s"], "run_dir": res["run_dir"], "lesft": res["config"]}
    paths = write_results(folder, "load", rows, config, COLUMNS, title="Load: many clients, one server", notes=notes,
                          machine=machine_info())
    console.print(f"results: {paths['md']}", highlight=False)
    raise typer.Exit(0 if res["total"]["lost"] == 0 and res["server"]["flat"] else 1)


if __name__ == "__main__":
    typer.run(load_command.callback)
