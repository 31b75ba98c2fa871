"""The exact model split of the paper (sec. 3.1): client = embedding + first k decoder
layers; server = the remaining layers + final norm + LM head.

Each side is built on the meta device and then filled with only its own tensors from the
:class:`~lesft.models.ModelSource`, so a client never holds the server's weights and vice
versa. Both sides derive ``position_ids`` from the same ``attention_mask``, which makes
``server(client(x))`` reproduce the full model's logits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Callable

import torch
from torch import nn

from lesft.models import ModelError, ModelSource

_LAYER = re.compile(r"^(model\.)?layers\.(\d+)\.(.*)$")


def split_point(n_layers: int, ratio: float) -> int:
    """Client layer count ``k = round(L * ratio)``, with at least one layer on each side."""
    if not 0.0 < ratio < 1.0:
        raise ModelError(f"split ratio {ratio} is not in (0, 1): use e.g. --split-ratio 0.25.")
    if n_layers < 2:
        raise ModelError(f"a model with {n_layers} decoder layer(s) cannot be split: it needs at least 2.")
    return min(max(int(round(n_layers * ratio)), 1), n_layers - 1)


def server_end(n_layers: int, k: int, tail_layers: int) -> int:
    """Where the server's layers end: a label-private client may keep the last ``tail_layers``
    too (``--client-tail-layers``), so the server runs layers ``k..end-1``, at least one."""
    end = n_layers - tail_layers
    if end - k < 1:
        raise ModelError(f"--client-tail-layers {tail_layers} leaves the server no layer: the model has {n_layers} layers "
                         f"and the client keeps the first {k}; use at most {n_layers - k - 1}.")
    return end


def client_layers(n_layers: int, k: int, tail_layers: int) -> list[int]:
    """The decoder layers a split client holds (and trains): the first k, and the last
    ``tail_layers`` of a label-private run."""
    return list(range(k)) + list(range(server_end(n_layers, k, tail_layers), n_layers))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, so left or right padding gives the same numbers."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _part_config(config, layers: range, *, tie: bool):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        cfg.layer_types = [config.layer_types[i] for i in layers]
    if hasattr(cfg, "max_window_layers") and cfg.max_window_layers is not None:
        cfg.max_window_layers = max(0, min(cfg.max_window_layers - layers.start, len(layers)))
    cfg.tie_word_embeddings = tie
    cfg.use_cache = False
    return cfg


def _materialize(module: nn.Module, config, to_full: Callable[[str], str], source: ModelSource,
                 dtype: torch.dtype) -> None:
    """Fill a meta-device module with tensors from the source, by full name; freeze it."""
    state = {}
    for local, meta in module.state_dict(keep_vars=True).items():
        state[local] = source.weights.get(to_full(local), tuple(meta.shape), dtype)
    module.load_state_dict(state, assign=True, strict=True)
    body = getattr(module, "model", module)
    if hasattr(body, "rotary_emb"):  # non-persistent buffers are not in the state dict
        body.rotary_emb = type(body.rotary_emb)(config=config)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise ModelError(f"{name} was not loaded for {source.spec}: this layout is not supported.")
    for p in module.parameters():
        p.requires_grad_(False)


class _NoEmbedding(nn.Module):
    """Stands in for the server's embedding: the server only ever sees activations."""

    def forward(self, input_ids):  # pragma: no cover - a programming error, not a user one
        raise RuntimeError("the server half has no embedding: pass inputs_embeds (client activations)")


