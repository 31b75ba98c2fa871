"""The dual-path token-weighted loss of LESFT (paper sec. 3.4, eq. 16-17, Algorithm 2),
its variants (``--loss nlft|kd|smooth|excess|power``, README "Loss variants") and the plain
SFT loss of the baselines. Vectorised; only NLFT's sequential clustering (``--sim-rule
nlft``) loops, one step per neighbour, over all its sweeps at once.

Shapes: ``B`` rows, ``T`` target tokens per row (padded; ``mask`` marks real ones),
``D`` the dimension of the token vectors used for sub-salient clustering.

Token weights are constants (stop-gradient): the reference path only decides how much
each base-path token counts, so no gradient ever flows into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lesft.batching import target_positions
from lesft.config import Config, LossConfig
from lesft.methods import Method

IRRELEVANT, SUBSALIENT, SALIENT = 0, 1, 2


def classify_tokens(ref_probs: torch.Tensor, vectors: torch.Tensor, mask: torch.Tensor,
                    p_sal: float = 0.95, sim_threshold: float = 0.5) -> torch.Tensor:
    """Token classes ``LongTensor[B, T]``: 2 salient, 1 sub-salient, 0 irrelevant (and masked-out).

    Salient: ``ref_probs > p_sal``. Sub-salient: not salient, and cosine similarity
    ``>= sim_threshold`` to the vector of at least one salient token of the same row.
    ``vectors`` ``[B, T, D]`` are used as given (centre them first if wanted).
    """
    mask = mask.bool()
    salient = (ref_probs > p_sal) & mask
    unit = F.normalize(vectors if vectors.dtype in (torch.float32, torch.float64) else vectors.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # [B, T, T]
    best = sim.masked_fill(~salient[:, None, :], float("-inf")).amax(dim=-1)  # best match to a salient token
    sub = ~salient & mask & (best >= sim_threshold)
    return salient.long() * SALIENT + sub.long() * SUBSALIENT


def token_weights(ref_probs: torch.Tensor, classes: torch.Tensor, p_sal: float = 0.95,
                  gammas: tuple[float, float, float] = (5.0, 0.3, 0.6)) -> torch.Tensor:
    """Eq. 16: the scaling weight of every token ``[B, T]`` from the reference probability."""
    g1, g2, g3 = gammas
    p = ref_probs.detach()
    salient = 1.0 + ((p - p_sal) / (1.0 - p_sal)).clamp(min=0.0) ** g1
    ratio = (p / p_sal).clamp(min=0.0)
    return torch.where(classes == SALIENT, salient, torch.where(classes == SUBSALIENT, ratio ** g2, ratio ** g3))


def row_losses(token_logprobs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
               norm: str = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 17 per row: ``(losses [B], has_tokens [B])``; rows without tokens give 0.

    ``norm="tokens"`` divides by the row's token count (the paper); ``"weights"`` by the
    sum of its weights.
    """
    m = mask.to(token_logprobs.dtype)
    w = weights.detach().to(token_logprobs.dtype) * m
    total = -(w * token_logprobs).sum(dim=-1)
    denom = m.sum(dim=-1) if norm == "tokens" else w.sum(dim=-1)
    has = mask.bool().any(dim=-1)
    return total / denom.clamp(min=torch.finfo(denom.dtype).tiny), has


