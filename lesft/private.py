"""Label-private (U-shaped) rounds: the final norm, the LM head and the loss stay on the client.

A round has two exchanges instead of one:

1. the client sends its rows without label ids (:func:`without_labels`: activations of
   both paths, lengths and target *positions*); the server runs its layers and returns
   the last layer's output at the target positions of both paths (:func:`server_forward`,
   ``[B, Ty, H]`` per path, before the final norm);
2. the client applies the norm and the head, computes the method's loss (every variant of
   :func:`lesft.loss.token_loss`: the reference path's logits are now the client's) and
   ``dL/dH`` (:func:`client_loss`); the server backpropagates it through its layers and
   returns ``dL/dS`` (:func:`server_backward`), which the client finishes as in a standard round.

With ``--client-tail-layers n`` the client keeps the last n decoder layers too: the server
runs layers ``k..L-n-1`` and returns their output at *every* position of both paths
(``[B, T, H]``: the tail layers attend over the sequence), and the client runs its layers
(with LoRA, dropout keyed as the server would) before the norm and the head.

The maths is the standard round's, cut at another place: the same gathers, the same loss
code, the same "sums and counts" (the server counts the rows with target tokens from
``y_len``; the loss sums never leave the client). The in-process trainer and the workers
call these functions alike, so the two reproduce each other bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from lesft import lora
from lesft.batching import Batch, Rows, concat_rows, padding_groups, split_grad, target_positions
from lesft.engine import ClientParty, ServerParty, ServerResult, _autocast, dropout_keys, reference_scope
from lesft.loss import TokenLoss, gather_positions, token_loss


def without_labels(rows: Rows) -> Rows:
    """The rows a label-private client sends: everything but the target token ids."""
    return replace(rows, targets=None)


def width(rows: Rows) -> int:
    """Target positions per row of these rows: the longest target (the client's ``targets`` width)."""
    return int(rows.y_len.max()) if len(rows) else 0


def widths(rows: Rows, everywhere: bool) -> tuple[int, int]:
    """The widths of the HIDDEN these rows get, (trained path, reference path): the longest
    target, or, with client tail layers (``everywhere``, they attend over the sequence), every
    position of each path."""
    if not everywhere:
        return width(rows), width(rows)
    return rows.act.shape[1], rows.ref_act.shape[1] if rows.ref_act is not None else 0


# --------------------------------------------------------------------------- server


@dataclass
class _Group:
    """One forward of some parts (right-padded together) whose backward waits for ``dL/dH``."""

    members: list[int]  # indices into the held parts
    act: torch.Tensor  # [sum B, T, H] leaf (requires grad when the clients train)
    hidden: torch.Tensor  # [sum B, Ty, H] the trained path at the target positions, with grad
    ref_hidden: torch.Tensor | None  # [sum B, Ty, H] the reference path there, no grad


@dataclass
class HeldForward:
    """What the server keeps between returning the hidden states and receiving ``dL/dH``:
    each part's graph, and the tensors to send back (``hidden[i] = (trained, reference or None)``,
    ``[B_i, Ty_i, H]`` on the CPU)."""

    parts: list[Rows]
    groups: list[_Group]
    hidden: list[tuple[torch.Tensor, torch.Tensor | None]]
    want_grad: bool
    keys: list[tuple[int, int]] = field(default_factory=list)  # (client, round) of each part, on the server
    received: dict[int, torch.Tensor | None] = field(default_factory=dict)  # part -> its dL/dH (None: given up)


class Held:
    """The server's label-private microbatches waiting for their ``dL/dH``, by (client, round):
    what a repeated FORWARD gets again, and when a microbatch can be backpropagated (every part
    has its gradient or was given up)."""

    def __init__(self) -> None:
        self._at: dict[tuple[int, int], tuple[HeldForward, int]] = {}

    def add(self, held: HeldForward, keys: Sequence[tuple[int, int]]) -> None:
        """A microbatch just forwarded; ``keys[i]`` = (client, round) of its part i."""
        held.keys = list(keys)
        for i, key in enumerate(keys):
            self._at[key] = (held, i)

    def waiting(self, client: int, r: int) -> bool:
        """Whether the dL/dH of (client, round) is awaited (or came and may come again: a repeat),
        not given up."""
        held, i = self._at.get((client, r), (None, 0))
        return held is not None and (i not in held.received or held.received[i] is not None)

    def missing(self, r: int) -> list[int]:
        """The clients whose dL/dH of round ``r`` has not come (nor been given up)."""
        return sorted(c for (c, n), (held, i) in self._at.items() if n == r and i not in held.received)

    def hidden(self, client: int, r: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The HIDDEN tensors of (client, round) while its dL/dH is awaited."""
        if not self.waiting(client, r):
            return None
        held, i = self._at[(client, r)]
        return held.hidden[i]

    def give(self, client: int, r: int, grad: torch.Tensor | None) -> tuple[HeldForward, list] | None:
        """The dL/dH of (client, round) (None: given up, a straggler). Returns the microbatch and
        every part's gradient once all are in (and forgets it); else None. A gradient for a shape
        other than the HIDDEN's is a ``ValueError``."""
        held, i = self._at[(client, r)]
        want = tuple(held.hidden[i][0].shape)
        if grad is not None and tuple(grad.shape) != want:
            raise ValueError(f"head_grad of round {r} has shape {list(grad.shape)}; its hidden states were {list(want)}")
        held.received[i] = grad
        if len(held.received) < len(held.parts):
            return None
        for key in held.keys:  # a part given up and sent again since is a newer microbatch's: kept
            if self._at[key][0] is held:
                del self._at[key]
        return held, [held.received[j] for j in range(len(held.parts))]


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """The attention mask ``[B, T]`` of right-padded rows of these ``lengths``."""
    return (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).long()


def _server_out(model, act: torch.Tensor, lengths: torch.Tensor, y_start: torch.Tensor, y_len: torch.Tensor,
                ty: int | None) -> torch.Tensor:
    """The server layers' output at the positions predicting each target, ``[B, ty, H]``; with
    ``ty`` None at every position, ``[B, T, H]`` (for the client's tail layers)."""
    out = model.hidden(act, padding_mask(lengths, act.shape[1]))
    return out if ty is None else gather_positions(out, target_positions(y_start, y_len, ty)[0])


def server_forward(server: ServerParty, parts: Sequence[Rows], want_grad: bool) -> HeldForward:
    """Forward both paths of a microbatch of label-free rows up to the server's last layer;
    keep the graph for :func:`server_backward`. Groups as :meth:`ServerParty.process` does."""
    model, dev = server.part, server.device
    everywhere = server.cfg.model.client_tail_layers > 0
    groups, hidden = [], [None] * len(parts)
    for members in padding_groups(parts, server.cfg.net.microbatch_max_padding):
        rows = concat_rows([parts[i] for i in members]).to(dev, torch.float32)
        ty = None if everywhere else width(rows)
        act = rows.act.detach().clone().requires_grad_(want_grad)
        with lora.dropout_rows(rows.keys, rows.lengths), _autocast(dev, server.cfg.train.autocast_bf16):
            with server.meter.phase("forward"):
                h = _server_out(model, act, rows.lengths, rows.y_start, rows.y_len, ty)
                ref = None
                if server.method.loss == "lesft" and rows.ref_act is not None:
                    with reference_scope(model, server.cfg):
                        ref = _server_out(model, rows.ref_act, rows.ref_lengths, rows.ref_y_start, rows.y_len, ty)
        groups.append(_Group(members, act, h, ref))
        start = 0
        for i in members:
            n, (w, w_ref) = len(parts[i]), widths(parts[i], everywhere)
            cut = slice(start, start + n)
            hidden[i] = (h[cut, :w].detach().cpu(), None if ref is None else ref[cut, :w_ref].detach().cpu())
            start += n
    return HeldForward(list(parts), groups, hidden, want_grad)


def _padded(grads: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Each part's ``dL/dH [B_i, Ty_i, H]`` placed into one ``[sum B, Ty, H]`` like ``like``."""
    out, start = torch.zeros_like(like), 0
    for g in grads:
        out[start:start + g.shape[0], :g.shape[1]] = g.to(out.device, out.dtype)
        start += g.shape[0]
    return out


def server_backward(server: ServerParty, held: HeldForward, grads: Sequence[torch.Tensor | None]) -> ServerResult:
    """Backpropagate each part's ``dL/dH`` (None: a part whose client never sent it, which
    then counts as no rows) through the held graph; returns each part's ``dL/dS`` (or None)
    and its rows with target tokens. The loss sums are the clients' own: NaN here."""
    out: list[torch.Tensor | None] = [None] * len(held.parts)
    valid = [int((p.y_len > 0).sum()) if g is not None else 0 for p, g in zip(held.parts, grads)]
    for group in held.groups:
        parts = [held.parts[i] for i in group.members]
        mine = [grads[i] if grads[i] is not None else torch.zeros(held.hidden[i][0].shape) for i in group.members]
        with server.meter.phase("backward"):
            group.hidden.backward(_padded(mine, group.hidden))
        if held.want_grad:
            for i, g in zip(group.members, split_grad(group.act.grad, parts)):
                out[i] = g.to("cpu") if grads[i] is not None else None
    server.window_rows += sum(valid)
    rows = sum(len(p) for p in held.parts)
    return ServerResult(out, [float("nan")] * len(held.parts), valid, {"rows": rows})


# --------------------------------------------------------------------------- client


def _tail_out(client: ClientParty, r: int, batch: Batch, hidden: torch.Tensor, reference: bool) -> torch.Tensor:
    """The output at the target positions ``[B, Ty, H]`` of round ``r``'s trained (or reference)
    path: the server's, gathered there already; with client tail layers, theirs over the server's
    output at every position ``[B, T, H]`` (LoRA dropout keyed as on the server; the reference
    path as its forward always runs: no gradient, no dropout)."""
    tail = client.tail
    if tail.body is None:
        return hidden
    path = batch.ref if reference else client.trained_path(batch)
    lengths = path.lengths.to(hidden.device)
    mask = padding_mask(lengths, hidden.shape[1])
    if reference:
        with reference_scope(tail, client.cfg):
            out = tail.layers(hidden, mask)
    else:
        with lora.dropout_rows(dropout_keys(client.cfg, client.client_id, r, len(batch)), lengths):
            out = tail.layers(hidden, mask)
    positions = target_positions(path.y_start.to(hidden.device), batch.y_len.to(hidden.device), batch.targets.shape[1])
    return gather_positions(out, positions[0])


def client_loss(client: ClientParty, r: int, hidden: torch.Tensor,
                ref_hidden: torch.Tensor | None) -> tuple[TokenLoss, torch.Tensor]:
    """The method's loss of round ``r`` from the server's last-layer output (``hidden``,
    ``ref_hidden``: ``[B, Ty, H]`` at the target positions, or ``[B, T, H]`` at every position
    with client tail layers) through the client's tail layers, norm and head, and ``dL/dH`` (its
    shape) of the sum of its rows' losses (the server's scale); the tail layers' LoRA gradients
    accumulate in this client's."""
    batch, tail, dev = client.batch(r), client.tail, client.device
    targets, y_len = batch.targets.to(dev), batch.y_len.to(dev)
    h = hidden.to(dev, torch.float32).clone().requires_grad_(True)  # decoded frames are read-only
    mask = torch.arange(targets.shape[1], device=dev)[None, :] < y_len[:, None]
    with _autocast(dev, client.cfg.train.autocast_bf16), client.meter.phase("loss"):
        normed = tail.normed(_tail_out(client, r, batch, h, reference=False))
        ref = None
        if ref_hidden is not None:
            with torch.no_grad():
                ref_normed = tail.normed(_tail_out(client, r, batch, ref_hidden.to(dev, torch.float32), reference=True))
                ref = (tail.head(ref_normed), ref_normed)
        tl = token_loss(client.method, client.cfg, tail.head(normed), mask, normed, ref, tail.lm_head.weight,
                        targets)
    with client.meter.phase("backward"):
        tl.total.backward()
    return tl, h.grad.detach()
