"""Tokenisation of ``(x, y, x_ref)`` records and the padded batches both paths run on.

A base sequence is ``x ++ y`` and a reference sequence ``x_ref ++ y``: the target ``y``
(plus EOS) is tokenised once and appended to both prompts, so the two paths hold the
same target tokens at different offsets (``base_start`` / ``ref_start``).

Truncation to ``max_length`` (identical targets in both paths, always):
prompts keep at most ``max_length - min(len(target), max_length // 2)`` tokens, cut from
the left (the end holds the question and the answer cue); then the target is cut at its
end to fit beside the longer prompt.

Padding is on the right. :class:`Rows` is what the server computes on: cut-layer
activations with the same bookkeeping, built by a client (or read off the wire).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from lesft.data import DataError, Example


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: ``base_ids = prompt ++ target``, ``ref_ids = ref prompt ++ target``."""

    uid: str
    base_ids: tuple[int, ...]
    ref_ids: tuple[int, ...]
    target: tuple[int, ...]
    truncated: bool = False

    @property
    def base_start(self) -> int:
        return len(self.base_ids) - len(self.target)

    @property
    def ref_start(self) -> int:
        return len(self.ref_ids) - len(self.target)


def encode(tok, ex: Example, max_length: int) -> Encoded:
    prompt = list(tok(ex.x).input_ids)
    ref_prompt = list(tok(ex.x_ref).input_ids)
    target = list(tok(ex.y, add_special_tokens=False).input_ids) + [tok.eos_token_id]
    keep = max_length - min(len(target), max_length // 2)
    truncated = False
    if len(prompt) > keep or len(ref_prompt) > keep:
        prompt, ref_prompt, truncated = prompt[-keep:], ref_prompt[-keep:], True
    room = max_length - max(len(prompt), len(ref_prompt))
    if len(target) > room:
        target, truncated = target[:room], True
    return Encoded(ex.uid, tuple(prompt + target), tuple(ref_prompt + target), tuple(target), truncated)


def encode_all(tok, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    """Every example encoded; raises :class:`lesft.data.DataError` when the targets come out
    (almost) empty, which would train on nothing and still report a loss."""
    out = [encode(tok, ex, max_length) for ex in examples]
    check_targets(out, tok)
    return out


def check_targets(items: Sequence[Encoded], tok) -> None:
    """Refuse data whose targets hold (almost) no real tokens: fewer than one per example
    besides the end-of-text, or mostly the tokenizer's unknown token."""
    if not items:
        return
    eos, unk = tok.eos_token_id, getattr(tok, "unk_token_id", None)
    real = [t for it in items for t in it.target if t != eos]
    if len(real) < len(items):
        raise DataError(f"the examples' targets tokenize to {len(real)} token(s) in all ({len(items)} examples): "
                        "the tokenizer does not fit the data (or --max-length leaves no room for the answer); "
                        "use the model's own tokenizer or raise --max-length.")
    if unk is not None and unk != eos and sum(t == unk for t in real) > len(real) / 2:
        raise DataError("most target tokens are the tokenizer's unknown token: the tokenizer does not fit the data; "
                        "use the model's own tokenizer.")


@dataclass
class PathInputs:
    """One path of a batch: ``input_ids``/``attention_mask`` ``[B, T]``, ``y_start``/``lengths`` ``[B]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    y_start: torch.Tensor
    lengths: torch.Tensor


@dataclass
class Batch:
    """Both paths of B examples and their shared targets ``[B, Ty]`` (``y_len [B]`` real tokens)."""

    base: PathInputs
    ref: PathInputs
    targets: torch.Tensor
    y_len: torch.Tensor
    uids: list[str]

    def __len__(self) -> int:
        return self.targets.shape[0]


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _path(seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int) -> PathInputs:
    ids = _pad(seqs, pad_id)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return PathInputs(ids, mask, torch.tensor(list(starts), dtype=torch.long), lengths)


def collate(items: Sequence[Encoded], pad_id: int) -> Batch:
    return Batch(
        base=_path([e.base_ids for e in items], [e.base_start for e in items], pad_id),
        ref=_path([e.ref_ids for e in items], [e.ref_start for e in items], pad_id),
        targets=_pad([e.target for e in items], 0),
        y_len=torch.tensor([len(e.target) for e in items], dtype=torch.long),
        uids=[e.uid for e in items],
    )


def labels(path: PathInputs, targets: torch.Tensor, y_len: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face style labels ``[B, T]`` of one path: target ids at target positions."""
    out = torch.full_like(path.input_ids, ignore_index)
    for b in range(out.shape[0]):
        s, n = int(path.y_start[b]), int(y_len[b])
        out[b, s:s + n] = targets[b, :n]
    return out


def target_positions(y_start: torch.Tensor, y_len: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the logit predicting each target ``[B, width]`` and the mask of real targets."""
    j = torch.arange(width, device=y_start.device)[None, :]
    return y_start[:, None] + j - 1, j < y_len[:, None]


def _row_field(path: str, *, floating: bool = False):
    """A :class:`Rows` field: ``path`` says whether it travels in a FORWARD ("base": always,
    "ref": with the reference path) or stays local ("local"); ``floating``: an activation."""
    meta = {"path": path, "floating": floating}
    return field(default=None, metadata=meta) if path == "ref" else field(metadata=meta)


@dataclass
class Rows:
    """Cut-layer activations of some rows, as the server consumes them.

    ``act [B, T, H]`` is the trained path (its gradient goes back), with ``lengths``,
    ``y_start`` ``[B]``; ``targets [B, Ty]``/``y_len [B]``; optionally the weighting path
    ``ref_act [B, T2, H]`` with ``ref_lengths``/``ref_y_start``; ``keys [B]`` are the
    LoRA dropout keys of the rows (never sent: each side derives them, see
    ``lesft.engine.dropout_keys``).

    The fields below are the row schema: the FORWARD message's tensors and their order
    (:data:`BASE_FIELDS`, :data:`REF_FIELDS`), the casts and the batching all derive from them.
    """

    act: torch.Tensor = _row_field("base", floating=True)
    lengths: torch.Tensor = _row_field("base")
    y_start: torch.Tensor = _row_field("base")
    targets: torch.Tensor = _row_field("base")
    y_len: torch.Tensor = _row_field("base")
    keys: torch.Tensor = _row_field("local")
    ref_act: torch.Tensor | None = _row_field("ref", floating=True)
    ref_lengths: torch.Tensor | None = _row_field("ref")
    ref_y_start: torch.Tensor | None = _row_field("ref")

    def __len__(self) -> int:
        return self.act.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The FORWARD tensors of these rows in wire order (index tensors as int32; keys stay
        local; ``targets`` only when set: a label-private client sends none)."""
        names = [k for k in BASE_FIELDS + REF_FIELDS if getattr(self, k) is not None]
        return {k: getattr(self, k) if k in FLOAT_FIELDS else getattr(self, k).to(torch.int32) for k in names}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], keys: torch.Tensor) -> "Rows":
        """Rows from a checked FORWARD's tensors and the rows' dropout keys (index tensors as int64;
        ``targets`` None in a label-private FORWARD, which carries none)."""
        return cls(keys=keys, **{"targets": None} | {k: t[k] if k in FLOAT_FIELDS else t[k].long()
                                                     for k in BASE_FIELDS + REF_FIELDS if k in t})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Rows":
        """These rows on ``device``, activations cast to ``dtype`` when given (keys stay where they are)."""
        def mv(name: str) -> torch.Tensor | None:
            t = getattr(self, name)
            if t is None:
                return None
            return t.to(device, dtype if name in FLOAT_FIELDS and dtype is not None else t.dtype)

        return replace(self, **{k: mv(k) for k in BASE_FIELDS + REF_FIELDS})


def _fields_on(path: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(Rows) if f.metadata["path"] == path)


BASE_FIELDS = _fields_on("base")  # FORWARD tensors of every row
REF_FIELDS = _fields_on("ref")  # FORWARD tensors of the reference path (all or none)
FLOAT_FIELDS = frozenset(f.name for f in fields(Rows) if f.metadata["floating"])  # activations [B, T, H]


def _pad_dim1(t: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, extra]
    return F.pad(t, pad)


def concat_rows(parts: Sequence[Rows]) -> Rows:
    """Stack the rows of several clients into one microbatch (right-padding every width)."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> torch.Tensor | None:
        ts = [getattr(p, name) for p in parts]
        if any(t is None for t in ts):
            if not all(t is None for t in ts):
                raise ValueError(f"cannot batch rows with and without {name}")
            return None
        if ts[0].dim() >= 2:
            width = max(t.shape[1] for t in ts)
            ts = [_pad_dim1(t, width) for t in ts]
        return torch.cat(ts, dim=0)

    return Rows(**{f.name: cat(f.name) for f in fields(Rows)})


def split_grad(grad: torch.Tensor, parts: Sequence[Rows]) -> list[torch.Tensor]:
    """Cut a microbatch gradient ``[sum B, T, H]`` back into each part's own ``[B_i, T_i, H]``."""
    out, start = [], 0
    for p in parts:
        b, t = p.act.shape[0], p.act.shape[1]
        out.append(grad[start:start + b, :t].contiguous())
        start += b
    return out


def padding_groups(parts: Sequence[Rows], max_padding: float) -> list[list[int]]:
    """Split a microbatch into groups of parts (indices) so that no group pads more than
    ``max_padding`` of the positions it computes (both paths counted): parts are sorted by
    width and a group is closed when the next part would push it past the limit.

    Every part stays whole (its rows, its gradient). With ``max_padding >= 1`` the
    microbatch stays one group in arrival order. Grouping changes no result beyond float
    summation order: the loss is a sum over rows and each row's token classes and weights
    are its own.
    """
    if max_padding >= 1 or len(parts) < 2:
        return [list(range(len(parts)))]

    def widths(p: Rows) -> tuple[int, int]:
        return p.act.shape[1], (p.ref_act.shape[1] if p.ref_act is not None else 0)

    def waste(group: list[int]) -> float:
        w = max(widths(parts[i])[0] for i in group)
        r = max(widths(parts[i])[1] for i in group)
        real = sum(len(parts[i]) * sum(widths(parts[i])) for i in group)
        padded = sum(len(parts[i]) for i in group) * (w + r)
        return 1.0 - real / padded

    groups: list[list[int]] = []
    for i in sorted(range(len(parts)), key=lambda i: widths(parts[i])):
        if groups and waste(groups[-1] + [i]) <= max_padding:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
