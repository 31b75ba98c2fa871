"""``lesft bench microbatch``: what the server gains by batching clients' requests.

The server of a round receives one FORWARD per client. It can run them as ONE
:meth:`lesft.engine.ServerParty.process` call (the microbatch: rows concatenated and
right-padded to the widest) or one call per client. This bench builds the rows once,
with :meth:`lesft.engine.ClientParty.forward` of N virtual clients on real data (so
lengths, padding and the reference path are those of a run), then times, for each N of
``--clients-list``, both ways on the same rows, sampled in turn (batched, sequential,
batched, ...). Between calls the adapter gradients are reset (``zero_grad``); the
optimiser never steps, so every call sees the same weights.

Reported per N: seconds per round both ways, the ratio batched / sequential (the
target: <= 0.6 at N = 8 on a CPU), tokens/s both ways (real tokens of both paths
through the server's layers), the padding the microbatch adds, and the server's phase
split (forward / loss / backward, from its Meter; CPU only, where it is exact).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import typer

from bench.common import (BenchError, Column, bench_command, console, machine_info, make_out_dir, print_files,
                          print_table, print_targets, ratio, rich_table, summarize, sync, target_note, time_interleaved,
                          write_results)
from lesft.config import Config
from lesft.methods import METHODS

TARGET_CLIENTS = 8
TARGET_RATIO = 0.6
PHASES = ("forward", "loss", "backward")
SPLIT_METHODS = ", ".join(m.name for m in METHODS.values() if m.split)


def parse_clients(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]`` (positive, de-duplicated, sorted)."""
    try:
        out = sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise BenchError(f"--clients-list {text!r} is not a list of positive integers: write e.g. 1,2,4,8.")
    return out


@dataclass
class MicrobatchSettings:
    clients_list: list[int]
    repeat: int = 3
    warmup: int = 1
    profile: bool = False
    profile_rows: int = 25


@dataclass
class Workload:
    """The rows of N virtual clients' round 0, built once on the clients' side."""

    rows: list  # list[lesft.batching.Rows], one per client
    want_grad: bool
    build_s: float = 0.0
    info: dict = field(default_factory=dict)


def build_workload(cfg, n_clients: int, source=None, progress: Callable[[str], None] | None = None) -> Workload:
    """Round-0 rows of ``n_clients`` virtual clients (their own data shards, their own
    LoRA) exactly as the in-process trainer would send them to the server."""
    import time

    from lesft.engine import ClientParty
    from lesft.methods import get_method
    from lesft.models import resolve
    from lesft.trainer import client_shards, party_layout

    method = get_method(cfg.train.method)
    if not method.split:
        raise BenchError(f"--method {method.name} has no server (each client holds the whole model): "
                         f"benchmark a split method ({SPLIT_METHODS}).")
    t0 = time.perf_counter()
    ccfg = cfg.replace(clients=n_clients)
    source = source or resolve(ccfg.model.model, ccfg.model.cache_dir or None, seed=ccfg.train.seed)
    tok = source.load_tokenizer()
    shards, batch_size = party_layout(method, ccfg, client_shards(ccfg))
    rows = []
    for i, shard in enumerate(shards):
        if progress:
            progress(f"client {i + 1}/{len(shards)} forward")
        party = ClientParty(ccfg, source, method, i, shard, tok, batch_size=batch_size)
        r = party.forward(0)
        party.pending.clear()  # the client's graph is not needed: only the server is timed
        rows.append(r)
        del party
    return Workload(rows, method.client_trains, time.perf_counter() - t0,
                    {"model": source.label, "method": method.name, "batch_size": batch_size,
                     "n_layers": source.n_layers, "hidden": int(source.config.hidden_size)})


def _tokens(rows: Sequence, max_padding: float = 1.0) -> dict[str, int]:
    """Real and padded tokens of these parts, both ways of running them (the batched way
    padded within the groups the server forms, see :func:`lesft.batching.padding_groups`)."""
    from lesft.batching import padding_groups

    def padded(group: Sequence, path: str) -> int:
        acts = [getattr(r, path) for r in group]
        return 0 if acts[0] is None else sum(a.shape[0] for a in acts) * max(a.shape[1] for a in acts)

    groups = [[rows[i] for i in g] for g in padding_groups(rows, max_padding)]
    real = sum(int(r.lengths.sum()) for r in rows)
    if rows[0].ref_act is not None:
        real += sum(int(r.ref_lengths.sum()) for r in rows)
    return {"tokens": real, "targets": sum(int(r.y_len.sum()) for r in rows), "groups": len(groups),
            "padded_sequential": sum(padded([r], p) for r in rows for p in ("act", "ref_act")),
            "padded_batched": sum(padded(g, p) for g in groups for p in ("act", "ref_act"))}


