"""Tests for lesft.loss against an independent, deliberately slow reference of the
paper's eq. 16-17 (sec. 3.4, Algorithm 2) written with plain Python loops in float64."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lesft.config import LossConfig
from lesft.loss import (IRRELEVANT, SALIENT, SUBSALIENT, center, classify_tokens, gather_positions,
                        lesft_loss, lesft_token_loss, sft_token_loss, target_index, target_logprobs,
                        token_weights, weighted_nll)

EXACT = dict(atol=1e-9, rtol=0)

# --------------------------------------------------------------------------- the reference


def ref_cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = max(math.sqrt(sum(x * x for x in a)), 1e-12)
    nb = max(math.sqrt(sum(y * y for y in b)), 1e-12)
    return dot / (na * nb)


def ref_center(vectors: list[list[list[float]]], mask: list[list[bool]]) -> list[list[list[float]]]:
    out = []
    for row, m in zip(vectors, mask):
        real = [v for v, keep in zip(row, m) if keep]
        d = len(row[0])
        mean = [sum(v[i] for v in real) / len(real) for i in range(d)] if real else [0.0] * d
        out.append([[v[i] - mean[i] for i in range(d)] if keep else [0.0] * d for v, keep in zip(row, m)])
    return out


def ref_classes(p_ref, vectors, mask, p_sal, threshold) -> list[list[int]]:
    """Salient if p~ > p_sal; sub-salient if not salient and cos >= threshold to any salient
    token of the same row; irrelevant otherwise (masked-out tokens: 0)."""
    out = []
    for b in range(len(p_ref)):
        T = len(p_ref[b])
        salient = [mask[b][t] and p_ref[b][t] > p_sal for t in range(T)]
        row = []
        for t in range(T):
            if not mask[b][t]:
                row.append(0)
            elif salient[t]:
                row.append(2)
            elif any(salient[s] and ref_cos(vectors[b][t], vectors[b][s]) >= threshold for s in range(T)):
                row.append(1)
            else:
                row.append(0)
        out.append(row)
    return out


def ref_weight(p: float, cls: int, p_sal: float, gammas) -> float:
    g1, g2, g3 = gammas
    if cls == 2:
        return 1.0 + ((p - p_sal) / (1.0 - p_sal)) ** g1
    return (p / p_sal) ** (g2 if cls == 1 else g3)


def ref_row_losses(logprobs, weights, mask, norm="tokens") -> list[float | None]:
    """Eq. 17 per row (None for a row without tokens)."""
    out = []
    for lp, w, m in zip(logprobs, weights, mask):
        terms = [(wi, li) for wi, li, keep in zip(w, lp, m) if keep]
        if not terms:
            out.append(None)
            continue
        total = -sum(wi * li for wi, li in terms)
        out.append(total / (len(terms) if norm == "tokens" else sum(wi for wi, _ in terms)))
    return out


def ref_mean(rows: list[float | None]) -> float:
    real = [r for r in rows if r is not None]
    return sum(real) / len(real) if real else 0.0


def ref_lesft(logprobs, p_ref, vectors, mask, cfg: LossConfig) -> tuple[list[list[int]], list[float | None]]:
    vecs = ref_center(vectors, mask) if cfg.sim_vectors == "centered" else vectors
    classes = ref_classes(p_ref, vecs, mask, cfg.p_sal, cfg.sim_threshold)
    weights = [[ref_weight(p, c, cfg.p_sal, cfg.gammas) if m else 0.0 for p, c, m in zip(pr, cr, mr)]
               for pr, cr, mr in zip(p_ref, classes, mask)]
    rows = ref_row_losses(logprobs, weights, mask, cfg.lesft_norm)
    if cfg.lesft_nll_mix:
        nll = ref_row_losses(logprobs, [[1.0] * len(r) for r in logprobs], mask)
        rows = [None if r is None else r + cfg.lesft_nll_mix * n for r, n in zip(rows, nll)]
    return classes, rows


# --------------------------------------------------------------------------- random inputs


def random_case(seed: int, B: int = 6, T: int = 9, D: int = 5):
    """float64 inputs: ref probs with some salient tokens, clustered vectors, a ragged mask
    with one all-masked row (row 2) and one row without salient tokens (row 1)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(B, T, generator=g, dtype=torch.float64)
    high = torch.rand(B, T, generator=g, dtype=torch.float64) < 0.35
    p_ref = torch.where(high, 0.95 + 0.05 * u, 0.94 * u + 1e-3)
    p_ref[1] = 0.9 * u[1] + 1e-3
    centres = torch.randn(B, 3, D, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 3, (B, T), generator=g)
    vectors = centres.gather(1, pick[..., None].expand(-1, -1, D)) \
        + 0.6 * torch.randn(B, T, D, generator=g, dtype=torch.float64) + 0.5
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[2], lengths[0] = 0, T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logprobs = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64) * 0.98 + 0.01)
    return logprobs, p_ref, vectors, mask