def weighted_nll(token_logprobs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 17: per-row mean over its masked-in tokens, then the mean over rows with a token."""
    rows, has = row_losses(token_logprobs, weights, mask)
    if not has.any():
        return (token_logprobs * 0.0).sum()
    return rows[has].mean()


def center(vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract each row's mean vector over its masked-in tokens ``[B, T, D]``."""
    m = mask.to(vectors.dtype).unsqueeze(-1)
    mean = (vectors * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
    return (vectors - mean) * m


@dataclass
class TokenLoss:
    """Per-row losses (``rows[B]`` with grad, ``valid[B]``) and what the round logs."""

    rows: torch.Tensor
    valid: torch.Tensor
    classes: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        """The batch loss: mean of the rows that have target tokens."""
        if not self.valid.any():
            return (self.rows * 0.0).sum()
        return self.rows[self.valid].mean()

    @property
    def total(self) -> torch.Tensor:
        """Sum over valid rows: what gets backpropagated and divided once per optimiser step."""
        return (self.rows * self.valid.to(self.rows.dtype)).sum()


def _stats(logprobs: torch.Tensor, mask: torch.Tensor, classes: torch.Tensor | None,
           weights: torch.Tensor | None) -> dict:
    m = mask.bool()
    n = int(m.sum())
    out = {"tokens": n, "nll": float(-(logprobs.detach() * m).sum() / max(n, 1))}
    if classes is not None and n:
        for name, c in (("salient", SALIENT), ("subsalient", SUBSALIENT), ("irrelevant", IRRELEVANT)):
            out[f"frac_{name}"] = float(((classes == c) & m).sum()) / n
        out["weight_mean"] = float(weights.detach()[m].mean())
    return out


def sft_token_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> TokenLoss:
    """Plain SFT: eq. 17 with every weight 1 (mean token NLL per row)."""
    rows, valid = row_losses(logprobs, torch.ones_like(logprobs), mask)
    return TokenLoss(rows, valid, stats=_stats(logprobs, mask, None, None))


def lesft_token_loss(logprobs: torch.Tensor, ref_probs: torch.Tensor, ref_vectors: torch.Tensor,
                     mask: torch.Tensor, cfg: LossConfig = LossConfig(), *,
                     cluster_vectors: torch.Tensor | None = None) -> TokenLoss:
    """LESFT on aligned targets: ``logprobs [B, T]`` of the trained path (with grad),
    ``ref_probs [B, T]`` and ``ref_vectors [B, T, D]`` of the weighting path (no grad).

    ``cfg.loss == "nlft"`` adds the plain NLL with weight 1: NLFT's released rule, whose
    code returns ``(weighted + NLL) * 10``; the factor 10 is left out, since AdamW's update
    does not change (up to eps) when the loss is scaled. ``cfg.sim_rule == "nlft"`` finds
    the sub-salient tokens with NLFT's contiguous clusters over ``cluster_vectors [B, T, D]``
    (the trained path's final hidden states) instead of the paper's rule over ``ref_vectors``."""
    with torch.no_grad():
        if cfg.sim_rule == "nlft":
            if cluster_vectors is None:
                raise ValueError("sim_rule='nlft' needs cluster_vectors (final hidden states of the trained path)")
            salient = (ref_probs > cfg.p_sal) & mask.bool()
            sub = nlft_clusters(cluster_vectors, salient, mask, cfg.nlft_distance) & ~salient
            classes = salient.long() * SALIENT + sub.long() * SUBSALIENT
        else:
            vectors = ref_vectors if ref_vectors.dtype == torch.float64 else ref_vectors.float()
            vectors = center(vectors, mask) if cfg.sim_vectors == "centered" else vectors
            classes = classify_tokens(ref_probs, vectors, mask, cfg.p_sal, cfg.sim_threshold)
        weights = token_weights(ref_probs, classes, cfg.p_sal, cfg.gammas)
    rows, valid = row_losses(logprobs, weights, mask, cfg.lesft_norm)
    mix = 1.0 if cfg.loss == "nlft" else cfg.lesft_nll_mix
    if mix:
        rows = rows + mix * row_losses(logprobs, torch.ones_like(logprobs), mask)[0]
    return TokenLoss(rows, valid, classes, weights, _stats(logprobs, mask, classes, weights))


# --------------------------------------------------------------------------- loss variants
# What each computes, and why, is in the README section "Loss variants". Every variant is a
# function of the two paths at the aligned target positions; the reference path's numbers
# enter only as constants (stop-gradient), so no gradient ever reaches it.


def nlft_clusters(vectors: torch.Tensor, salient: torch.Tensor, mask: torch.Tensor,
                  distance: float = 0.4) -> torch.Tensor:
    """NLFT's token clusters (``token_cluster`` of its released code), per row: ``BoolTensor[B, T]``
    of the tokens in the cluster of some salient token (the salient tokens included).

    From each salient token ``s`` (in order) the cluster grows contiguously to the left,
    then to the right, over the row's masked-in tokens: a neighbour ``j`` joins while
    ``1 - cos(centre, v_j) > distance`` and then ``centre = (centre + v_j) / 2``; the first
    neighbour that fails stops that direction. The centre starts at ``v_s`` and is carried
    from the left sweep into the right one, as in the code. The direction is the code's:
    its variable is named ``similarity`` but holds ``measure_hidden_state_distance(...,
    'cosine')`` = 1 - cosine similarity, and it expands while that is > x = 0.4, i.e. it
    gathers neighbours that are *dissimilar* (cos < 0.6) to the centre. We keep that literal
    behaviour (``nlft`` is NLFT's released rule, not a corrected one). Two deliberate
    differences: clusters stay inside a row (NLFT flattens the batch's tokens, so a cluster
    can run into the next example), and cosines use a 1e-8 floor on the norm product.
    ``vectors`` are used raw (NLFT does not centre them). Each sweep is sequential, but the
    sweeps of all salient tokens (all rows) advance together, one neighbour per step, in
    float64 on the CPU (the same numbers in every process). The work is O(salient tokens x
    cluster length): small when neighbouring states are mostly alike (most sweeps stop at
    once), up to seconds per batch when nearly every neighbour is dissimilar (random
    vectors, rows of hundreds of tokens).
    """
    m = mask.bool().cpu()
    B, T = m.shape
    vecs = vectors.detach().to("cpu", torch.float64)
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)  # each row's tokens first, in order
    packed = vecs.gather(1, order[..., None].expand(-1, -1, vecs.shape[-1]))
    member = (salient.bool().cpu() & m).gather(1, order)
    norms = packed.norm(dim=-1)
    rows, start = member.nonzero(as_tuple=True)  # one sweep per salient token
    count = m.sum(dim=1)[rows]
    centre = packed[rows, start]
    for step in (-1, 1):  # left, then right from the carried centre
        j = start + step
        live = ((j >= 0) & (j < count)).nonzero().squeeze(-1)  # the sweeps still growing
        while live.numel():
            r, jj, c = rows[live], j[live], centre[live]
            v = packed[r, jj]
            cos = (c * v).sum(-1) / (c.norm(dim=-1) * norms[r, jj]).clamp(min=1e-8)
            grow = (1.0 - cos) > distance
            live, r, jj = live[grow], r[grow], jj[grow]
            member[r, jj] = True
            centre[live] = (c[grow] + v[grow]) / 2
            j[live] = jj + step
            live = live[(j[live] >= 0) & (j[live] < count[live])]
    out = torch.zeros(B, T, dtype=torch.bool).scatter_(1, order, member) & m
    return out.to(mask.device)


def _masked_row_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean of ``values [B, T]`` over the masked-in tokens: ``(rows [B], has_tokens [B])``."""
    m = mask.to(values.dtype)
    return (values * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0), mask.bool().any(dim=-1)


def _nll_stats(logprobs: torch.Tensor, mask: torch.Tensor, ref_logprobs: torch.Tensor | None = None) -> dict:
    out = _stats(logprobs, mask, None, None)
    if ref_logprobs is not None:
        out["ref_nll"] = float(-(ref_logprobs.detach() * mask).sum() / max(out["tokens"], 1))
    return out


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def kd_token_loss(logits: torch.Tensor, ref_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  lam: float = 1.0, tau: float = 1.0, topk: int = 0, smooth: bool = False) -> TokenLoss:
    """``kd``: plain NLL + ``lam * tau^2 * KL(q || softmax(z / tau))`` per token, row means.

    ``logits [B, T, V]`` are the trained path's ``z`` at the positions predicting each target
    ``ids [B, T]`` (with grad), ``ref_logits [B, T, V]`` the reference path's ``z~`` there (the
    teacher; used as a constant). ``q = softmax(z~ / tau)``; with ``topk = k > 0``, ``q`` is the
    teacher renormalised over its top k tokens and the KL runs over those k:
    ``sum_{i in top k} q_i (log q_i - log p_i)`` with the student's ``log p`` still normalised
    over the whole vocabulary (so the term is >= 0, and it is the full KL at k = V).

    ``smooth=True`` is the label-smoothing control: ``q`` keeps the teacher's tempered
    probability ``P~_t`` on the target and spreads ``1 - P~_t`` uniformly over the other
    ``V - 1`` tokens. It has kd's confidence on every token but carries no teacher
    information about the other tokens, so kd minus smooth measures the teacher's "dark
    knowledge". (Classic uniform smoothing with a constant epsilon would differ from kd in
    the target's mass too, and could not tell the two effects apart.) ``topk`` is not used.

    Stats: ``kl`` is the mean per-token KL (at ``tau``, without ``lam * tau^2``)."""
    z, pick = _at_least_fp32(logits), ids[..., None]
    plain = torch.log_softmax(z, dim=-1)
    nll_lp = plain.gather(-1, pick).squeeze(-1)
    student = plain if tau == 1.0 else torch.log_softmax(z / tau, dim=-1)
    with torch.no_grad():
        teacher_z = _at_least_fp32(ref_logits.detach())
        ref_lp = torch.log_softmax(teacher_z, dim=-1).gather(-1, pick).squeeze(-1)
        teacher_z = teacher_z if tau == 1.0 else teacher_z / tau
        teacher = torch.log_softmax(teacher_z, dim=-1)
    if smooth:
        V = z.shape[-1]
        with torch.no_grad():
            p_t = teacher.gather(-1, pick).squeeze(-1).exp()
            rest = (1.0 - p_t).clamp(min=0.0)
            neg_entropy = torch.xlogy(p_t, p_t) + torch.xlogy(rest, rest / (V - 1))
        s_t = student.gather(-1, pick).squeeze(-1)
        kl = neg_entropy - (p_t * s_t + rest / (V - 1) * (student.sum(dim=-1) - s_t))
    elif topk:
        with torch.no_grad():
            vals, idx = teacher_z.topk(min(topk, z.shape[-1]), dim=-1)
            q_log = torch.log_softmax(vals, dim=-1)
        kl = (q_log.exp() * (q_log - student.gather(-1, idx))).sum(dim=-1)
    else:
        kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    nll_rows, valid = _masked_row_mean(-nll_lp, mask)
    kl_rows, _ = _masked_row_mean(kl, mask)
    rows = nll_rows + (lam * tau * tau) * kl_rows
    stats = _nll_stats(nll_lp, mask, ref_lp)
    if stats["tokens"]:
        stats["kl"] = float(kl.detach()[mask.bool()].mean())
    return TokenLoss(rows, valid, stats=stats)


def excess_token_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                      lam: float = 1.0, clip: float = 2.0) -> TokenLoss:
    """``excess``: weights ``w = 1 + lam * clip(log P~ - log P, 0, c) / c`` (constants), row loss
    ``sum w * (-log P) / sum w``: up-weight the tokens the answer-conditioned path knows and the
    trained path does not yet. ``lam = 0`` is the plain NLL."""
    with torch.no_grad():
        gap = (ref_logprobs.detach() - logprobs.detach()).clamp(min=0.0, max=clip)
        weights = 1.0 + lam * gap / clip
    rows, valid = row_losses(logprobs, weights, mask, norm="weights")
    stats = _nll_stats(logprobs, mask, ref_logprobs)
    m = mask.bool()
    if stats["tokens"]:
        stats["weight_mean"] = float(weights[m].mean())
        stats["frac_upweighted"] = float((weights[m] > 1.0).double().mean())
    return TokenLoss(rows, valid, weights=weights, stats=stats)


def power_token_loss(logprobs: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0) -> TokenLoss:
    """``power``: per token ``(1 - P^alpha) / alpha``, mean per row. Its gradient is
    ``-P^alpha * d log P``: tokens the model finds unlikely count less (alpha -> 0 is the NLL;
    alpha = 1 has DFT's gradient ``-P * d log P``). One path only: no reference is needed.
    ``weight_mean`` logs the mean effective gradient weight ``P^alpha``."""
    per_token = -torch.expm1(alpha * logprobs) / alpha
    rows, valid = _masked_row_mean(per_token, mask)
    stats = _stats(logprobs, mask, None, None)
    if stats["tokens"]:
        stats["weight_mean"] = float((alpha * logprobs.detach()[mask.bool()]).exp().mean())
    return TokenLoss(rows, valid, stats=stats)


# --------------------------------------------------------------------------- alignment


def target_index(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align target tokens by label order: ``(positions, ids, mask)``, each ``[B, Tmax]``.

    ``labels [B, L]`` holds the target id at each target position and ``ignore_index``
    elsewhere (the Hugging Face convention). ``positions`` is the index of the logit
    that predicts each target (its position - 1); the j-th target of a row sits at
    column j whatever its absolute position, so two paths with prompts of different
    lengths line up.
    """
    is_target = labels != ignore_index
    rank = is_target.long().cumsum(dim=-1) - 1  # j for the j-th target of the row
    counts = is_target.sum(dim=-1)
    t_max = max(int(counts.max()) if counts.numel() else 0, 1)
    b, pos = is_target.nonzero(as_tuple=True)
    positions = torch.zeros(labels.shape[0], t_max, dtype=torch.long, device=labels.device)
    ids = torch.zeros_like(positions)
    positions[b, rank[b, pos]] = pos - 1
    ids[b, rank[b, pos]] = labels[b, pos]
    mask = torch.arange(t_max, device=labels.device)[None, :] < counts[:, None]
    if (positions[mask] < 0).any():
        raise ValueError("a label sits at position 0: there is no logit that predicts it")
    return positions, ids, mask


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[b, positions[b, j]]`` for ``x [B, L, ...]`` and ``positions [B, T]`` (padding
    positions are clamped into range; their values are masked out by the caller)."""
    idx = positions.clamp(min=0, max=x.shape[1] - 1)
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def target_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[ids]`` for logits ``[B, T, V]`` already at the target positions."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def lesft_loss(base_logits: torch.Tensor, ref_logits: torch.Tensor, base_labels: torch.Tensor,
               ref_labels: torch.Tensor, ref_hidden: torch.Tensor | None = None,
               cfg: LossConfig = LossConfig(), lm_head: torch.Tensor | None = None) -> TokenLoss:
    """The whole LESFT loss from full-sequence logits of both paths.

    ``base_logits [B, L1, V]`` (with grad), ``ref_logits [B, L2, V]``, HF-style labels of
    each path (same target tokens, at different offsets), optional ``ref_hidden
    [B, L2, D]`` (final hidden states of the reference path) for sub-salient clustering;
    with ``cfg.sim_vectors == "lm_head"`` pass the head matrix ``[V, D]`` instead.
    """
    b_pos, b_ids, b_mask = target_index(base_labels)
    r_pos, r_ids, r_mask = target_index(ref_labels)
    if b_ids.shape != r_ids.shape or not torch.equal(b_ids * b_mask, r_ids * r_mask):
        raise ValueError("base and reference labels do not hold the same target tokens")
    logprobs = target_logprobs(gather_positions(base_logits, b_pos), b_ids)
    with torch.no_grad():
        ref_probs = target_logprobs(gather_positions(ref_logits.detach(), r_pos), r_ids).exp()
        if cfg.sim_vectors == "lm_head":
            if lm_head is None:
                raise ValueError("sim_vectors='lm_head' needs the lm_head matrix")
            vectors = lm_head.detach()[r_ids]
        elif ref_hidden is not None:
            vectors = gather_positions(ref_hidden.detach(), r_pos)
        else:
            raise ValueError("pass ref_hidden (final hidden states of the reference path)")
    return lesft_token_loss(logprobs, ref_probs, vectors, b_mask, cfg)


# --------------------------------------------------------------------------- the method's loss


def head_logits(head, hidden: torch.Tensor, y_start: torch.Tensor, y_len: torch.Tensor,
                width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LM head only at the ``width`` positions that predict the targets (on every
    position it would cost as much as several layers): ``(logits [B, Ty, V], mask, hidden
    at those positions)``."""
    pos, mask = target_positions(y_start, y_len, width)
    h = gather_positions(hidden, pos)
    return head(h), mask, h


def head_logprobs(head, hidden: torch.Tensor, y_start: torch.Tensor, y_len: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the targets ``[B, Ty]``: ``(logprobs, mask, hidden at those positions)``."""
    logits, mask, h = head_logits(head, hidden, y_start, y_len, targets.shape[1])
    return target_logprobs(logits, targets), mask, h


def token_loss(method: Method, cfg: Config, logits: torch.Tensor, mask: torch.Tensor, trained_hidden: torch.Tensor,
               ref: tuple[torch.Tensor, torch.Tensor] | None, head_weight: torch.Tensor | None,
               targets: torch.Tensor) -> TokenLoss:
    """The method's loss on aligned targets from the trained path's ``logits [B, T, V]`` at
    the target positions. ``ref`` = (logits, final hidden states) of the reference path there,
    or None for single-path LESFT, where the trained path weights itself (detached)."""
    logprobs = target_logprobs(logits, targets)
    if method.loss == "sft":
        return sft_token_loss(logprobs, mask)
    lc = cfg.loss
    if lc.loss == "power":
        return power_token_loss(logprobs, mask, lc.power_alpha)
    if lc.loss in ("kd", "smooth", "excess"):
        if ref is None:  # the config refuses these without paths=dual; a peer's rows may still lack it
            raise ValueError(f"loss={lc.loss} needs the reference path, and these rows carry none")
        if lc.loss == "excess":
            return excess_token_loss(logprobs, target_logprobs(ref[0], targets), mask, lc.excess_lambda,
                                     lc.excess_clip)
        return kd_token_loss(logits, ref[0], targets, mask, lc.kd_lambda, lc.kd_tau, lc.kd_topk,
                             smooth=lc.loss == "smooth")
    if ref is None:
        probs, vectors = logprobs.detach().exp(), trained_hidden.detach()
    else:
        probs, vectors = target_logprobs(ref[0], targets).exp(), ref[1]
    if lc.sim_vectors == "lm_head":
        vectors = head_weight.detach()[targets]
    return lesft_token_loss(logprobs, probs, vectors, mask, lc, cluster_vectors=trained_hidden.detach())
