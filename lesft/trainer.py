"""The in-process reference trainer: Algorithm 1 with N virtual clients in one process.

It calls exactly what the worker processes call (``lesft.engine``), in the same order, so
the multi-process pipeline must reproduce its adapters. Virtual clients share the frozen
base weights (one copy in memory); each has its own LoRA and AdamW.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lesft import private
from lesft.aggregate import fedavg
from lesft.config import Config
from lesft.data import Example, load_examples, partition
from lesft.data.files import DataFile, client_data_path, load_data_file, local_data_paths
from lesft.engine import ClientParty, ServerParty, ServerResult
from lesft.export import final_outputs
from lesft.methods import Method, get_method
from lesft.metrics import JsonlWriter, Meter, mean_loss, merge_token_means
from lesft.models import ModelSource, source_for
from lesft.runs import RunDirError, mark_run, open_run_dir
from lesft.schedule import client_sizes, is_aggregation_round, is_step_round, total_rounds
from lesft.split import server_end, split_point


def needs_reference(cfg: Config) -> bool:
    """Whether the run trains on or weights by the reference input x~ (LESFT, dual or reference path)."""
    return get_method(cfg.train.method).loss == "lesft" and cfg.loss.paths != "base"


def load_client_data(cfg: Config, path: str, tokenizer) -> DataFile:
    """One client's own file, read whole and checked (see :mod:`lesft.data.files`)."""
    return load_data_file(path, tokenizer, fields=cfg.data.data_fields, max_length=cfg.data.max_length,
                          need_reference=needs_reference(cfg))


def client_examples(cfg: Config, client_id: int, tokenizer) -> tuple[list[Example], DataFile | None]:
    """What one client process trains on: its own file (``--data`` / ``--client-data``), or its
    shard of the built-in data. Only this client's file is opened."""
    path = client_data_path(cfg.data.data, cfg.data.client_data, client_id)
    if path is None:
        return client_shards(cfg)[client_id], None
    loaded = load_client_data(cfg, path, tokenizer)
    return loaded.examples, loaded


def local_data_files(cfg: Config, tokenizer) -> list[DataFile] | None:
    """Every client's own file of a run on this machine, all checked before anything starts."""
    paths = local_data_paths(cfg.data.data, cfg.data.client_data, cfg.data.clients)
    return None if paths is None else [load_client_data(cfg, p, tokenizer) for p in paths]


def check_local_data(cfg: Config) -> list[DataFile]:
    """Read and check every client's own file of a local run (``lesft train``); DataError on the first problem."""
    if not (cfg.data.data or cfg.data.client_data):
        return []
    return local_data_files(cfg, source_for(cfg).load_tokenizer())


def client_shards(cfg: Config, tokenizer=None) -> list[list[Example]]:
    """Each client's training examples: its own file (``--client-data``), else a seeded sample
    of the built-in train split, partitioned."""
    d = cfg.data
    if d.data or d.client_data:
        files = local_data_files(cfg, tokenizer or source_for(cfg).load_tokenizer())
        return [f.examples for f in files]
    n = d.clients * d.samples_per_client
    examples = load_examples(d.dataset, "train", data_dir=d.data_dir or None, ref_style=d.ref_style,
                             teacher_cot=d.teacher_cot or None, n=n if not d.dataset.startswith("synthetic") else max(n, 1000),
                             seed=d.data_seed)
    return partition(examples, d.clients, d.samples_per_client, scheme=d.partition, alpha=d.dirichlet_alpha,
                     seed=d.data_seed)


def preflight(cfg: Config) -> None:
    """What every party would refuse at start, checked once in this process before a
    launcher starts them (one clear line instead of a worker's log): the model (and the
    split, when the client keeps tail layers), its tokenizer, the data and its targets."""
    from lesft.batching import encode_all

    source = source_for(cfg)
    server_end(source.n_layers, split_point(source.n_layers, cfg.model.split_ratio), cfg.model.client_tail_layers)
    tok = source.load_tokenizer()
    for shard in client_shards(cfg, tok):
        encode_all(tok, shard, cfg.data.max_length)


def party_layout(method: Method, cfg: Config, shards: list[list[Example]]) -> tuple[list[list[Example]], int]:
    """Centralized SFT is one party over all data with the clients' combined batch size."""
    if method.centralized:
        return [[ex for shard in shards for ex in shard]], cfg.train.batch_size * len(shards)
    return shards, cfg.train.batch_size


