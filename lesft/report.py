"""Run summaries: what a finished run folder says about itself, printed as rich tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lesft.metrics import read_jsonl, summarize_run


def round_records(run_dir: Path) -> list[dict]:
    """Per-round records of the party that computes the loss (trainer or server); without
    one (``fedavg`` as processes: each client trains alone) the clients' mean loss per round."""
    for name in ("trainer-0.jsonl", "server-0.jsonl"):
        path = run_dir / name
        if path.is_file():
            return [r for r in read_jsonl(path) if r.get("event") == "round"]
    by_round: dict[int, list[dict]] = {}
    for path in sorted(run_dir.glob("client-*.jsonl")):
        for r in read_jsonl(path):
            if r.get("event") == "round" and isinstance(r.get("round"), int):
                by_round.setdefault(r["round"], []).append(r)
    out = []
    for rnd in sorted(by_round):
        recs = by_round[rnd]
        losses = [r["loss"] for r in recs if isinstance(r.get("loss"), (int, float))]
        out.append({"round": rnd, "rounds": recs[0].get("rounds"), "clients": len(recs),
                    "loss": sum(losses) / len(losses) if losses else None})
    return out


def run_status(run_dir: Path) -> str:
    """``complete``, or why not: interrupted at round k of n, or no completion marker."""
    from lesft.runs import COMPLETE_FILE, INTERRUPTED_FILE

    if (run_dir / COMPLETE_FILE).is_file():
        return "complete"
    if (run_dir / INTERRUPTED_FILE).is_file():
        try:
            m = json.loads((run_dir / INTERRUPTED_FILE).read_text())
            if not m.get("rounds"):
                return "incomplete: interrupted before the first round"
            return f"incomplete: interrupted at round {m.get('round')} of {m.get('rounds')}"
        except (OSError, ValueError):
            return "incomplete: interrupted"
    if (run_dir / "adapter").is_dir():
        return "complete"  # a run written before completion markers existed
    return "incomplete: still running, or stopped before the end (see its logs)"


