"""Run summaries: what a finished run folder says about itself, printed as rich tables."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lesft.metrics import read_jsonl, summarize_run


def round_records(run_dir: Path) -> list[dict]:
    """Per-round records of the party that computes the loss (trainer or server)."""
    for name in ("trainer-0.jsonl", "server-0.jsonl"):
        path = run_dir / name
        if path.is_file():
            return [r for r in read_jsonl(path) if r.get("event") == "round"]
    return []


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
            "by_role": workers["by_role"], "config": config,
            "adapter": str(run_dir / "adapter") if (run_dir / "adapter").is_dir() else None}


def print_run_summary(run_dir: str | Path, console: Console, extra_rows: list[tuple[str, str]] | None = None) -> dict:
    s = run_summary(run_dir)
    table = Table(title=f"run {Path(run_dir).name}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    method = s["config"].get("train", {}).get("method", "?")
    model = s["config"].get("model", {}).get("model", "?")
    table.add_row("method / model", f"{method} / {model}")
    table.add_row("rounds", str(s["rounds"]))
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
        table.add_row(k, v)
    table.add_row("outputs", str(run_dir))
    console.print(table)
    return s
