"""The in-process reference trainer: Algorithm 1 with N virtual clients in one process.

It calls exactly what the worker processes call (``lesft.engine``), in the same order, so
the multi-process pipeline must reproduce its adapters. Virtual clients share the frozen
base weights (one copy in memory); each has its own LoRA and AdamW.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lesft import lora
from lesft.aggregate import fedavg
from lesft.config import Config
from lesft.data import Example, load_examples, partition
from lesft.data.files import DataFile, client_data_path, load_data_file, local_data_paths
from lesft.engine import ClientParty, ServerParty, is_aggregation_round, is_step_round, mean_loss, total_rounds
from lesft.methods import Method, get_method
from lesft.metrics import JsonlWriter, Meter
from lesft.models import ModelSource, source_for
from lesft.split import split_point


COMPLETE_FILE = "run-complete.json"
INTERRUPTED_FILE = "run-interrupted.json"


class RunDirError(ValueError):
    """A run folder that must not be written into as asked (it holds another run)."""


def run_state(path: Path) -> str:
    """``finished`` (a completion marker, or the combined adapter of an older run),
    ``unfinished`` (files but no marker: running, interrupted or failed) or ``empty``."""
    if (path / COMPLETE_FILE).is_file() or (path / "adapter").is_dir():
        return "finished"
    if path.is_dir() and any(path.iterdir()):
        return "unfinished"
    return "empty"


def open_run_dir(cfg: Config, existing: str = "new", default_id: str = "") -> Path:
    """The run folder ``<runs_dir>/<run_id>``, created; the one place that decides whether a
    run may write into a folder that already holds one.

    ``existing``: ``new`` (a fresh run: refuse any folder with files), ``overwrite`` (a fresh
    run: move the old one aside and delete it first), ``resume`` (continue what is there),
    ``join`` (a worker of a running run: refuse only a finished one) or ``join-overwrite``
    (the same, but delete a finished one); ``any`` only creates it (a worker object, once
    its entry point has decided). Raises :class:`RunDirError`.
    """
    import fcntl
    import shutil

    if existing not in ("new", "overwrite", "resume", "join", "join-overwrite", "any"):
        raise ValueError(f"existing={existing!r}")
    run_id = cfg.run.run_id or default_id or time.strftime("%Y%m%d-%H%M%S")
    root = Path(cfg.run.runs_dir)
    path = root / run_id
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{run_id}.lock", "w") as lock:  # workers started together decide one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = run_state(path)
        refuse = state == "finished" if existing == "join" else (state != "empty" and existing == "new")
        clear = (state != "empty" and existing == "overwrite") or (state == "finished" and existing == "join-overwrite")
        if refuse:
            what = "a finished run" if state == "finished" else "an unfinished run (running, interrupted or failed)"
            raise RunDirError(f"{path} holds {what}: pick another --run-id, or --resume / --overwrite.")
        if clear:
            if not (path / "config.json").is_file() and state != "finished":
                raise RunDirError(f"{path} is not a lesft run folder (no config.json): not deleting it; "
                                  "pick another --run-id.")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)  # atomic: nothing ever sees half of each run
            shutil.rmtree(old, ignore_errors=True)
        if existing == "resume":
            (path / INTERRUPTED_FILE).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
    return path


def mark_run(run_dir: Path, *, complete: bool, **fields) -> Path:
    """Write the completion (or interruption) marker of a run folder (atomically)."""
    import json

    name = COMPLETE_FILE if complete else INTERRUPTED_FILE
    tmp = run_dir / f".{name}.{os.getpid()}"
    tmp.write_text(json.dumps({"time": time.time(), **fields}) + "\n")
    os.replace(tmp, run_dir / name)
    if complete:
        (run_dir / INTERRUPTED_FILE).unlink(missing_ok=True)
    return run_dir / name


def make_run_dir(cfg: Config, existing: str = "new") -> Path:
    return open_run_dir(cfg, existing)


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C or a signal; its folder is marked incomplete."""

    def __init__(self, run_dir: Path, round_: int | None, rounds: int | None) -> None:
        self.run_dir, self.round, self.rounds = Path(run_dir), round_, rounds
        where = f"round {round_} of {rounds}" if round_ is not None and rounds else "the start"
        super().__init__(f"interrupted at {where}; partial run in {self.run_dir}")


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
    launcher starts them (one clear line instead of a worker's log): the model, its
    tokenizer, the data and its targets."""
    from lesft.batching import encode_all

    source = source_for(cfg)
    tok = source.load_tokenizer()
    for shard in client_shards(cfg, tok):
        encode_all(tok, shard, cfg.data.max_length)


def party_layout(method: Method, cfg: Config, shards: list[list[Example]]) -> tuple[list[list[Example]], int]:
    """Centralized SFT is one party over all data with the clients' combined batch size."""
    if method.centralized:
        return [[ex for shard in shards for ex in shard]], cfg.train.batch_size * len(shards)
    return shards, cfg.train.batch_size


SERVER_FILE = "server-adapters.safetensors"
GLOBAL_CLIENT_FILE = "client-adapters.safetensors"


def client_file(client_id: int) -> str:
    return f"client-{client_id}-adapters.safetensors"


def adapter_meta(cfg: Config, source: ModelSource, method: Method) -> dict:
    k = split_point(source.n_layers, cfg.model.split_ratio) if method.split else 0
    return {"method": method.name, "model": source.spec, "random_weights": source.random_weights,
            "split_ratio": cfg.model.split_ratio, "k": k, "n_layers": source.n_layers,
            "base_folder": base_model_path(source)}


def base_model_path(source: ModelSource) -> str:
    """What a PEFT adapter names as its base: the absolute local folder the run loaded (for
    the embedded model, the dequantised cache folder of ``lesft prepare``), which
    ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads offline; a random-weight
    preset has no folder and keeps its ``arch:`` name."""
    return str(Path(source.folder).resolve()) if source.folder is not None else source.spec


def combine_run(run_dir: Path, cfg: Config, source: ModelSource, method: Method) -> list[Path]:
    """Write the combined PEFT adapter(s) of a run from the per-side files in ``run_dir``.

    ``adapter/`` = server adapters + the global client adapters (aggregated methods) or
    client 0's (``sl``); with per-client adapters, ``adapter-client<i>/`` for every client.
    Both sides' files must be in ``run_dir`` (copy them there when the parties ran apart).
    """
    run_dir = Path(run_dir)
    server = lora.load_adapters(run_dir / SERVER_FILE) if (run_dir / SERVER_FILE).is_file() else {}
    clients: dict[int, dict[str, torch.Tensor]] = {}
    if (run_dir / GLOBAL_CLIENT_FILE).is_file():
        clients[-1] = lora.load_adapters(run_dir / GLOBAL_CLIENT_FILE)
    else:
        for i in range(cfg.data.clients):
            if (run_dir / client_file(i)).is_file():
                clients[i] = lora.load_adapters(run_dir / client_file(i))
    if method.split and not server:
        raise lora.AdapterError(f"{run_dir / SERVER_FILE} is missing: the server has not finished this run.")
    if method.client_trains and not clients:
        raise lora.AdapterError(f"no client adapters in {run_dir}: the clients or aggregator have not finished.")
    meta = adapter_meta(cfg, source, method)
    ids = sorted(clients)
    written = []
    first = clients[ids[0]] if ids else {}
    written.append(lora.save_peft_adapter({**first, **server}, cfg.lora, run_dir / "adapter",
                                          base_model=base_model_path(source),
                                          extra=meta, n_layers=source.n_layers))
    if len(ids) > 1:
        for cid in ids:
            written.append(lora.save_peft_adapter({**clients[cid], **server}, cfg.lora, run_dir / f"adapter-client{cid}",
                                                  base_model=base_model_path(source), extra=meta,
                                                  n_layers=source.n_layers))
    return written


def final_outputs(run_dir: Path, cfg: Config, source: ModelSource, method: Method,
                  server: dict[str, torch.Tensor] | None, clients: dict[int, dict[str, torch.Tensor]]) -> list[Path]:
    """Write per-side adapters (``clients`` key -1 = the global client adapters) and combine them."""
    meta = adapter_meta(cfg, source, method)
    if server is not None:
        lora.save_adapters(server, run_dir / SERVER_FILE, meta)
    for cid, adapters in clients.items():
        lora.save_adapters(adapters, run_dir / (GLOBAL_CLIENT_FILE if cid < 0 else client_file(cid)), meta)
    return combine_run(run_dir, cfg, source, method)


def client_epochs(n_samples: int, batch_size: int, rounds: int) -> float:
    """Passes over its own data a client of ``n_samples`` makes in ``rounds`` (smaller clients cycle more)."""
    from lesft.engine import rounds_per_epoch

    return rounds / rounds_per_epoch(n_samples, batch_size)


def client_sizes(sizes: dict[int, int], batch_size: int, rounds: int) -> dict:
    """Every client's ``n_samples`` and epochs, as the trainer, server and aggregator record them."""
    return {"n_samples": dict(sorted(sizes.items())),
            "epochs": {c: client_epochs(n, batch_size, rounds) for c, n in sorted(sizes.items())}}


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
    run_dir = make_run_dir(cfg, existing)
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