def plot_losses(run_dir: Path, records: list[dict], heldout: dict[str, float] | None = None) -> Path | None:
    """``loss.png``: the per-round training loss (and the batch target NLL where logged), and
    the held-out target NLL before/after fine-tuning where the summary measured it."""
    losses = [(r["round"] + 1, r["loss"]) for r in records
              if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("round"), int)]
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*losses), label="training loss", lw=1.2)
    nll = [(r["round"] + 1, r["nll"]) for r in records if isinstance(r.get("nll"), (int, float))
           and isinstance(r.get("round"), int)]
    if nll:
        ax.plot(*zip(*nll), label="target NLL of the training batch", lw=1.0, alpha=0.7)
    if heldout:
        ax.plot([0, losses[-1][0]], [heldout["before"], heldout["after"]], "o--", color="black",
                label="held-out target NLL (before -> after)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss / NLL")
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    ax.set_title(f"run {run_dir.name}: {config.get('train', {}).get('method', '?')} on "
                 f"{config.get('model', {}).get('model', '?')}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curve(records: list[dict]) -> tuple[float, float] | None:
    """Mean loss of the first and of the last quarter of the rounds."""
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    if not losses:
        return None
    q = max(1, len(losses) // 4)
    return sum(losses[:q]) / q, sum(losses[-q:]) / q


def run_summary(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    records = round_records(run_dir)
    workers = summarize_run(run_dir) if run_dir.is_dir() else {"workers": {}, "by_role": {}}
    wall = max([w.get("wall_s") or 0.0 for w in workers["workers"].values()] or [0.0])
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    return {"run_dir": str(run_dir), "rounds": len(records), "loss_curve": loss_curve(records), "wall_s": wall,
            "by_role": workers["by_role"], "config": config, "status": run_status(run_dir), "records": records,
            "adapter": str(run_dir / "adapter") if (run_dir / "adapter").is_dir() else None}


class RoundProgress:
    """Training progress on the console: a live bar on a terminal; otherwise (a log file, a
    pipe) one plain line per round, so ``lesft train ... > log`` can be followed."""

    def __init__(self, console: Console, description: str) -> None:
        self.console, self.description = console, description
        self.live = console.is_terminal
        self.shown = 0
        self.t0 = time.monotonic()
        self.progress = None

    def __enter__(self) -> "RoundProgress":
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=self.console)
            self.progress.__enter__()
            self.task = self.progress.add_task(self.description, total=None, loss="-")
        else:
            self.console.print(f"{self.description}: starting", highlight=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, records: list[dict]) -> None:
        """Show the rounds of ``records`` (all round records so far) not shown yet."""
        if not records or len(records) == self.shown:
            return
        last = records[-1]
        total = last.get("rounds")
        loss = last.get("loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        if self.progress is not None:
            self.progress.update(self.task, total=total, completed=len(records), loss=loss_text)
        else:
            for rec in records[self.shown:]:
                value = rec.get("loss")
                self.console.print(f"{self.description}: round {rec.get('round', 0) + 1}/{total or '?'} "
                                   f"loss {value:.4f} ({time.monotonic() - self.t0:.0f} s)"
                                   if isinstance(value, (int, float)) else
                                   f"{self.description}: round {rec.get('round', 0) + 1}/{total or '?'}",
                                   highlight=False)
        self.shown = len(records)


class EvalProgress:
    """Progress of an evaluation: a bar on a terminal, else a line every ~10% of the questions."""

    def __init__(self, console: Console, description: str) -> None:
        self.console, self.description, self.progress, self.step = console, description, None, 0  # step: last shown

    def __enter__(self) -> "EvalProgress":
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("correct {task.fields[correct]}"), TimeElapsedColumn(),
                                     console=self.console)
            self.progress.__enter__()
            self.task = self.progress.add_task(self.description, total=None, correct=0)
        else:
            self.console.print(f"{self.description}: loading the model", highlight=False)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, done: int, total: int, correct: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, total=total, completed=done, correct=correct)
            return
        step = max(1, total // 10)
        if done != self.step and (done >= total or done // step > self.step // step):
            self.step = done
            self.console.print(f"{self.description}: {done}/{total} questions, {correct} correct "
                               f"({time.monotonic() - self.t0:.0f} s)", highlight=False)


def print_run_summary(run_dir: str | Path, console: Console, extra_rows: list[tuple[str, str]] | None = None,
                      heldout: dict[str, float] | None = None) -> dict:
    """Print the run's table and write its ``loss.png`` (``heldout``: before/after NLL)."""
    s = run_summary(run_dir)
    table = Table(title=escape(f"run {Path(run_dir).name}"), show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    method = s["config"].get("train", {}).get("method", "?")
    model = s["config"].get("model", {}).get("model", "?")
    table.add_row("method / model", escape(f"{method} / {model}"))
    table.add_row("status", s["status"] if s["status"] == "complete" else f"[yellow]{escape(s['status'])}[/]")
    rounds = s["records"][-1].get("rounds") if s["records"] else None
    table.add_row("rounds", f"{s['rounds']}" + (f" of {rounds}" if rounds and rounds != s["rounds"] else ""))
    if s["loss_curve"]:
        a, b = s["loss_curve"]
        table.add_row("loss (first quarter -> last quarter)", f"{a:.4f} -> {b:.4f}")
    for role, r in sorted(s["by_role"].items()):
        if r.get("bytes_sent") or r.get("bytes_received"):
            table.add_row(f"bytes {role} (x{r['n']}) sent / received",
                          f"{r['bytes_sent'] / 2**20:.2f} MB / {r['bytes_received'] / 2**20:.2f} MB")
        if r.get("peak_rss_mb_max"):
            table.add_row(f"peak RSS {role}", f"{r['peak_rss_mb_max']:.0f} MB")
    table.add_row("wall time", f"{s['wall_s']:.1f} s")
    for k, v in extra_rows or []:
        table.add_row(escape(k), escape(v))
    try:
        plot = plot_losses(Path(run_dir), s["records"], heldout)
    except OSError as e:  # a read-only run folder still gets its summary
        plot, s["plot_error"] = None, str(e)
    if plot is not None:
        table.add_row("loss curve", escape(str(plot)))
    table.add_row("outputs", escape(str(run_dir)))
    console.print(table)
    return s
