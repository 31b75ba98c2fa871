"""One dataclass tree for every setting, with the paper's defaults.

Sources, lowest to highest precedence: the defaults below, a TOML file (``--config``),
``LESFT_<FIELD>`` environment variables, then command-line flags. Every leaf field has a
unique name, so a field is addressed the same way everywhere: ``split_ratio`` is the
TOML key ``split_ratio`` (at the top level or under its group ``[model]``), the env var
``LESFT_SPLIT_RATIO`` and the flag ``--split-ratio``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lesft.atomic import atomic_write
from lesft.errors import ConfigError
from lesft.link import parse_rate
from lesft.methods import METHODS


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid: use one of {', '.join(allowed)}.")


def _positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{name}={value} is not valid: it must be {'>= 0' if zero_ok else '> 0'}.")


@dataclass
class ModelConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "model: smollm2-135m (embedded), a local HF folder, or arch:<preset> (random weights)"})
    split_ratio: float = field(default=0.25, metadata={"help": "fraction of decoder layers on the client: k = round(L * ratio)"})
    dtype: str = field(default="float32", metadata={"help": "parameter dtype of the base weights: float32|bfloat16"})
    cache_dir: str = field(default="", metadata={"help": "where the embedded model is cached (default ~/.cache/lesft)"})
    label_private: bool = field(default=False, metadata={"help": "keep the final norm, the LM head and the loss on the client: the server never receives label ids (split methods)"})
    client_tail_layers: int = field(default=0, metadata={"help": "with --label-private: the client keeps the last n decoder layers too (the server then returns its last layer's output at every position)"})

    def __post_init__(self) -> None:
        if not 0.0 < self.split_ratio < 1.0:
            raise ConfigError(f"split_ratio={self.split_ratio} is not valid: use a fraction in (0, 1), e.g. --split-ratio 0.25.")
        _positive("client_tail_layers", self.client_tail_layers, zero_ok=True)
        if self.client_tail_layers and not self.label_private:
            raise ConfigError(f"client_tail_layers={self.client_tail_layers} applies to label-private runs: add "
                              "--label-private or drop --client-tail-layers.")
        from lesft.wire import MODEL_DTYPES  # imports torch: only once a config is checked

        _one_of("dtype", self.dtype, tuple(MODEL_DTYPES))


@dataclass
class LoraSettings:
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.2, metadata={"help": "LoRA dropout"})
    lora_targets: tuple[str, ...] = field(default=("gate_proj", "up_proj", "down_proj"), metadata={"help": "comma-separated module names that get LoRA"})

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        self.lora_targets = tuple(self.lora_targets)
        if self.lora_r < 1:
            raise ConfigError(f"lora_r={self.lora_r} is not valid: the LoRA rank must be >= 1.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout} is not valid: use a value in [0, 1).")
        if not self.lora_targets:
            raise ConfigError("lora_targets is empty: name at least one module, e.g. --lora-targets gate_proj,up_proj,down_proj.")


LOSSES = ("lesft", "nlft", "kd", "smooth", "excess", "power")


@dataclass
class LossConfig:
    paths: str = field(default="dual", metadata={"help": "which inputs train: dual (LESFT), base or reference (single-path ablations)"})
    p_sal: float = field(default=0.95, metadata={"help": "salient threshold on the reference probability"})
    sim_threshold: float = field(default=0.5, metadata={"help": "cosine similarity to a salient token that makes a token sub-salient"})
    sim_vectors: str = field(default="centered", metadata={"help": "token vectors for similarity: centered|uncentered (final hidden states) or lm_head (rows of the head)"})
    gamma_salient: float = field(default=5.0, metadata={"help": "gamma_1 of eq. 16"})
    gamma_subsalient: float = field(default=0.3, metadata={"help": "gamma_2 of eq. 16"})
    gamma_irrelevant: float = field(default=0.6, metadata={"help": "gamma_3 of eq. 16"})
    gamma_nonsalient: float | None = field(default=None, metadata={"help": "set gamma_2 = gamma_3 = c (Table 3 ablation)"})
    lesft_norm: str = field(default="tokens", metadata={"help": "divide eq. 17 by the token count (tokens) or by the sum of weights (weights)"})
    lesft_nll_mix: float = field(default=0.0, metadata={"help": "add lam x the plain NLL to the LESFT loss"})
    # loss variants of method lesft (README "Loss variants"); all computed by the server from the two paths
    loss: str = field(default="lesft", metadata={"help": "loss of method lesft: lesft (eq. 16-17)|nlft|kd|smooth|excess|power"})
    sim_rule: str = field(default="paper", metadata={"help": "sub-salient rule of lesft/nlft: paper (cosine to any salient token) or nlft (NLFT's contiguous clusters)"})
    nlft_distance: float = field(default=0.4, metadata={"help": "sim_rule=nlft: a neighbour joins a cluster while its cosine distance to the running centre is > this"})
    ref_teacher: str = field(default="live", metadata={"help": "weights of the reference path (the teacher of kd/smooth/excess, the weighting path of lesft/nlft): live (the adapters being trained) or base (LoRA off, on client and server)"})
    kd_lambda: float = field(default=1.0, metadata={"help": "kd/smooth: weight of the tau^2 KL term added to the plain NLL"})
    kd_tau: float = field(default=1.0, metadata={"help": "kd/smooth: softmax temperature of teacher and student"})
    kd_topk: int = field(default=0, metadata={"help": "kd: 0 = KL over the whole vocabulary; k = over the teacher's top k tokens (renormalised)"})
    excess_lambda: float = field(default=1.0, metadata={"help": "excess: up-weight 1 + lam of a token the reference path knows best"})
    excess_clip: float = field(default=2.0, metadata={"help": "excess: log P~ - log P (nats) at which the up-weight saturates"})
    power_alpha: float = field(default=1.0, metadata={"help": "power: alpha of (1 - P^alpha)/alpha (-> 0: NLL; 1: close to DFT)"})

    def __post_init__(self) -> None:
        _one_of("paths", self.paths, ("dual", "base", "reference"))
        self._check_variant()
        _one_of("sim_vectors", self.sim_vectors, ("centered", "uncentered", "lm_head"))
        _one_of("lesft_norm", self.lesft_norm, ("tokens", "weights"))
        if not 0.0 < self.p_sal < 1.0:
            raise ConfigError(f"p_sal={self.p_sal} is not valid: use a probability in (0, 1).")
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise ConfigError(f"sim_threshold={self.sim_threshold} is not valid: a cosine similarity lies in [-1, 1].")
        _positive("lesft_nll_mix", self.lesft_nll_mix, zero_ok=True)
        for name in ("gamma_salient", "gamma_subsalient", "gamma_irrelevant"):
            _positive(name, getattr(self, name), zero_ok=True)
        if self.gamma_nonsalient is not None:
            _positive("gamma_nonsalient", self.gamma_nonsalient, zero_ok=True)

    def _check_variant(self) -> None:
        _one_of("loss", self.loss, LOSSES)
        _one_of("sim_rule", self.sim_rule, ("paper", "nlft"))
        _one_of("ref_teacher", self.ref_teacher, ("live", "base"))
        if not 0.0 <= self.nlft_distance <= 2.0:
            raise ConfigError(f"nlft_distance={self.nlft_distance} is not valid: a cosine distance lies in [0, 2].")
        for name in ("kd_lambda", "excess_lambda"):
            _positive(name, getattr(self, name), zero_ok=True)
        for name in ("kd_tau", "excess_clip", "power_alpha"):
            _positive(name, getattr(self, name))
        _positive("kd_topk", self.kd_topk, zero_ok=True)
        if self.lesft_nll_mix and self.loss != "lesft":
            raise ConfigError(f"lesft_nll_mix applies to loss=lesft only (loss={self.loss} fixes its own NLL term): "
                              "drop --lesft-nll-mix.")
        if self.loss in ("kd", "smooth", "excess") and self.paths != "dual":
            raise ConfigError(f"loss={self.loss} needs the reference path as its teacher: use --paths dual "
                              f"(single-path ablations train with lesft, nlft or power).")
        if self.ref_teacher != "live" and not self.uses_reference:
            raise ConfigError(f"ref_teacher={self.ref_teacher} sets the reference path, which loss={self.loss} with "
                              f"paths={self.paths} does not use: drop --ref-teacher or use --paths dual.")

    @property
    def uses_reference(self) -> bool:
        """Whether the client computes and sends the reference path (``power`` needs none)."""
        return self.paths == "dual" and self.loss != "power"

    @property
    def gammas(self) -> tuple[float, float, float]:
        if self.gamma_nonsalient is not None:
            return (self.gamma_salient, self.gamma_nonsalient, self.gamma_nonsalient)
        return (self.gamma_salient, self.gamma_subsalient, self.gamma_irrelevant)


@dataclass
class DataConfig:
    dataset: str = field(default="synthetic", metadata={"help": "synthetic|synthetic_easy|gsm8k|commonsenseqa|aqua_rat"})
    data_dir: str = field(default="", metadata={"help": "folder holding gsm8k/, commonsenseqa/, aqua_rat/ (default $LESFT_DATA_DIR or ../shared/datasets)"})
    clients: int = field(default=4, metadata={"help": "number of clients N"})
    samples_per_client: int = field(default=10, metadata={"help": "training examples per client"})
    partition: str = field(default="iid", metadata={"help": "iid or dirichlet (non-IID over the example kind)"})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "concentration of the non-IID Dirichlet partition"})
    ref_style: str = field(default="solution", metadata={"help": "reference input: prompt + terse solution + answer (solution) or prompt + answer (answer)"})
    teacher_cot: str = field(default="", metadata={"help": "JSONL of teacher chains to use as y (lesft data distill writes one)"})
    max_length: int = field(default=256, metadata={"help": "maximum tokens of a base or reference sequence"})
    data_seed: int = field(default=0, metadata={"help": "seed of sampling and partitioning"})
    data: str = field(default="", metadata={"help": "this client's own training file (JSON Lines, JSON or CSV; replaces --dataset), for lesft-worker --role client"})
    client_data: str = field(default="", metadata={"help": "every client's own file in a local run, {id} = the client id, e.g. 'data/client{id}.jsonl'"})
    data_fields: str = field(default="", metadata={"help": "field names of your files, e.g. prompt=q,completion=a,reference=r,final_answer=f"})

    def __post_init__(self) -> None:
        self._check_own_data()
        _one_of("dataset", self.dataset, ("synthetic", "synthetic_easy", "gsm8k", "commonsenseqa", "aqua_rat"))
        _one_of("partition", self.partition, ("iid", "dirichlet"))
        _one_of("ref_style", self.ref_style, ("solution", "answer"))
        _positive("clients", self.clients)
        _positive("samples_per_client", self.samples_per_client)
        _positive("dirichlet_alpha", self.dirichlet_alpha)
        if self.max_length < 8:
            raise ConfigError(f"max_length={self.max_length} is too small: use at least 8 tokens (default 256).")

    def _check_own_data(self) -> None:
        """The own-data settings, without touching the files (server and aggregator never open them)."""
        from lesft.data.files import parse_fields
        from lesft.data.records import DataError

        try:
            parse_fields(self.data_fields)
        except DataError as e:
            raise ConfigError(str(e)) from None
        template = self.client_data
        if template and ("{id}" not in template and self.clients > 1 or "{" in template.replace("{id}", "")):
            raise ConfigError(f"client_data={template!r} is not valid: it needs {{id}} (the client id) and no other "
                              "braces, e.g. --client-data 'data/client{id}.jsonl'.")


@dataclass
class TrainConfig:
    method: str = field(default="lesft", metadata={"help": "|".join(METHODS)})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate of the clients"})
    server_lr: float | None = field(default=None, metadata={"help": "AdamW learning rate of the server (default: lr)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=1, metadata={"help": "samples per client per round"})
    grad_accum: int = field(default=4, metadata={"help": "rounds per optimiser step"})
    epochs: int = field(default=1, metadata={"help": "passes over the largest client's data (rounds per epoch: ceil(max |D_i| / batch))"})
    rounds: int = field(default=0, metadata={"help": "total rounds (0: derived from epochs)"})
    aggregate_every: int = field(default=4, metadata={"help": "I: rounds between client adapter aggregations"})
    seed: int = field(default=0, metadata={"help": "seed of LoRA init, dropout and sampling order"})
    device: str = field(default="auto", metadata={"help": "server / trainer device: auto|cpu|cuda"})
    client_device: str = field(default="cpu", metadata={"help": "client device: cpu|cuda|auto"})
    autocast_bf16: bool = field(default=False, metadata={"help": "bf16 autocast on CUDA"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads of this process (0: torch's default)"})
    pipeline_depth: int = field(default=1, metadata={"help": "rounds a client keeps in flight inside an accumulation window (1 = lock-step); results are identical at every depth"})

    def __post_init__(self) -> None:
        _one_of("method", self.method, tuple(METHODS))
        _one_of("device", self.device, ("auto", "cpu", "cuda"))
        _one_of("client_device", self.client_device, ("auto", "cpu", "cuda"))
        _positive("lr", self.lr)
        if self.server_lr is not None:
            _positive("server_lr", self.server_lr)
        _positive("weight_decay", self.weight_decay, zero_ok=True)
        for name in ("batch_size", "grad_accum", "epochs", "aggregate_every", "pipeline_depth"):
            _positive(name, getattr(self, name))
        _positive("pipeline_depth", self.pipeline_depth)
        _positive("rounds", self.rounds, zero_ok=True)
        _positive("threads", self.threads, zero_ok=True)
        if self.aggregate_every % self.grad_accum:
            raise ConfigError(
                f"aggregate_every={self.aggregate_every} is not a multiple of grad_accum={self.grad_accum}: "
                "clients would average adapters in the middle of an accumulation window; "
                f"use e.g. --aggregate-every {self.grad_accum}.")


@dataclass
class NetConfig:
    broker_frontend: str = field(default="tcp://127.0.0.1:5755", metadata={"help": "broker ROUTER address (clients connect)"})
    broker_backend: str = field(default="tcp://127.0.0.1:5756", metadata={"help": "broker DEALER address (the server connects)"})
    aggregator_address: str = field(default="tcp://127.0.0.1:5757", metadata={"help": "aggregator ROUTER address (uploads, fetch)"})
    aggregator_pub: str = field(default="tcp://127.0.0.1:5758", metadata={"help": "aggregator PUB address (adapter broadcasts)"})
    wire_dtype: str = field(default="fp32", metadata={"help": "dtype of activations and gradients on the wire: fp32|bf16|fp16"})
    microbatch_wait_ms: int = field(default=2000, metadata={"help": "longest the server waits to fill a microbatch"})
    microbatch_max_padding: float = field(default=1.0, metadata={"help": "largest share of padded positions in one server forward; a microbatch with more runs as length-sorted groups (1: never split; 0.1 pays on a CPU server with clients of mixed lengths)"})
    request_timeout_s: float = field(default=120.0, metadata={"help": "client wait for a reply before retrying"})
    retries: int = field(default=5, metadata={"help": "client retries of one request"})
    heartbeat_s: float = field(default=2.0, metadata={"help": "heartbeat interval"})
    register_timeout_s: float = field(default=600.0, metadata={"help": "longest the server waits for all clients to register (the aggregator: for the next one; a client: for its registration)"})
    checkpoint_every: int = field(default=1, metadata={"help": "server checkpoint period in rounds (0: only at the end; 1 resumes exactly)"})
    straggler_timeout_s: float = field(default=0.0, metadata={"help": "close a round without clients that have not sent within this time (0: wait for all)"})
    min_clients: int = field(default=0, metadata={"help": "fewest clients a round or an aggregation may proceed with (0: all)"})
    max_message_mb: int = field(default=512, metadata={"help": "largest message accepted (ZMQ_MAXMSGSIZE)"})
    keys_dir: str = field(default="", metadata={"help": "CurveZMQ keys folder (lesft keys generate); empty: plaintext"})
    insecure: bool = field(default=False, metadata={"help": "allow plaintext TCP to a non-loopback address"})
    done_linger_s: float = field(default=5.0, metadata={"help": "how long server/aggregator stay up after the run ends"})
    link_up: str = field(default="", metadata={"help": "edge-link emulator in the broker: each client's uplink rate, e.g. 4mbit (empty: unshaped; for benchmarks and tests)"})
    link_down: str = field(default="", metadata={"help": "edge-link emulator: each client's downlink rate, e.g. 20mbit (empty: unshaped)"})
    link_latency_ms: float = field(default=0.0, metadata={"help": "edge-link emulator: one-way latency added to every client<->server message, each direction"})

    def __post_init__(self) -> None:
        from lesft.wire import WIRE_DTYPES  # imports torch: only once a config is checked

        _one_of("wire_dtype", self.wire_dtype, tuple(WIRE_DTYPES))
        _positive("microbatch_wait_ms", self.microbatch_wait_ms, zero_ok=True)
        _positive("microbatch_max_padding", self.microbatch_max_padding, zero_ok=True)
        _positive("request_timeout_s", self.request_timeout_s)
        _positive("register_timeout_s", self.register_timeout_s)
        _positive("retries", self.retries, zero_ok=True)
        _positive("max_message_mb", self.max_message_mb)
        _positive("straggler_timeout_s", self.straggler_timeout_s, zero_ok=True)
        _positive("min_clients", self.min_clients, zero_ok=True)
        _positive("checkpoint_every", self.checkpoint_every, zero_ok=True)
        _positive("link_latency_ms", self.link_latency_ms, zero_ok=True)
        for name in ("link_up", "link_down"):
            try:
                parse_rate(getattr(self, name))
            except ValueError as e:
                raise ConfigError(f"{name}: {e}.") from None

    @property
    def link_rates(self) -> tuple[float | None, float | None]:
        """(up, down) in bit/s of the edge-link emulator; None: that direction is unshaped."""
        return parse_rate(self.link_up), parse_rate(self.link_down)


@dataclass
class RunConfig:
    run_id: str = field(default="", metadata={"help": "run name (default: a timestamp)"})
    runs_dir: str = field(default="runs", metadata={"help": "folder of run outputs"})
    note: str = field(default="", metadata={"help": "one line on why the run uses its settings (lesft summary shows it)"})

    def __post_init__(self) -> None:
        if self.run_id in (".", "..") or any(c in self.run_id for c in "/\\") or self.run_id.startswith("."):
            raise ConfigError(f"run_id={self.run_id!r} is not valid: a run id names one folder under --runs-dir "
                              "(letters, digits, - and _; no / and no leading dot).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    net: NetConfig = field(default_factory=NetConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.model.label_private and not METHODS[self.train.method].split:
            raise ConfigError(f"label_private applies to the split methods; method {self.train.method} holds the whole "
                              "model on each client already: drop --label-private or use a split method (e.g. --method lesft).")
        if self.model.client_tail_layers and not METHODS[self.train.method].client_trains:
            raise ConfigError(f"client_tail_layers={self.model.client_tail_layers}: method {self.train.method} trains no "
                              "client layer, so tail layers kept there would stay untrained: drop --client-tail-layers "
                              "or use a method whose client trains (e.g. --method lesft).")
        if self.loss.loss != "lesft" or self.loss.ref_teacher != "live":
            method = METHODS[self.train.method]
            if method.loss != "lesft":
                what = f"loss={self.loss.loss}" if self.loss.loss != "lesft" else f"ref_teacher={self.loss.ref_teacher}"
                raise ConfigError(f"{what} applies to method lesft (the dual-path method); method {method.name} "
                                  "trains with plain SFT: use --method lesft or drop the setting.")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {g: {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(getattr(self, g)).items()}
                for g in GROUPS}

    def save(self, path: str | Path) -> None:
        """Write the resolved settings as JSON (atomically: parallel workers may write it too)."""
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def to_toml(self) -> str:
        """The resolved settings as TOML that :func:`build_config` reads back identically."""
        lines = []
        for group, values in self.to_dict().items():
            lines.append(f"[{group}]")
            for k, v in values.items():
                if v is not None:
                    lines.append(f"{k} = {json.dumps(v)}")
            lines.append("")
        return "\n".join(lines)

    @staticmethod
    def load(path: str | Path) -> "Config":
        """Read a config saved by :meth:`save` (a run's ``config.json``)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p} not found: pass the folder of a run made by lesft (it holds config.json).")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON ({e}).") from None
        return build_config(cli=_flatten_toml(data, str(p)), env={})

    def replace(self, **overrides: Any) -> "Config":
        """A copy with some leaf fields changed (validated), e.g. ``cfg.replace(clients=2)``;
        ``None`` resets an optional field."""
        return build_config(base=self, cli={k: "none" if v is None else v for k, v in overrides.items()})


GROUPS = ("model", "lora", "loss", "data", "train", "net", "run")


def leaf_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every leaf setting: name -> (group, dataclass field)."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for group_field in dataclasses.fields(Config):
        for f in dataclasses.fields(group_field.default_factory):  # type: ignore[arg-type]
            out[f.name] = (group_field.name, f)
    return out


def _field_type(f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(_GROUP_CLASSES[leaf_fields()[f.name][0]])
    return hints[f.name]


def parse_value(name: str, raw: Any) -> Any:
    """Convert a raw value (string from env/CLI, or a TOML value) to the field's type."""
    kind = _field_type(leaf_fields()[name][1])
    optional = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = True, args[0]
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} needs a value.")
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            if isinstance(raw, str) and "/" in raw:  # "1/4" reads naturally for split ratios
                num, den = raw.split("/", 1)
                return float(num) / float(den)
            return float(raw)
        if typing.get_origin(kind) is tuple:
            return tuple(raw) if isinstance(raw, (list, tuple)) else tuple(s.strip() for s in str(raw).split(",") if s.strip())
        return str(raw)
    except (TypeError, ValueError, ZeroDivisionError):
        type_name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{name}={raw!r} is not a valid {type_name}.") from None


def _flatten_toml(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    leaves = leaf_fields()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key in GROUPS and isinstance(value, Mapping):
            for sub, v in value.items():
                sub = sub.replace("-", "_")
                if sub not in leaves or leaves[sub][0] != key:
                    raise ConfigError(f"{path}: unknown setting [{key}] {sub}; see `lesft config` for the list.")
                flat[sub] = v
        elif key in leaves:
            flat[key] = value
        else:
            raise ConfigError(f"{path}: unknown setting {key!r}; see `lesft config` for the list.")
    return flat


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}. Pass --config with the path of a TOML file.")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML ({e}); fix the file or drop --config.") from None
    return _flatten_toml(data, str(p))


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {name: environ[f"LESFT_{name.upper()}"] for name in leaf_fields() if f"LESFT_{name.upper()}" in environ}