def label_private_round(server: ServerParty, clients: list[ClientParty], parts: list, r: int,
                        want_grad: bool) -> ServerResult:
    """One label-private round in process, as the workers run it (:mod:`lesft.private`): the
    server's forward of the label-free rows, each client's loss and dL/dH, the server's
    backward. The result carries the clients' loss sums, the only place they exist."""
    held = private.server_forward(server, [private.without_labels(p) for p in parts], want_grad)
    outs = [private.client_loss(c, r, h, ref) for c, (h, ref) in zip(clients, held.hidden)]
    res = private.server_backward(server, held, [g for _, g in outs])
    res.loss_sums = [float(tl.rows.detach()[tl.valid].sum()) for tl, _ in outs]
    for tl, _ in outs:
        merge_token_means(res.stats, tl.stats)
    return res


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    server: dict[str, torch.Tensor] | None = None
    clients: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    wall_s: float = 0.0


def train_inprocess(cfg: Config, *, on_round: Callable[[dict, int], None] | None = None,
                    source: ModelSource | None = None, existing: str = "new") -> RunResult:
    """Run Algorithm 1 for ``cfg`` in this process; write the run folder; return adapters.

    ``existing``: what to do with a folder that already holds a run (:func:`open_run_dir`;
    ``new`` refuses it, ``overwrite`` deletes it).
    """
    t0 = time.perf_counter()
    method = get_method(cfg.train.method)
    if existing == "resume":
        raise RunDirError("the in-process trainer cannot resume a run: run the pipeline (lesft train without "
                          "--inprocess) to resume, or start again with --overwrite.")
    source = source or source_for(cfg)
    tok = source.load_tokenizer()
    shards, batch_size = party_layout(method, cfg, client_shards(cfg, tok))
    run_dir = open_run_dir(cfg, existing)
    cfg.save(run_dir / "config.json")
    meter = Meter("trainer", 0)
    clients = [ClientParty(cfg, source, method, i, shard, tok, batch_size=batch_size, meter=meter)
               for i, shard in enumerate(shards)]
    server = ServerParty(cfg, source, method, meter=meter) if method.split else None
    rounds = total_rounds(cfg, [c.n_samples for c in clients], batch_size)
    log = JsonlWriter(run_dir / "trainer-0.jsonl")
    history: list[dict] = []
    for r in range(rounds):
        last = r == rounds - 1
        if server is not None:
            parts = [c.forward(r) for c in clients]
            if cfg.model.label_private:
                res = label_private_round(server, clients, parts, r, method.client_trains)
            else:
                res = server.process(parts, want_grad=method.client_trains)
            for c, g, v in zip(clients, res.grads, res.valid_rows):
                c.backward(g, v)
            losses = [mean_loss(s, v) for s, v in zip(res.loss_sums, res.valid_rows)]
            stats = dict(res.stats, loss=mean_loss(sum(res.loss_sums), sum(res.valid_rows)))
            if is_step_round(r, rounds, cfg.train.grad_accum):
                server.step()
        else:
            outs = [c.local_step(r) for c in clients]
            losses = [float(o.loss.detach()) for o in outs]
            stats = dict(outs[0].stats, loss=sum(losses) / len(losses))
        if is_step_round(r, rounds, cfg.train.grad_accum):
            for c in clients:
                c.step()
        aggregated = method.aggregate and is_aggregation_round(r, rounds, cfg.train.aggregate_every)
        if aggregated:
            avg = fedavg([(c.adapters(), c.n_samples) for c in clients])
            for c in clients:
                c.load_adapters(avg)
        meter.sample_memory()
        record = {"event": "round", "round": r, "rounds": rounds, "client_losses": losses,
                  "aggregated": aggregated, "wall_s": time.perf_counter() - t0, **stats}
        history.append(record)
        log.write(record)
        if on_round:
            on_round(record, rounds)
    server_ad = server.adapters() if server is not None else None
    if method.aggregate or method.centralized:
        client_ad = {-1: clients[0].adapters()}
    elif method.client_trains:
        client_ad = {c.client_id: c.adapters() for c in clients}
    else:
        client_ad = {}
    final_outputs(run_dir, cfg, source, method, server_ad, client_ad)
    wall = time.perf_counter() - t0
    log.write({"event": "final", **meter.snapshot(), "rounds": rounds, "wall_s": wall,
               **client_sizes({c.client_id: c.n_samples for c in clients}, batch_size, rounds)})
    log.close()
    mark_run(run_dir, complete=True, rounds=rounds)
    return RunResult(run_dir, history, server_ad, client_ad, wall)