def as_lists(*tensors):
    return [t.tolist() for t in tensors]


def assert_rows(rows: torch.Tensor, valid: torch.Tensor, expected: list[float | None]) -> None:
    assert valid.tolist() == [e is not None for e in expected]
    for r, e in zip(rows.tolist(), expected):
        if e is not None:
            assert abs(r - e) <= 1e-9, (r, e)


SEEDS = [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- classify / weights / nll


@pytest.mark.parametrize("threshold", [0.5, 0.2, -0.1, 0.9])
@pytest.mark.parametrize("seed", SEEDS)
def test_classify_tokens_matches_reference(seed, threshold):
    # Prepare
    _, p_ref, vectors, mask = random_case(seed)
    expected = ref_classes(*as_lists(p_ref, vectors, mask), 0.95, threshold)

    # Execute
    got = classify_tokens(p_ref, vectors, mask, p_sal=0.95, sim_threshold=threshold)

    # Assert
    assert got.dtype == torch.long
    assert got.tolist() == expected


def test_random_cases_cover_every_class():
    """Guard against a vacuous comparison: the random cases hold all three classes."""
    seen = set()
    for seed in SEEDS:
        _, p_ref, vectors, mask = random_case(seed)
        c = classify_tokens(p_ref, vectors, mask)
        seen |= set(c[mask].tolist())
        assert (c[1] != SALIENT).all() and (c[2] == IRRELEVANT).all()
    assert seen == {IRRELEVANT, SUBSALIENT, SALIENT}


def test_classify_boundaries():
    # p~ == p_sal is not salient (strict), cos == threshold is sub-salient (>=)
    p_ref = torch.tensor([[0.95, 0.96, 0.5, 0.5]], dtype=torch.float64)
    vectors = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [1.0, 1e-3]]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    got = classify_tokens(p_ref, vectors, mask, p_sal=0.95, sim_threshold=1.0)
    assert got.tolist() == [[IRRELEVANT, SALIENT, SUBSALIENT, IRRELEVANT]]


def test_masked_out_salient_token_is_no_cluster_centre():
    p_ref = torch.tensor([[0.2, 0.99]], dtype=torch.float64)
    vectors = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    got = classify_tokens(p_ref, vectors, torch.tensor([[True, False]]))
    assert got.tolist() == [[IRRELEVANT, IRRELEVANT]]


@pytest.mark.parametrize("gammas", [(5.0, 0.3, 0.6), (2.0, 1.0, 1.5), (1.0, 0.0, 0.7)])
@pytest.mark.parametrize("seed", SEEDS)
def test_token_weights_match_eq16(seed, gammas):
    # Prepare
    _, p_ref, vectors, mask = random_case(seed)
    classes = classify_tokens(p_ref, vectors, mask, sim_threshold=0.3)
    expected = [[ref_weight(p, c, 0.95, gammas) for p, c in zip(pr, cr)]
                for pr, cr in zip(p_ref.tolist(), classes.tolist())]

    # Execute
    got = token_weights(p_ref, classes, p_sal=0.95, gammas=gammas)

    # Assert
    assert_close(got, torch.tensor(expected, dtype=torch.float64), **EXACT)
    assert (got[classes == SALIENT] > 1).all() and (got[(classes != SALIENT) & mask] <= 1).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_weighted_nll_matches_eq17(seed):
    # Prepare
    logprobs, p_ref, vectors, mask = random_case(seed)
    weights = torch.rand(p_ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    expected = ref_mean(ref_row_losses(*as_lists(logprobs, weights, mask)))

    # Execute
    got = weighted_nll(logprobs, weights, mask)

    # Assert
    assert abs(float(got) - expected) <= 1e-9


def test_weighted_nll_of_no_tokens_is_zero_with_a_graph():
    logprobs = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    got = weighted_nll(logprobs, torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.bool))
    got.backward()
    assert float(got.detach()) == 0.0 and torch.count_nonzero(logprobs.grad) == 0


# --------------------------------------------------------------------------- lesft_token_loss options