class _Timed:
    """A server call plus the reset after it, accumulating the Meter's phase seconds."""

    def __init__(self, party, parts: Sequence, want_grad: bool, batched: bool) -> None:
        self.party, self.parts, self.want_grad, self.batched = party, list(parts), want_grad, batched
        self.phase_s = {p: 0.0 for p in PHASES}
        self.calls = 0

    def __call__(self) -> None:
        m = self.party.meter
        before = {p: m.compute_s.get(p, 0.0) for p in PHASES}
        if self.batched:
            self.party.process(self.parts, self.want_grad)
        else:
            for p in self.parts:
                self.party.process([p], self.want_grad)
        for p in PHASES:
            self.phase_s[p] += m.compute_s.get(p, 0.0) - before[p]
        self.calls += 1
        self.reset()

    def reset(self) -> None:
        self.party.optimizer.zero_grad(set_to_none=True)
        self.party.window_rows = 0

    def clear(self) -> None:
        self.phase_s = {p: 0.0 for p in PHASES}
        self.calls = 0

    def phases(self) -> dict[str, float]:
        return {p: s / max(self.calls, 1) for p, s in self.phase_s.items()}


def measure_clients(party, work: Workload, n: int, repeat: int, warmup: int) -> dict:
    """One row: N clients' round, batched vs one at a time, on the same rows."""
    parts = work.rows[:n]
    batched = _Timed(party, parts, work.want_grad, batched=True)
    sequential = _Timed(party, parts, work.want_grad, batched=False)
    for _ in range(warmup):
        batched()
        sequential()
    for t in (batched, sequential):
        t.clear()  # phase seconds of the timed calls only
    times = time_interleaved({"batched": batched, "sequential": sequential}, repeat, 0.0, 0,
                             device=party.device)
    b, s = summarize(times["batched"]), summarize(times["sequential"])
    tok = _tokens(parts, party.cfg.net.microbatch_max_padding)
    row = {
        "clients": n, "rows": sum(len(p) for p in parts), "groups": tok["groups"], "tokens": tok["tokens"],
        "target_tokens": tok["targets"],
        "batched_s": b["median_s"], "sequential_s": s["median_s"],
        "ratio": ratio(b["median_s"], s["median_s"]), "speedup": ratio(s["median_s"], b["median_s"]),
        "batched_tokens_per_s": tok["tokens"] / b["median_s"],
        "sequential_tokens_per_s": tok["tokens"] / s["median_s"],
        "padded_tokens_batched": tok["padded_batched"], "padded_tokens_sequential": tok["padded_sequential"],
        "pad_waste": 1.0 - tok["tokens"] / tok["padded_batched"],
        "batched_spread": b["spread"], "sequential_spread": s["spread"], "samples": repeat,
    }
    if party.device.type == "cpu":
        for name, t in (("batched", batched), ("sequential", sequential)):
            for p, sec in t.phases().items():
                row[f"{name}_{p}_s"] = sec
    return row


def profile_clients(party, work: Workload, n: int, out_dir: Path, row_limit: int = 25) -> dict[str, Path]:
    """torch.profiler tables (self CPU time) of one batched and one sequential round of N
    clients, written as ``profile-<mode>-<N>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if party.device.type == "cuda" else [])
    paths = {}
    for mode in ("batched", "sequential"):
        call = _Timed(party, work.rows[:n], work.want_grad, batched=mode == "batched")
        call()  # warm
        sync(party.device)
        with profile(activities=acts) as prof:
            call()
            sync(party.device)
        sort = "self_cuda_time_total" if party.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=row_limit)
        path = out_dir / f"profile-{mode}-{n}.txt"
        path.write_text(table + "\n")
        paths[mode] = path
    return paths


def run_microbatch(cfg, settings: MicrobatchSettings, *, source=None, out_dir: Path | None = None,
                   on_case: Callable[[dict], None] | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Build the rows of ``max(clients_list)`` clients, then measure every N."""
    from lesft.engine import ServerParty
    from lesft.methods import get_method
    from lesft.models import resolve

    if not get_method(cfg.train.method).split:
        raise BenchError(f"--method {cfg.train.method} has no server (each client holds the whole model): "
                         f"benchmark a split method ({SPLIT_METHODS}).")
    source = source or resolve(cfg.model.model, cfg.model.cache_dir or None, seed=cfg.train.seed)
    work = build_workload(cfg, max(settings.clients_list), source, progress)
    if progress:
        progress("server")
    party = ServerParty(cfg, source, get_method(cfg.train.method))
    rows = []
    for n in settings.clients_list:
        if progress:
            progress(f"{n} clients")
        row = measure_clients(party, work, n, settings.repeat, settings.warmup)
        rows.append(row)
        if on_case:
            on_case(row)
    info = dict(work.info, device=str(party.device), build_s=work.build_s,
                row_lengths=[int(r.lengths.max()) for r in work.rows],
                ref_lengths=[int(r.ref_lengths.max()) for r in work.rows] if work.rows[0].ref_act is not None
                else None)
    if settings.profile and out_dir is not None:
        n = max(settings.clients_list)
        if progress:
            progress(f"profile {n} clients")
        info["profiles"] = {k: str(v) for k, v in profile_clients(party, work, n, out_dir,
                                                                  settings.profile_rows).items()}
    return rows, info


