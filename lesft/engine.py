"""The training steps of each party, shared by the in-process trainer and the workers.

:class:`ClientParty` is one edge client (its part of the model, its data, its LoRA and
optimiser); :class:`ServerParty` is the server (the rest of the model, its LoRA and
optimiser). The in-process trainer calls them directly; the worker processes call the
same methods around the wire, which is why the two reproduce each other.

Gradient bookkeeping follows "sums and counts": the server backpropagates the *sum* of
the per-row losses of a microbatch and each party divides its accumulated gradients once,
at the optimiser step, by the number of rows it saw in the accumulation window. The
result does not depend on how rows were grouped into microbatches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lesft import lora
from lesft.batching import Batch, Rows, collate, concat_rows, encode_all, padding_groups, split_grad
from lesft.config import Config, ConfigError
from lesft.data import Example
from lesft.loss import TokenLoss, head_logits, token_loss
from lesft.methods import Method
from lesft.metrics import Meter, merge_token_means
from lesft.models import ModelSource
from lesft.schedule import rounds_per_epoch
from lesft.split import ClientModel, ClientTail, FullModel, ServerModel, server_end, split_point
from lesft.wire import MODEL_DTYPES


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is visible: use --device cpu or auto.")
    return torch.device(name)


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` setting (the base weights)."""
    return MODEL_DTYPES[name]


def dropout_keys(cfg: Config, client_id: int, r: int, n_rows: int) -> torch.Tensor:
    """The LoRA dropout keys ``[n_rows]`` of a client's rows in round ``r``. They depend only
    on (seed, client, round), so the server derives them from a FORWARD's header instead of
    receiving them, and both sides draw the same masks."""
    return lora.row_keys(cfg.train.seed, client_id, r, n_rows)


def sends_reference(method: Method, cfg: Config) -> bool:
    """Whether a client of this run computes and sends the reference path (the server
    refuses a FORWARD that differs)."""
    return method.loss == "lesft" and cfg.loss.uses_reference


def set_threads(cfg: Config) -> None:
    """Give torch ``--threads`` CPU threads in this process (0 keeps torch's default)."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)


# --------------------------------------------------------------------------- schedule


def batch_indices(seed: int, client_id: int, n_samples: int, batch_size: int, r: int) -> list[int]:
    """A client's example indices in round ``r``: its own seeded permutation per epoch, cycled."""
    epoch, b = divmod(r, rounds_per_epoch(n_samples, batch_size))
    g = torch.Generator().manual_seed(lora._mix(seed, client_id, epoch))
    order = torch.randperm(n_samples, generator=g).tolist()
    return order[b * batch_size:(b + 1) * batch_size]


# --------------------------------------------------------------------------- shared pieces