@pytest.mark.parametrize("cfg", [
    LossConfig(),
    LossConfig(sim_vectors="uncentered"),
    LossConfig(sim_threshold=0.2, lesft_norm="weights"),
    LossConfig(lesft_nll_mix=0.5),
    LossConfig(sim_threshold=0.1, lesft_norm="weights", lesft_nll_mix=1.5),
    LossConfig(gamma_nonsalient=0.8, p_sal=0.9),
    LossConfig(gamma_salient=2.0, gamma_subsalient=0.1, gamma_irrelevant=2.0, sim_vectors="uncentered"),
], ids=["paper", "uncentered", "norm-weights", "nll-mix", "weights+mix", "nonsalient", "gammas"])
@pytest.mark.parametrize("seed", SEEDS)
def test_lesft_token_loss_matches_reference(seed, cfg):
    # Prepare
    logprobs, p_ref, vectors, mask = random_case(seed)
    exp_classes, exp_rows = ref_lesft(*as_lists(logprobs, p_ref, vectors, mask), cfg)

    # Execute
    tl = lesft_token_loss(logprobs, p_ref, vectors, mask, cfg)

    # Assert
    assert tl.classes.tolist() == exp_classes
    assert_rows(tl.rows, tl.valid, exp_rows)
    assert abs(float(tl.loss) - ref_mean(exp_rows)) <= 1e-9
    assert abs(float(tl.total) - sum(r for r in exp_rows if r is not None)) <= 1e-9
    n = int(mask.sum())
    assert tl.stats["tokens"] == n
    fractions = [tl.stats[f"frac_{c}"] for c in ("salient", "subsalient", "irrelevant")]
    assert abs(sum(fractions) - 1.0) < 1e-12
    assert abs(tl.stats["frac_salient"] - sum(c == 2 for r, m in zip(exp_classes, mask.tolist())
                                              for c, k in zip(r, m) if k) / n) < 1e-12


def test_gamma_nonsalient_sets_gamma2_and_gamma3():
    assert LossConfig().gammas == (5.0, 0.3, 0.6)
    assert LossConfig(gamma_nonsalient=0.45).gammas == (5.0, 0.45, 0.45)
    assert LossConfig(gamma_salient=3.0, gamma_subsalient=0.1, gamma_irrelevant=0.2).gammas == (3.0, 0.1, 0.2)
    assert LossConfig(gamma_nonsalient=0.0).gammas == (5.0, 0.0, 0.0)