class ClientModel(nn.Module):
    """Embedding + layers[:k]; ``forward`` returns the cut-layer activations ``[B, T, H]``."""

    side = "client"

    def __init__(self, source: ModelSource, k: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from transformers import AutoModel

        self.k, self.n_layers = k, source.n_layers
        self.config = _part_config(source.config, range(0, k), tie=False)
        with torch.device("meta"):
            body = AutoModel.from_config(self.config)
        body.norm = nn.Identity()  # the final norm belongs to the server
        _materialize(body, self.config, lambda n: f"model.{n}", source, dtype)
        self.body = body

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state

    def global_layer(self, local: int) -> int:
        return local


class ServerModel(nn.Module):
    """layers[k:] + final norm + LM head, fed the client's activations. With ``tail=False``
    (label-private runs) the final norm and the head stay on the client (:class:`ClientTail`):
    :meth:`hidden` then returns the last layer's output before the norm, and the server
    holds no head; ``end`` < L: the layers from ``end`` on stay there too."""

    side = "server"

    def __init__(self, source: ModelSource, k: int, dtype: torch.dtype = torch.float32, *, tail: bool = True,
                 end: int | None = None) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.k, self.n_layers = k, source.n_layers
        self.config = _part_config(source.config, range(k, source.n_layers if end is None else end), tie=False)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(self.config)
        lm.model.embed_tokens = _NoEmbedding()
        if not tail:
            lm.model.norm, lm.lm_head = nn.Identity(), nn.Identity()

        def to_full(name: str) -> str:
            m = _LAYER.match(name)
            return f"model.layers.{int(m.group(2)) + k}.{m.group(3)}" if m else name

        _materialize(lm, self.config, to_full, source, dtype)
        self.lm = lm

    def hidden(self, acts: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after the last norm) ``[B, T, H]`` for activations ``[B, T, H]``."""
        out = self.lm.model(inputs_embeds=acts, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden)

    def forward(self, acts: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` at every position."""
        return self.head(self.hidden(acts, attention_mask))

    def global_layer(self, local: int) -> int:
        return local + self.k


class ClientTail(nn.Module):
    """What a label-private client keeps after the server's layers: the last ``layers`` decoder
    layers (``--client-tail-layers``, none by default), the final norm and the LM head.
    :meth:`layers` runs the decoder layers over the server's last-layer output ``[B, T, H]``,
    :meth:`normed` and :meth:`head` turn hidden states into logits ``[B, T, V]``. With tied
    embeddings the head *is* the client's ``embedding`` matrix (as in :class:`FullModel`), so it
    costs no memory and is never loaded twice."""

    side = "client"

    def __init__(self, source: ModelSource, dtype: torch.dtype = torch.float32,
                 embedding: nn.Embedding | None = None, layers: int = 0) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.first = source.n_layers - layers  # the global index of its first decoder layer
        self.n_layers = source.n_layers
        span = range(self.first, source.n_layers) if layers else range(source.n_layers - 1, source.n_layers)
        config = _part_config(source.config, span, tie=False)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config)
        self.norm, self.lm_head = lm.model.norm, lm.lm_head
        _materialize(self.norm, config, lambda n: f"model.norm.{n}", source, dtype)
        if embedding is not None and getattr(source.config, "tie_word_embeddings", False):
            self.lm_head.weight = embedding.weight
        else:
            _materialize(self.lm_head, config, lambda n: f"lm_head.{n}", source, dtype)
        self.body = None
        if layers:
            body = lm.model
            body.embed_tokens, body.norm = _NoEmbedding(), nn.Identity()

            def to_full(name: str) -> str:
                m = _LAYER.match(name)
                return f"model.layers.{int(m.group(2)) + self.first}.{m.group(3)}" if m else f"model.{name}"

            _materialize(body, config, to_full, source, dtype)
            self.body = body

    def layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The tail decoder layers' output ``[B, T, H]`` (before the norm) for the server's
        last-layer output ``[B, T, H]``; the input itself without tail layers."""
        if self.body is None:
            return hidden
        out = self.body(inputs_embeds=hidden, attention_mask=attention_mask,
                        position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (after the last norm) of the last layer's output."""
        return self.norm(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def global_layer(self, local: int) -> int:
        return local + self.first


class FullModel(nn.Module):
    """The whole causal LM (centralized and FedAvg baselines, evaluation)."""

    side = "full"

    def __init__(self, source: ModelSource, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.k, self.n_layers = 0, source.n_layers
        self.config = copy.deepcopy(source.config)
        self.config.use_cache = False
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(self.config)
        _materialize(lm, self.config, lambda n: n, source, dtype)
        if getattr(self.config, "tie_word_embeddings", False):
            lm.lm_head.weight = lm.model.embed_tokens.weight
        self.lm = lm

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(input_ids, attention_mask))

    def global_layer(self, local: int) -> int:
        return local


def load_split(source: ModelSource, ratio: float, dtype: torch.dtype = torch.float32) -> tuple[ClientModel, ServerModel]:
    k = split_point(source.n_layers, ratio)
    return ClientModel(source, k, dtype), ServerModel(source, k, dtype)


def fingerprint(source: ModelSource, k: int, lora: dict, extra: dict | None = None) -> str:
    """What client and server must agree on: base config, split point, LoRA config, protocol."""
    cfg = source.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "name_or_path", "use_cache", "dtype", "torch_dtype",
                     "architectures", "_commit_hash"):
        cfg.pop(volatile, None)
    blob = json.dumps({"config": cfg, "random": source.random_weights, "n_layers": source.n_layers, "k": k,
                       "lora": lora, **(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