def check_targets(rows: Sequence[dict], device: str) -> list[dict]:
    out = []
    for r in rows:
        if r["clients"] == TARGET_CLIENTS:
            out.append({"target": f"{TARGET_CLIENTS} clients batched <= {TARGET_RATIO} x one at a time"
                                  f" ({device})", "value": r["ratio"], "met": r["ratio"] <= TARGET_RATIO})
    return out


def lengths_note(info: dict) -> str:
    ls = info.get("row_lengths") or []
    text = f"trained-path lengths: median {statistics.median(ls):.0f}, max {max(ls)}" if ls else ""
    rl = info.get("ref_lengths")
    if rl:
        text += f"; reference-path lengths: median {statistics.median(rl):.0f}, max {max(rl)}"
    return text


COLUMNS = [
    Column("clients"), Column("groups"), Column("tokens"),
    Column("batched_s", "batched s", ".3f"), Column("sequential_s", "one-at-a-time s", ".3f"),
    Column("ratio", "batched/seq", ".3f"), Column("speedup", "speedup", ".2f"),
    Column("batched_tokens_per_s", "batched tok/s", ",.0f"),
    Column("sequential_tokens_per_s", "seq tok/s", ",.0f"),
    Column("pad_waste", "pad waste", ".1%"),
]


# --------------------------------------------------------------------------- command


@bench_command("microbatch", kind="micro", order=2)
def microbatch_command(
    clients_list: str = typer.Option("1,2,4,8,16", "--clients-list", help="numbers of clients per round to measure"),
    repeat: int = typer.Option(3, "--repeat", help="timing samples per mode (median reported)"),
    warmup: int = typer.Option(1, "--warmup", help="untimed rounds per mode before timing"),
    profile: bool = typer.Option(False, "--profile/--no-profile",
                                 help="write torch.profiler tables of the largest N (both modes)"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder \\[default: <runs dir>/bench/microbatch-<time>]"),
    *, cfg: Config) -> None:
    """Server seconds per round: N clients' rows in ONE ServerParty.process call vs N calls."""
    from lesft.engine import set_threads  # here, as the module's other engine imports: it loads transformers

    if repeat < 1:
        raise BenchError(f"--repeat {repeat} is not valid: take at least 1 sample.")
    if warmup < 0:
        raise BenchError(f"--warmup {warmup} is not valid: it must be >= 0.")
    settings = MicrobatchSettings(parse_clients(clients_list), repeat=repeat, warmup=warmup, profile=profile)
    set_threads(cfg)
    folder = make_out_dir(out, "microbatch", cfg.run.runs_dir)
    with console.status("microbatch bench") as status:
        rows, info = run_microbatch(cfg, settings, out_dir=folder,
                                    progress=lambda text: status.update(f"microbatch bench: {text}"))
    machine = machine_info()
    targets = check_targets(rows, info["device"])
    config = {"bench": "microbatch", "clients_list": settings.clients_list, "repeat": repeat, "warmup": warmup,
              "workload": info, "targets": targets, "settings": cfg.to_dict()}
    notes = [target_note(t) for t in targets]
    notes += [f"{info['model']}, method {info['method']}, server on {info['device']}, "
              f"{info['batch_size']} row(s) per client; {lengths_note(info)}",
              "tokens = real tokens of both paths through the server; ratio = batched / one-at-a-time seconds "
              "(medians, sampled in turn); adapter grads reset between calls, no optimiser step."]
    paths = write_results(folder, "microbatch", rows, config, COLUMNS, title="lesft bench microbatch",
                          notes=notes, machine=machine)
    cfg.save(folder / "config.json")
    print_table(rich_table(rows, COLUMNS, title=f"lesft bench microbatch ({info['model']}, {info['device']})"))
    print_targets(targets)
    if info.get("profiles"):
        console.print("profiles: " + "  ".join(info["profiles"].values()), highlight=False)
    print_files(machine, paths)