def test_centred_and_uncentred_vectors_differ_when_states_share_an_offset():
    # Prepare: every vector = a big common offset + a small direction of its own
    g = torch.Generator().manual_seed(0)
    T, D = 8, 4
    vectors = (torch.full((1, T, D), 10.0, dtype=torch.float64)
               + torch.randn(1, T, D, generator=g, dtype=torch.float64))
    p_ref = torch.tensor([[0.99, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    mask = torch.ones(1, T, dtype=torch.bool)
    logprobs = torch.full((1, T), -1.0, dtype=torch.float64)

    # Execute
    raw = lesft_token_loss(logprobs, p_ref, vectors, mask, LossConfig(sim_vectors="uncentered")).classes
    centred = lesft_token_loss(logprobs, p_ref, vectors, mask, LossConfig(sim_vectors="centered")).classes

    # Assert
    assert (raw[0, 1:] == SUBSALIENT).all()  # anisotropy: all look alike uncentred
    assert centred.tolist() == ref_classes(p_ref.tolist(), ref_center(vectors.tolist(), mask.tolist()),
                                           mask.tolist(), 0.95, 0.5)
    assert (centred[0, 1:] != SUBSALIENT).any()


@pytest.mark.parametrize("seed", SEEDS)
def test_center_matches_reference(seed):
    _, _, vectors, mask = random_case(seed)
    got = center(vectors, mask)
    assert_close(got, torch.tensor(ref_center(vectors.tolist(), mask.tolist()), dtype=torch.float64), **EXACT)
    assert torch.count_nonzero(got[2]) == 0  # the all-masked row


def test_sft_loss_is_the_mean_token_nll_per_row():
    # Prepare
    logprobs, _, _, mask = random_case(7)
    expected = [(-sum(l for l, k in zip(lp, m) if k) / sum(m)) if any(m) else None
                for lp, m in zip(logprobs.tolist(), mask.tolist())]

    # Execute
    tl = sft_token_loss(logprobs, mask)

    # Assert
    assert_rows(tl.rows, tl.valid, expected)
    assert abs(float(tl.loss) - ref_mean(expected)) <= 1e-9
    assert tl.stats["tokens"] == int(mask.sum())
    assert abs(tl.stats["nll"] - float(-(logprobs * mask).sum() / mask.sum())) <= 1e-9


# --------------------------------------------------------------------------- target alignment


def hf_labels(rows: list[tuple[int, list[int]]], width: int) -> torch.Tensor:
    """HF labels ``[B, width]``: row b's targets start at its offset, -100 elsewhere."""
    out = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (start, ids) in enumerate(rows):
        out[b, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def test_target_index_aligns_by_label_order():
    # Prepare
    labels = hf_labels([(3, [4, 5, 6]), (1, [7]), (2, [])], width=8)

    # Execute
    positions, ids, mask = target_index(labels)

    # Assert
    assert mask.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert positions[mask].tolist() == [2, 3, 4, 0]
    assert ids[mask].tolist() == [4, 5, 6, 7]


def test_target_index_with_gaps_and_no_targets():
    labels = torch.tensor([[-100, 9, -100, 8], [-100, -100, -100, -100]])
    positions, ids, mask = target_index(labels)
    assert positions.shape == (2, 2)
    assert positions[0].tolist() == [0, 2] and ids[0].tolist() == [9, 8] and not mask[1].any()
    empty_positions, _, empty_mask = target_index(torch.full((2, 5), -100))
    assert empty_positions.shape == (2, 1) and not empty_mask.any()


def test_target_index_rejects_a_label_at_position_zero():
    with pytest.raises(ValueError):
        target_index(torch.tensor([[3, 4, -100]]))


def test_gather_positions():
    x = torch.arange(2 * 5 * 3, dtype=torch.float64).reshape(2, 5, 3)
    pos = torch.tensor([[4, 0], [1, -1]])
    got = gather_positions(x, pos)
    assert got.tolist() == [[x[0, 4].tolist(), x[0, 0].tolist()], [x[1, 1].tolist(), x[1, 0].tolist()]]
    assert gather_positions(x[..., 0], pos).tolist() == [[x[0, 4, 0], x[0, 0, 0]], [x[1, 1, 0], x[1, 0, 0]]]


# --------------------------------------------------------------------------- the full-sequence API


def sequence_case(seed: int, V: int = 11, D: int = 6):
    """Base and (longer) reference sequences holding the same targets at other offsets."""
    g = torch.Generator().manual_seed(seed)
    targets = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], []]
    base_starts, ref_starts = [2, 4, 1, 3], [7, 5, 9, 6]
    L1, L2 = 10, 16
    base_labels = hf_labels(list(zip(base_starts, targets)), L1)
    ref_labels = hf_labels(list(zip(ref_starts, targets)), L2)
    B = len(targets)
    base_logits = torch.randn(B, L1, V, generator=g)
    ref_logits = torch.randn(B, L2, V, generator=g)
    ref_hidden = torch.randn(B, L2, D, generator=g)
    for b, ids in enumerate(targets):  # make some reference tokens salient
        for j, tok in enumerate(ids):
            if (j + b) % 2 == 0:
                ref_logits[b, ref_starts[b] + j - 1, tok] += 10.0
    return base_logits, ref_logits, ref_hidden, base_labels, ref_labels, targets, base_starts, ref_starts


def hand_aligned(base_logits, ref_logits, vector_at, targets, base_starts, ref_starts):
    """The reference's per-token inputs, gathered by hand: ``(logprobs, p_ref, vectors, mask)``."""
    T = max(len(t) for t in targets)
    lp = [[0.0] * T for _ in targets]
    pr = [[0.0] * T for _ in targets]
    vec = [[None] * T for _ in targets]
    mask = [[False] * T for _ in targets]
    for b, ids in enumerate(targets):
        for j, tok in enumerate(ids):
            bl = base_logits[b, base_starts[b] + j - 1].double()
            rl = ref_logits[b, ref_starts[b] + j - 1].double()
            lp[b][j] = float(bl[tok] - torch.logsumexp(bl, 0))
            pr[b][j] = math.exp(float(rl[tok] - torch.logsumexp(rl, 0)))
            vec[b][j] = vector_at(b, ref_starts[b] + j - 1, tok)
            mask[b][j] = True
    D = len(next(v for row in vec for v in row if v is not None))
    vec = [[v if v is not None else [0.0] * D for v in row] for row in vec]
    return lp, pr, vec, mask


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(sim_vectors="uncentered", sim_threshold=0.1),
                                 LossConfig(lesft_norm="weights", lesft_nll_mix=0.25)],
                         ids=["paper", "uncentered", "weights+mix"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesft_loss_equals_hand_aligned_reference(seed, cfg):
    # Prepare
    base_logits, ref_logits, ref_hidden, base_labels, ref_labels, targets, bs, rs = sequence_case(seed)
    inputs = hand_aligned(base_logits, ref_logits, lambda b, p, tok: ref_hidden[b, p].double().tolist(),
                          targets, bs, rs)
    exp_classes, exp_rows = ref_lesft(*inputs, cfg)

    # Execute
    tl = lesft_loss(base_logits, ref_logits, base_labels, ref_labels, ref_hidden=ref_hidden, cfg=cfg)

    # Assert (the logits are float32: the loss computes in float32)
    mask = torch.tensor(inputs[3])
    assert (tl.classes * mask).tolist() == exp_classes
    assert SALIENT in tl.classes[mask].tolist()
    assert tl.valid.tolist() == [r is not None for r in exp_rows]
    for r, e in zip(tl.rows.tolist(), exp_rows):
        if e is not None:
            assert r == pytest.approx(e, rel=1e-5, abs=1e-6)
    assert float(tl.loss) == pytest.approx(ref_mean(exp_rows), rel=1e-5)


def test_lesft_loss_with_lm_head_vectors():
    # Prepare
    base_logits, ref_logits, ref_hidden, base_labels, ref_labels, targets, bs, rs = sequence_case(5)
    head = torch.randn(base_logits.shape[-1], 4, generator=torch.Generator().manual_seed(9))
    cfg = LossConfig(sim_vectors="lm_head", sim_threshold=0.0)
    inputs = hand_aligned(base_logits, ref_logits, lambda b, p, tok: head[tok].double().tolist(), targets, bs, rs)
    exp_classes, exp_rows = ref_lesft(*inputs, cfg)

    # Execute
    tl = lesft_loss(base_logits, ref_logits, base_labels, ref_labels, cfg=cfg, lm_head=head)

    # Assert
    assert (tl.classes * torch.tensor(inputs[3])).tolist() == exp_classes
    assert float(tl.loss) == pytest.approx(ref_mean(exp_rows), rel=1e-5)


def test_lesft_loss_needs_its_vectors():
    base_logits, ref_logits, _, base_labels, ref_labels, *_ = sequence_case(0)
    with pytest.raises(ValueError):
        lesft_loss(base_logits, ref_logits, base_labels, ref_labels)
    with pytest.raises(ValueError):
        lesft_loss(base_logits, ref_logits, base_labels, ref_labels, cfg=LossConfig(sim_vectors="lm_head"))


def test_lesft_loss_rejects_different_targets():
    base_logits, ref_logits, ref_hidden, base_labels, ref_labels, *_ = sequence_case(0)
    ref_labels = ref_labels.clone()
    first = (ref_labels[0] != -100).nonzero()[0, 0]
    ref_labels[0, first] = (ref_labels[0, first] + 1) % base_logits.shape[-1]
    with pytest.raises(ValueError):
        lesft_loss(base_logits, ref_logits, base_labels, ref_labels, ref_hidden=ref_hidden)


def test_stop_gradient_on_the_reference_path():
    # Prepare: the reference path is built from parameters that require grad
    base_logits, ref_logits, ref_hidden, base_labels, ref_labels, *_ = sequence_case(3)
    base = base_logits.clone().requires_grad_(True)
    ref_w = torch.randn(ref_hidden.shape[-1], ref_logits.shape[-1], requires_grad=True)
    ref_in = ref_hidden.clone().requires_grad_(True)
    ref_path_logits = ref_in @ ref_w + ref_logits

    # Execute
    tl = lesft_loss(base, ref_path_logits, base_labels, ref_labels, ref_hidden=ref_in)
    tl.loss.backward()

    # Assert
    assert base.grad is not None and torch.count_nonzero(base.grad) > 0
    for t in (ref_w, ref_in):
        assert t.grad is None or torch.count_nonzero(t.grad) == 0
    assert not tl.weights.requires_grad


def test_stop_gradient_in_lesft_token_loss():
    logprobs, p_ref, vectors, mask = random_case(0)
    lp = logprobs.clone().requires_grad_(True)
    p = p_ref.clone().requires_grad_(True)
    v = vectors.clone().requires_grad_(True)
    lesft_token_loss(lp, p, v, mask).loss.backward()
    assert torch.count_nonzero(lp.grad) > 0
    assert p.grad is None and v.grad is None


def test_target_logprobs_is_log_softmax_at_the_ids():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = torch.tensor([[0, 6, 3], [2, 2, 5]])
    got = target_logprobs(logits, ids)
    for b in range(2):
        for t in range(3):
            assert float(got[b, t]) == pytest.approx(float(logits[b, t, ids[b, t]] - torch.logsumexp(logits[b, t], 0)),
                                                     abs=1e-6)