def build_config(*, toml: str | Path | None = None, env: Mapping[str, str] | None = None,
                 cli: Mapping[str, Any] | None = None, base: Config | None = None) -> Config:
    """Resolve defaults < TOML < env (LESFT_*) < CLI into one validated Config.

    ``env=None`` reads ``os.environ``; pass ``{}`` to ignore the environment. CLI values
    that are ``None`` mean "not given" and are skipped.
    """
    leaves = leaf_fields()
    values: dict[str, dict[str, Any]] = {g: dataclasses.asdict(getattr(base or Config(), g)) for g in GROUPS}
    layers: list[Mapping[str, Any]] = []
    if toml:
        layers.append(load_toml(toml))
    layers.append(env_overrides(env) if base is None or env is not None else {})
    layers.append({k: v for k, v in (cli or {}).items() if v is not None})
    for layer in layers:
        for name, raw in layer.items():
            if name not in leaves:
                raise ConfigError(f"unknown setting {name!r}; see `lesft config` for the list.")
            values[leaves[name][0]][name] = parse_value(name, raw)
    try:
        return Config(**{g: _GROUP_CLASSES[g](**values[g]) for g in GROUPS})
    except TypeError as e:  # a wrongly typed TOML value that slipped through
        raise ConfigError(str(e)) from None


_GROUP_CLASSES = {f.name: f.default_factory for f in dataclasses.fields(Config)}