def _optimizer(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer | None:
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Trainable:
    """LoRA parameters + AdamW + the rows seen in the current accumulation window."""

    part: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    window_rows: int = 0
    steps: int = 0
    meter: Meter

    def step(self) -> bool:
        """Divide the accumulated gradient by the window's row count and step once."""
        if self.optimizer is None:
            return False
        with self.meter.phase("optimizer"):
            if self.window_rows > 0:
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.div_(self.window_rows)
                self.optimizer.step()
                self.steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        stepped, self.window_rows = self.window_rows > 0, 0
        return stepped

    def discard_window(self) -> None:
        """Drop the gradients accumulated so far (rounds this party was left out of)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.window_rows = 0

    def trained(self) -> list[torch.nn.Module]:
        """The modules whose LoRA this party trains (a label-private client: its tail layers too)."""
        return [self.part]

    def adapter_params(self) -> dict[str, torch.nn.Parameter]:
        return {k: p for part in self.trained() for k, p in lora.adapter_params(part).items()}

    def adapters(self) -> dict[str, torch.Tensor]:
        return {k: v for part in self.trained() for k, v in lora.get_adapters(part).items()}

    def load_adapters(self, tensors) -> None:
        lora.check_adapters(tensors, self.adapter_params())  # all or nothing, before any part is touched
        for part in self.trained():
            lora.set_adapters(part, {k: tensors[k] for k in lora.adapter_params(part)})

    def state(self) -> dict:
        """Everything to resume this party exactly: adapters, optimiser, pending gradients."""
        params = self.adapter_params()
        return {
            "adapters": self.adapters(),
            "grads": {k: p.grad.detach().cpu().clone() for k, p in params.items() if p.grad is not None},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "window_rows": self.window_rows,
            "steps": self.steps,
        }

    def restore(self, state: dict) -> None:
        self.load_adapters(state["adapters"])
        params = self.adapter_params()
        for k, p in params.items():
            g = state["grads"].get(k)
            p.grad = None if g is None else g.to(p.device, p.dtype).clone()
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.window_rows, self.steps = int(state["window_rows"]), int(state["steps"])


def reference_scope(part: torch.nn.Module, cfg: Config):
    """The context of a reference-path forward: no gradient, no LoRA dropout, and with
    ``--ref-teacher base`` no LoRA at all (the frozen base model; the same on client and server)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(lora.no_dropout())
    if cfg.loss.ref_teacher == "base":
        stack.enter_context(lora.adapters_disabled(part))
    return stack


# --------------------------------------------------------------------------- client


@dataclass
class Pending:
    """What a client keeps between FORWARD and BACKWARD: the graph of its activations
    (one per round in flight, ``--pipeline-depth``)."""

    round: int
    act: torch.Tensor
    n_rows: int


class ClientParty(_Trainable):
    """One edge client: its model part, local data, LoRA and optimiser.

    For split methods the part is embedding + first k layers; for ``fedavg`` and
    ``centralized`` it is the whole model and :meth:`local_step` trains it alone.
    """

    def __init__(self, cfg: Config, source: ModelSource, method: Method, client_id: int,
                 examples: Sequence[Example], tokenizer, *, batch_size: int | None = None,
                 meter: Meter | None = None) -> None:
        self.cfg, self.method, self.client_id = cfg, method, client_id
        self.batch_size = batch_size or cfg.train.batch_size
        self.device = resolve_device(cfg.train.client_device)
        self.meter = meter or Meter("client", client_id, str(self.device))
        dtype = dtype_of(cfg.model.dtype)
        if method.split:
            self.part = ClientModel(source, split_point(source.n_layers, cfg.model.split_ratio), dtype)
        else:
            self.part = FullModel(source, dtype)
        if method.client_trains:
            lora.add_lora(self.part, cfg.lora, seed=cfg.train.seed)
        self.part.to(self.device).train()
        # built once the part is on its device: a tied head shares the embedding there
        self.tail = self._tail(source, dtype) if method.split and cfg.model.label_private else None
        self.optimizer = _optimizer(self.adapter_params().values(), cfg.train.lr, cfg.train.weight_decay)
        self.pad_id = tokenizer.pad_token_id
        self.data = encode_all(tokenizer, examples, cfg.data.max_length)
        if not self.data:
            raise ValueError(f"client {client_id} has no training examples")
        self.n_samples = len(self.data)
        self.pending: dict[int, Pending] = {}  # round -> its graph, until its backward
        self.window_rows = 0
        self.steps = 0

    def _tail(self, source: ModelSource, dtype: torch.dtype) -> ClientTail:
        """The final norm + LM head a label-private client keeps (the head tied to its embedding
        where the model ties them), after its last ``--client-tail-layers`` layers, with LoRA."""
        n = self.cfg.model.client_tail_layers
        server_end(source.n_layers, split_point(source.n_layers, self.cfg.model.split_ratio), n)
        tail = ClientTail(source, dtype, embedding=self.part.body.embed_tokens, layers=n)
        if n:
            lora.add_lora(tail, self.cfg.lora, seed=self.cfg.train.seed)
        return tail.to(self.device).train()

    def trained(self) -> list[torch.nn.Module]:
        return [self.part] + ([self.tail] if self.tail is not None and self.tail.body is not None else [])

    def trained_path(self, batch: Batch):
        """The path of ``batch`` this run trains on (the reference input with ``--paths reference``)."""
        paths = self.cfg.loss.paths if self.method.loss == "lesft" else "base"
        return batch.ref if paths == "reference" else batch.base

    # -- data

    def batch(self, r: int) -> Batch:
        idx = batch_indices(self.cfg.train.seed, self.client_id, self.n_samples, self.batch_size, r)
        return collate([self.data[i] for i in idx], self.pad_id)

    # -- split methods

    def forward(self, r: int) -> Rows:
        """Client forward of round ``r``: the rows to send to the server (detached)."""
        batch = self.batch(r)
        keys = dropout_keys(self.cfg, self.client_id, r, len(batch))
        trained = self.trained_path(batch)
        dev = self.device
        grad = self.method.client_trains
        with self.meter.phase("forward"), lora.dropout_rows(keys, trained.lengths), torch.set_grad_enabled(grad):
            act = self.part(trained.input_ids.to(dev), trained.attention_mask.to(dev))
        ref_act = None
        if sends_reference(self.method, self.cfg):
            # reference path: no gradient ever reaches it (the weights are constants)
            with self.meter.phase("forward"), reference_scope(self.part, self.cfg):
                ref_act = self.part(batch.ref.input_ids.to(dev), batch.ref.attention_mask.to(dev))
        if grad:
            self.pending[r] = Pending(r, act, len(batch))
        return Rows(act=act.detach(), lengths=trained.lengths, y_start=trained.y_start, targets=batch.targets,
                    y_len=batch.y_len, keys=keys, ref_act=ref_act,
                    ref_lengths=batch.ref.lengths if ref_act is not None else None,
                    ref_y_start=batch.ref.y_start if ref_act is not None else None)

    def backward(self, grad: torch.Tensor | None, rows_with_tokens: int | None = None, r: int | None = None) -> None:
        """Finish the backward pass of round ``r`` (default: the oldest pending one) with the
        server's ``dL/dS`` ``[B, T, H]`` (sum-of-rows scale). Rounds must be finished in round
        order: the gradients then add up in the same order at every pipeline depth."""
        if not self.pending:
            return
        pending = self.pending.pop(min(self.pending) if r is None else r)
        if grad is not None:
            with self.meter.phase("backward"):
                pending.act.backward(grad.to(pending.act.device, pending.act.dtype))
        self.window_rows += pending.n_rows if rows_with_tokens is None else rows_with_tokens

    # -- whole-model methods (fedavg, centralized)

    def local_step(self, r: int) -> TokenLoss:
        """Forward, loss and backward of round ``r`` on the whole model (no server)."""
        batch = self.batch(r)
        model: FullModel = self.part  # type: ignore[assignment]
        dev = self.device
        with lora.dropout_rows(dropout_keys(self.cfg, self.client_id, r, len(batch)), batch.base.lengths), \
                _autocast(dev, self.cfg.train.autocast_bf16):
            with self.meter.phase("forward"):
                base = batch.base
                hidden = model.hidden(base.input_ids.to(dev), base.attention_mask.to(dev))
            with self.meter.phase("loss"):
                targets = batch.targets.to(dev)
                logits, mask, h = head_logits(model.head, hidden, base.y_start.to(dev), batch.y_len.to(dev),
                                              targets.shape[1])
                tl = token_loss(self.method, self.cfg, logits, mask, h, None, model.lm.lm_head.weight, targets)
        with self.meter.phase("backward"):
            tl.total.backward()
        self.window_rows += int(tl.valid.sum())
        return tl


# --------------------------------------------------------------------------- server


@dataclass
class ServerResult:
    """One processed microbatch, per part: ``dL/dS`` (or None), the sum of its rows' losses
    and how many of its rows had target tokens (sums and counts: whoever reports a mean
    divides once, :func:`lesft.metrics.mean_loss`); ``stats``: per-token means, ``tokens`` and ``rows``."""

    grads: list[torch.Tensor | None]
    loss_sums: list[float]
    valid_rows: list[int]
    stats: dict = field(default_factory=dict)


class ServerParty(_Trainable):
    """The server: layers[k:] + norm + head with LoRA; computes the loss and dL/dS."""

    def __init__(self, cfg: Config, source: ModelSource, method: Method, *, meter: Meter | None = None) -> None:
        self.cfg, self.method = cfg, method
        self.device = resolve_device(cfg.train.device)
        self.meter = meter or Meter("server", 0, str(self.device))
        self.k = split_point(source.n_layers, cfg.model.split_ratio)
        self.end = server_end(source.n_layers, self.k, cfg.model.client_tail_layers)
        self.part = ServerModel(source, self.k, dtype_of(cfg.model.dtype), tail=not cfg.model.label_private,
                                end=self.end)
        lora.add_lora(self.part, cfg.lora, seed=cfg.train.seed)
        self.part.to(self.device).train()
        lr = cfg.train.server_lr if cfg.train.server_lr is not None else cfg.train.lr
        self.optimizer = _optimizer(lora.adapter_params(self.part).values(), lr, cfg.train.weight_decay)
        self.window_rows = 0
        self.steps = 0

    def rows(self, tensors: dict[str, torch.Tensor], client_id: int, r: int) -> Rows:
        """The rows of a checked FORWARD of ``client_id`` in round ``r``, with their dropout keys."""
        return Rows.from_tensors(tensors, dropout_keys(self.cfg, client_id, r, tensors["act"].shape[0]))

    def process(self, parts: Sequence[Rows], want_grad: bool) -> ServerResult:
        """Forward both paths of a microbatch, the loss, the backward; returns each part's dL/dS.

        Parts of very different widths run as length-sorted groups (``--microbatch-max-padding``),
        each its own forward and backward: the gradients add up in the adapters either way."""
        grads: list[torch.Tensor | None] = [None] * len(parts)
        row_loss: list[torch.Tensor | None] = [None] * len(parts)
        row_valid: list[torch.Tensor | None] = [None] * len(parts)
        merged: dict[str, float] = {}
        for group in padding_groups(parts, self.cfg.net.microbatch_max_padding):
            tl, group_grads = self._forward_backward([parts[i] for i in group], want_grad)
            rl, rv, start = tl.rows.detach().cpu(), tl.valid.cpu(), 0
            for i, g in zip(group, group_grads):
                n = len(parts[i])
                grads[i], row_loss[i], row_valid[i] = g, rl[start:start + n], rv[start:start + n]
                start += n
            merge_token_means(merged, tl.stats)
        loss_sums = [float(rl[rv].sum()) for rl, rv in zip(row_loss, row_valid)]
        valid = [int(rv.sum()) for rv in row_valid]
        return ServerResult(grads, loss_sums, valid, dict(merged, rows=sum(len(p) for p in parts)))

    def _forward_backward(self, parts: Sequence[Rows], want_grad: bool) -> tuple[TokenLoss, list]:
        """One forward of both paths over these parts (right-padded together), the loss and
        the backward of its sum; returns the loss and each part's dL/dS (or Nones)."""
        rows = concat_rows(parts).to(self.device, torch.float32)
        model: ServerModel = self.part  # type: ignore[assignment]
        T = rows.act.shape[1]
        act = rows.act.detach().clone().requires_grad_(want_grad)
        mask = (torch.arange(T, device=self.device)[None, :] < rows.lengths[:, None]).long()
        amp = _autocast(self.device, self.cfg.train.autocast_bf16)
        with lora.dropout_rows(rows.keys, rows.lengths), amp:
            with self.meter.phase("forward"):
                hidden = model.hidden(act, mask)
            ref = None
            if self.method.loss == "lesft" and rows.ref_act is not None:
                with self.meter.phase("forward"):
                    ref = self.reference(rows)
            with self.meter.phase("loss"):
                logits, tmask, h = head_logits(model.head, hidden, rows.y_start, rows.y_len, rows.targets.shape[1])
                tl = token_loss(self.method, self.cfg, logits, tmask, h, ref, model.lm.lm_head.weight, rows.targets)
        with self.meter.phase("backward"):
            tl.total.backward()
        self.window_rows += int(tl.valid.sum())
        grads = [g.to("cpu") for g in split_grad(act.grad, parts)] if want_grad else [None] * len(parts)
        return tl, grads

    def reference(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference path of ``rows`` (on this device) at the target positions:
        ``(logits [B, Ty, V], final hidden states [B, Ty, H])``, without gradient."""
        model: ServerModel = self.part  # type: ignore[assignment]
        with reference_scope(model, self.cfg):
            T2 = rows.ref_act.shape[1]
            ref_mask = (torch.arange(T2, device=self.device)[None, :] < rows.ref_lengths[:, None]).long()
            ref_hidden = model.hidden(rows.ref_act, ref_mask)
            logits, _, h = head_logits(model.head, ref_hidden, rows.ref_y_start, rows.y_len, rows.targets.shape[1])
        return logits, h


# --------------------------------------------------------------------------- agreement


def run_fingerprint(cfg: Config, source: ModelSource) -> tuple[str, dict]:
    """What a client and the server must agree on, as a hash and as named parts (so a
    mismatch can be named): base model config, split point, LoRA config, method, the paths
    and loss (whether the client sends the reference path), the teacher (whether the client's
    reference forward uses its LoRA), seed."""
    from lesft.split import fingerprint
    from lesft.wire import PROTOCOL_VERSION

    k = split_point(source.n_layers, cfg.model.split_ratio)
    parts = {"model": source.spec, "k": k, "lora": lora.settings_dict(cfg.lora), "method": cfg.train.method,
             "paths": cfg.loss.paths, "loss": cfg.loss.loss, "ref_teacher": cfg.loss.ref_teacher,
             "seed": cfg.train.seed, "protocol": PROTOCOL_VERSION,
             "max_length": cfg.data.max_length}
    if cfg.model.label_private:  # only then: the standard runs keep their fingerprints
        parts["label_private"] = True
    if cfg.model.client_tail_layers:  # likewise: only when set
        parts["client_tail_layers"] = cfg.model.client_tail_layers
    return fingerprint(source, k, parts["lora"], {k_: v for k_, v in parts.items() if k_ != "lora"}), parts
