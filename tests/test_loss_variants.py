"""Tests for the loss variants of lesft.loss (``--loss nlft|kd|smooth|excess|power``, README
"Loss variants") against deliberately slow float64 references with explicit per-token
Python loops, plus the engine's dispatch: no gradient reaches the reference path, and
``--ref-teacher base`` runs the reference path on the model without its adapters."""
from __future__ import annotations

import math

import pytest
import torch

from lesft import engine, lora, loss
from lesft.config import Config, ConfigError, LossConfig, build_config
from lesft.loss import (SALIENT, SUBSALIENT, excess_token_loss, kd_token_loss, lesft_token_loss, nlft_clusters,
                        power_token_loss, sft_token_loss, target_logprobs)
from lesft.methods import get_method
from test_loss import ref_weight

SEEDS = (0, 1, 2)
TOL = 1e-9


# --------------------------------------------------------------------------- references


def ref_log_softmax(z: list[float]) -> list[float]:
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - lse for v in z]


def ref_kl(q: list[float], log_p: list[float]) -> float:
    return sum(qi * (math.log(qi) - lp) for qi, lp in zip(q, log_p) if qi > 0.0)


def ref_kd_rows(logits, ref_logits, ids, mask, lam, tau, topk=0, smooth=False) -> list[float | None]:
    """Per row: mean NLL + lam * tau^2 * mean KL(q || softmax(z / tau)) over its tokens."""
    rows = []
    for b in range(len(ids)):
        nll, kl = [], []
        for t in range(len(ids[b])):
            if not mask[b][t]:
                continue
            z, zt, target = logits[b][t], ref_logits[b][t], ids[b][t]
            V = len(z)
            nll.append(-ref_log_softmax(z)[target])
            student = ref_log_softmax([v / tau for v in z])
            teacher = [math.exp(v) for v in ref_log_softmax([v / tau for v in zt])]
            if smooth:
                q = [teacher[target] if i == target else (1.0 - teacher[target]) / (V - 1) for i in range(V)]
                kl.append(ref_kl(q, student))
            elif topk:
                top = sorted(range(V), key=lambda i: zt[i], reverse=True)[:topk]
                q_top = [math.exp(v) for v in ref_log_softmax([zt[i] / tau for i in top])]
                kl.append(ref_kl(q_top, [student[i] for i in top]))
            else:
                kl.append(ref_kl(teacher, student))
        rows.append(sum(nll) / len(nll) + lam * tau * tau * sum(kl) / len(kl) if nll else None)
    return rows


def ref_excess_rows(logprobs, ref_logprobs, mask, lam, clip) -> list[float | None]:
    rows = []
    for lp, rlp, m in zip(logprobs, ref_logprobs, mask):
        num = den = 0.0
        for a, r, keep in zip(lp, rlp, m):
            if keep:
                w = 1.0 + lam * min(max(r - a, 0.0), clip) / clip
                num += w * -a
                den += w
        rows.append(num / den if den else None)
    return rows


def ref_power_rows(logprobs, mask, alpha) -> list[float | None]:
    rows = []
    for lp, m in zip(logprobs, mask):
        terms = [(1.0 - math.exp(alpha * a)) / alpha for a, keep in zip(lp, m) if keep]
        rows.append(sum(terms) / len(terms) if terms else None)
    return rows


def ref_nll_rows(logprobs, mask) -> list[float | None]:
    return [(-sum(a for a, k in zip(lp, m) if k) / sum(m)) if any(m) else None for lp, m in zip(logprobs, mask)]


def ref_clusters(vectors, salient, mask, distance) -> list[list[bool]]:
    """NLFT's token_cluster, one row at a time over the row's masked-in tokens."""
    out = []
    for b in range(len(mask)):
        idx = [t for t in range(len(mask[b])) if mask[b][t]]
        row = [vectors[b][t] for t in idx]
        member = [False] * len(idx)

        def dist(c, v):
            dot = sum(x * y for x, y in zip(c, v))
            norms = math.sqrt(sum(x * x for x in c)) * math.sqrt(sum(y * y for y in v))
            return 1.0 - dot / max(norms, 1e-8)

        for s in range(len(idx)):
            if not salient[b][idx[s]]:
                continue
            centre = row[s]
            j = s - 1
            while j >= 0 and dist(centre, row[j]) > distance:
                member[j] = True
                centre = [(x + y) / 2 for x, y in zip(centre, row[j])]
                j -= 1
            j = s + 1
            while j < len(idx) and dist(centre, row[j]) > distance:
                member[j] = True
                centre = [(x + y) / 2 for x, y in zip(centre, row[j])]
                j += 1
            member[s] = True
        full = [False] * len(mask[b])
        for j, t in enumerate(idx):
            full[t] = member[j]
        out.append(full)
    return out


# --------------------------------------------------------------------------- random inputs


def logits_case(seed: int, B: int = 4, T: int = 6, V: int = 11):
    """float64 logits of both paths at the target positions, target ids, a ragged mask
    with one row without tokens (row 2); the reference path is sharper and often right."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    ref = 3.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ref.scatter_add_(-1, ids[..., None], 4.0 * torch.rand(B, T, 1, generator=g, dtype=torch.float64))
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[2] = T, 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logits, ref, ids, mask


def logprobs_of(logits, ids):
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def assert_rows(rows, valid, expected):
    assert valid.tolist() == [e is not None for e in expected]
    for got, want in zip(rows.tolist(), expected):
        if want is not None:
            assert abs(got - want) <= TOL * max(1.0, abs(want)), (got, want)


# --------------------------------------------------------------------------- kd and smooth


@pytest.mark.parametrize("lam,tau,topk,smooth", [
    (1.0, 1.0, 0, False), (0.5, 2.0, 0, False), (1.0, 1.0, 3, False), (2.0, 0.5, 1, False),
    (1.0, 1.0, 11, False), (1.0, 1.0, 0, True), (0.3, 2.0, 0, True),
], ids=["default", "tau2", "top3", "top1-tau-half", "topV", "smooth", "smooth-tau2"])
@pytest.mark.parametrize("seed", SEEDS)
def test_kd_matches_reference(seed, lam, tau, topk, smooth):
    # Prepare
    logits, ref, ids, mask = logits_case(seed)
    expected = ref_kd_rows(logits.tolist(), ref.tolist(), ids.tolist(), mask.tolist(), lam, tau, topk, smooth)

    # Execute
    tl = kd_token_loss(logits, ref, ids, mask, lam, tau, topk, smooth=smooth)

    # Assert
    assert_rows(tl.rows, tl.valid, expected)
    assert tl.stats["tokens"] == int(mask.sum())
    assert tl.stats["kl"] >= -1e-12
    assert abs(tl.stats["nll"] + float(logprobs_of(logits, ids)[mask].mean())) <= TOL


def test_kd_top_v_is_the_full_kl():
    logits, ref, ids, mask = logits_case(5)
    full = kd_token_loss(logits, ref, ids, mask, 1.0, 1.5, 0)
    top_all = kd_token_loss(logits, ref, ids, mask, 1.0, 1.5, logits.shape[-1])
    assert torch.allclose(full.rows, top_all.rows, atol=1e-12, rtol=0)


def test_smooth_differs_from_kd_only_off_the_target():
    # a teacher that is uniform off the target carries no dark knowledge: kd == smooth there
    logits, ref, ids, mask = logits_case(6)
    flat = torch.zeros_like(ref).scatter(-1, ids[..., None], 3.0)
    kd = kd_token_loss(logits, flat, ids, mask, 1.0, 1.0)
    smooth = kd_token_loss(logits, flat, ids, mask, 1.0, 1.0, smooth=True)
    assert torch.allclose(kd.rows, smooth.rows, atol=1e-12, rtol=0)
    # ... and differ for the real teacher
    assert not torch.allclose(kd_token_loss(logits, ref, ids, mask).rows,
                              kd_token_loss(logits, ref, ids, mask, smooth=True).rows)


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_kd_with_lambda_zero_is_the_plain_nll(seed, smooth):
    logits, ref, ids, mask = logits_case(seed)
    sft = sft_token_loss(logprobs_of(logits, ids), mask)
    tl = kd_token_loss(logits, ref, ids, mask, lam=0.0, tau=2.0, smooth=smooth)
    assert torch.equal(tl.valid, sft.valid)
    assert torch.equal(tl.rows[tl.valid], sft.rows[sft.valid])


# --------------------------------------------------------------------------- excess and power


@pytest.mark.parametrize("lam,clip", [(1.0, 2.0), (3.0, 0.5), (0.25, 10.0)])
@pytest.mark.parametrize("seed", SEEDS)
def test_excess_matches_reference(seed, lam, clip):
    logits, ref, ids, mask = logits_case(seed)
    lp, rlp = logprobs_of(logits, ids), logprobs_of(ref, ids)
    expected = ref_excess_rows(lp.tolist(), rlp.tolist(), mask.tolist(), lam, clip)
    tl = excess_token_loss(lp, rlp, mask, lam, clip)
    assert_rows(tl.rows, tl.valid, expected)
    assert 1.0 <= tl.stats["weight_mean"] <= 1.0 + lam
    assert 0.0 < tl.stats["frac_upweighted"] <= 1.0  # the sharper reference wins somewhere


@pytest.mark.parametrize("seed", SEEDS)
def test_excess_with_lambda_zero_is_the_plain_nll(seed):
    logits, ref, ids, mask = logits_case(seed)
    lp = logprobs_of(logits, ids)
    sft = sft_token_loss(lp, mask)
    tl = excess_token_loss(lp, logprobs_of(ref, ids), mask, lam=0.0)
    assert torch.equal(tl.valid, sft.valid)
    assert torch.equal(tl.rows[tl.valid], sft.rows[sft.valid])


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_power_matches_reference(seed, alpha):
    logits, _, ids, mask = logits_case(seed)
    lp = logprobs_of(logits, ids)
    tl = power_token_loss(lp, mask, alpha)
    assert_rows(tl.rows, tl.valid, ref_power_rows(lp.tolist(), mask.tolist(), alpha))
    assert abs(tl.stats["weight_mean"] - float((alpha * lp[mask]).exp().mean())) <= TOL


def test_power_tends_to_the_nll_and_has_dft_gradient_at_alpha_one():
    logits, _, ids, mask = logits_case(3)
    lp = logprobs_of(logits, ids)
    near_zero = power_token_loss(lp, mask, 1e-7)
    sft = sft_token_loss(lp, mask)
    assert torch.allclose(near_zero.rows[sft.valid], sft.rows[sft.valid], rtol=1e-5, atol=0)
    # alpha = 1: d/d(log P) of (1 - P) is -P, i.e. the gradient of -sg(P) log P (DFT)
    x = lp.clone().requires_grad_(True)
    power_token_loss(x, mask, 1.0).total.backward()
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    assert torch.allclose(x.grad, torch.where(mask, -lp.exp() / n, 0.0), atol=1e-15, rtol=0)


# --------------------------------------------------------------------------- nlft


def cluster_case(seed: int, B: int = 3, T: int = 10, D: int = 4):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    vectors[:, ::3] += 2.0  # some neighbours alike, some not
    p_ref = torch.rand(B, T, generator=g, dtype=torch.float64)
    p_ref = torch.where(torch.rand(B, T, generator=g) < 0.3, 0.96 + 0.04 * p_ref, 0.9 * p_ref + 1e-3)
    lengths = torch.tensor([T, T - 3, 0])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logprobs = torch.log(torch.rand(B, T, generator=g, dtype=torch.float64) * 0.98 + 0.01)
    return logprobs, p_ref, vectors, mask


@pytest.mark.parametrize("distance", [0.4, 0.1, 1.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_nlft_clusters_match_reference(seed, distance):
    _, p_ref, vectors, mask = cluster_case(seed)
    mask[0, 4] = False  # a hole: clusters run over the row's masked-in tokens
    salient = (p_ref > 0.95) & mask
    got = nlft_clusters(vectors, salient, mask, distance)
    assert got.tolist() == ref_clusters(vectors.tolist(), salient.tolist(), mask.tolist(), distance)
    assert not got[~mask].any() and got[salient].all()


def test_nlft_clusters_gather_dissimilar_neighbours_as_the_released_code_does():
    # Prepare: salient token 2; tokens 1 and 3 point away from it, tokens 0 and 4 along it
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    vectors = torch.tensor([[e0, e1, e0, e1, e0]], dtype=torch.float64)
    salient = torch.tensor([[False, False, True, False, False]])
    mask = torch.ones(1, 5, dtype=torch.bool)

    # Execute
    got = nlft_clusters(vectors, salient, mask, 0.4)

    # Assert: the orthogonal left neighbour (distance 1 > 0.4) joins; the centre becomes
    # (e0 + e1) / 2, at distance 1 - cos 45deg = 0.29 from token 0, which stops the left
    # sweep; the right sweep starts from that carried centre, 0.29 from token 3 too: stop
    assert got.tolist() == [[False, True, True, False, False]]
    # with the centre alone (no left neighbour to absorb), the right neighbour joins
    assert nlft_clusters(vectors[:, 2:], salient[:, 2:], mask[:, 2:], 0.4).tolist() == [[True, True, False]]


@pytest.mark.parametrize("rule", ["paper", "nlft"])
@pytest.mark.parametrize("seed", SEEDS)
def test_nlft_loss_is_eq17_plus_the_plain_nll(seed, rule):
    # Prepare
    logprobs, p_ref, vectors, mask = cluster_case(seed)
    base_vectors = vectors.flip(1)
    cfg = LossConfig(loss="nlft", sim_rule=rule)
    eq17 = lesft_token_loss(logprobs, p_ref, vectors, mask, LossConfig(sim_rule=rule), cluster_vectors=base_vectors)
    if rule == "nlft":
        salient = (p_ref > 0.95) & mask
        members = ref_clusters(base_vectors.tolist(), salient.tolist(), mask.tolist(), 0.4)
        want = [[0 if not m else SALIENT if s else SUBSALIENT if c else 0 for m, s, c in zip(mr, sr, cr)]
                for mr, sr, cr in zip(mask.tolist(), salient.tolist(), members)]
        assert eq17.classes.tolist() == want
        gammas = LossConfig().gammas
        weights = [[ref_weight(p, c, 0.95, gammas) for p, c in zip(pr, cr)] for pr, cr in zip(p_ref.tolist(), want)]
        want_rows = [(-sum(w * a for w, a, k in zip(wr, lr, mr) if k) / sum(mr)) if any(mr) else None
                     for wr, lr, mr in zip(weights, logprobs.tolist(), mask.tolist())]
        assert_rows(eq17.rows, eq17.valid, want_rows)

    # Execute
    tl = lesft_token_loss(logprobs, p_ref, vectors, mask, cfg, cluster_vectors=base_vectors)

    # Assert
    nll = ref_nll_rows(logprobs.tolist(), mask.tolist())
    assert_rows(tl.rows, tl.valid, [None if n is None else e + n for e, n in zip(eq17.rows.tolist(), nll)])
    assert torch.equal(tl.classes, eq17.classes)


# --------------------------------------------------------------------------- through the engine


def loss_config(**kw):
    return build_config(cli=dict(method="lesft", **kw), env={})


VARIANTS = [dict(loss="lesft"), dict(loss="nlft"), dict(loss="nlft", sim_rule="nlft"), dict(loss="kd"),
            dict(loss="kd", kd_topk=3), dict(loss="smooth"), dict(loss="excess"), dict(loss="power"),
            dict(loss="lesft", sim_vectors="lm_head")]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_no_gradient_reaches_the_reference_path(kw):
    # Prepare: both paths as leaves that require grad
    cfg = loss_config(**kw)
    logits, ref, ids, mask = logits_case(1)
    g = torch.Generator().manual_seed(0)
    z = logits.clone().requires_grad_(True)
    ref_z = ref.clone().requires_grad_(True)
    hidden = torch.randn(*ids.shape, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    ref_h = torch.randn(*ids.shape, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    head = torch.randn(logits.shape[-1], 5, generator=g, dtype=torch.float64).requires_grad_(True)

    # Execute
    tl = loss.token_loss(get_method("lesft"), cfg, z, mask, hidden, (ref_z, ref_h), head, ids)
    tl.total.backward()

    # Assert: the trained path gets a gradient, nothing on the reference side does
    assert z.grad is not None and torch.count_nonzero(z.grad) > 0
    for t in (ref_z, ref_h, head, hidden):
        assert t.grad is None or torch.count_nonzero(t.grad) == 0


def test_engine_dispatch_matches_the_pure_functions():
    logits, ref, ids, mask = logits_case(2)
    h = torch.zeros(*ids.shape, 3, dtype=torch.float64)
    method = get_method("lesft")

    def run(**kw):
        return loss.token_loss(method, loss_config(**kw), logits, mask, h, (ref, h), None, ids).rows

    lp, ref_lp = target_logprobs(logits, ids), target_logprobs(ref, ids)  # what the engine feeds the losses
    assert torch.equal(run(loss="kd", kd_lambda=0.5, kd_tau=2.0), kd_token_loss(logits, ref, ids, mask, 0.5, 2.0).rows)
    assert torch.equal(run(loss="smooth"), kd_token_loss(logits, ref, ids, mask, smooth=True).rows)
    assert torch.equal(run(loss="excess", excess_clip=1.0), excess_token_loss(lp, ref_lp, mask, 1.0, 1.0).rows)
    assert torch.equal(run(loss="power", power_alpha=0.5), power_token_loss(lp, mask, 0.5).rows)
    assert torch.equal(run(loss="nlft"), lesft_token_loss(lp, ref_lp.exp(), h, mask, LossConfig(loss="nlft")).rows)
    with pytest.raises(ValueError, match="reference path"):
        loss.token_loss(method, loss_config(loss="kd"), logits, mask, h, None, None, ids)


# --------------------------------------------------------------------------- the base-model teacher


def test_adapters_disabled_runs_the_base_model_and_restores_the_adapters():
    from lesft.models import resolve
    from lesft.split import ClientModel

    source = resolve("arch:tiny-qwen2")
    cfg = loss_config()
    plain = ClientModel(source, 2).eval()
    part = lora.add_lora(ClientModel(source, 2), cfg.lora).eval()
    with torch.no_grad():
        for name, p in lora.adapter_params(part).items():
            p.normal_(0, 0.1)
    ids = torch.randint(2, 400, (2, 7), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    with torch.no_grad():
        want = plain(ids, am)
        live = part(ids, am)
        with lora.adapters_disabled(part):
            off = part(ids, am)
        again = part(ids, am)
    assert torch.equal(off, want)
    assert not torch.allclose(live, want, atol=1e-4)
    assert torch.equal(again, live)
    assert all(p.requires_grad for p in lora.adapter_params(part).values())


@pytest.mark.parametrize("teacher", ["base", "live"])
def test_ref_teacher_base_gives_the_logits_of_the_model_without_adapters(tmp_path, teacher):
    # Prepare: a client and the server with non-zero LoRA B on both sides
    from lesft.batching import target_positions
    from lesft.loss import gather_positions
    from lesft.models import resolve
    from lesft.split import FullModel
    from lesft.trainer import client_shards

    cfg = build_config(cli=dict(model="arch:tiny-qwen2", method="lesft", loss="kd", ref_teacher=teacher, clients=1,
                                samples_per_client=2, batch_size=2, max_length=64, runs_dir=str(tmp_path),
                                device="cpu"), env={})
    source = resolve(cfg.model.model)
    tok = source.load_tokenizer()
    method = get_method("lesft")
    client = engine.ClientParty(cfg, source, method, 0, client_shards(cfg)[0], tok)
    server = engine.ServerParty(cfg, source, method)
    with torch.no_grad():
        for part in (client.part, server.part):
            for p in lora.adapter_params(part).values():
                p.normal_(0, 0.1)
    full = FullModel(source).eval()
    batch = client.batch(0)

    # Execute
    rows = client.forward(0)
    ref_logits, _ = server.reference(rows)

    # Assert: base teacher == the full model without adapters at the reference path's target positions
    with torch.no_grad():
        logits = full(batch.ref.input_ids, batch.ref.attention_mask)
    pos, mask = target_positions(batch.ref.y_start, batch.y_len, batch.targets.shape[1])
    want = gather_positions(logits, pos)
    close = torch.allclose(ref_logits[mask], want[mask], atol=1e-4, rtol=1e-4)
    assert close == (teacher == "base")


def test_ref_teacher_is_part_of_the_run_fingerprint():
    from lesft.models import resolve

    source = resolve("arch:tiny-qwen2")
    live, parts = engine.run_fingerprint(loss_config(loss="kd", model="arch:tiny-qwen2"), source)
    base, base_parts = engine.run_fingerprint(loss_config(loss="kd", ref_teacher="base", model="arch:tiny-qwen2"),
                                              source)
    power, _ = engine.run_fingerprint(loss_config(loss="power", model="arch:tiny-qwen2"), source)
    assert live != base and live != power
    assert (parts["ref_teacher"], base_parts["ref_teacher"], parts["loss"]) == ("live", "base", "kd")


# --------------------------------------------------------------------------- settings


def test_loss_settings_reach_the_config_from_flags_env_and_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[loss]\nloss = "excess"\nexcess_clip = 1.5\n')
    assert build_config(toml=toml, env={}).loss.loss == "excess"
    assert build_config(toml=toml, env={}).loss.excess_clip == 1.5
    assert build_config(env={"LESFT_LOSS": "kd", "LESFT_KD_TAU": "2"}).loss.kd_tau == 2.0
    cfg = build_config(cli=dict(loss="kd", ref_teacher="base", kd_topk="5"), env={})
    assert (cfg.loss.loss, cfg.loss.ref_teacher, cfg.loss.kd_topk) == ("kd", "base", 5)
    assert cfg.replace(loss="power", ref_teacher="live").loss.loss == "power"
    assert build_config(cli=dict(loss="kd"), env={}).to_toml().count('loss = "kd"') == 1
    cfg.save(tmp_path / "config.json")  # a run's config.json reads back (group and leaf share the name)
    assert Config.load(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("kw,match", [
    (dict(loss="dft"), "loss='dft' is not valid"),
    (dict(ref_teacher="frozen"), "ref_teacher='frozen'"),
    (dict(sim_rule="x"), "sim_rule='x'"),
    (dict(kd_tau=0), "kd_tau=0.0 is not valid"),
    (dict(kd_lambda=-1), "kd_lambda=-1.0"),
    (dict(loss="kd", kd_topk=-2), "kd_topk=-2"),
    (dict(excess_clip=0), "excess_clip=0.0"),
    (dict(power_alpha=0), "power_alpha=0.0"),
    (dict(nlft_distance=3), "nlft_distance=3.0"),
    (dict(loss="kd", paths="base"), "needs the reference path"),
    (dict(loss="excess", paths="reference"), "needs the reference path"),
    (dict(loss="power", ref_teacher="base"), "does not use"),
    (dict(loss="lesft", paths="base", ref_teacher="base"), "does not use"),
    (dict(loss="nlft", lesft_nll_mix=1), "lesft_nll_mix applies to loss=lesft"),
    (dict(loss="kd", method="splitlora"), "applies to method lesft"),
    (dict(ref_teacher="base", method="fedavg"), "applies to method lesft"),
])
def test_bad_loss_settings_are_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_config(cli=kw, env={})
    assert "\n" not in str(e.value)


def test_single_path_ablations_accept_the_self_weighted_variants():
    for kw in (dict(loss="nlft", paths="base"), dict(loss="power", paths="reference"),
               dict(loss="lesft", sim_rule="nlft", paths="base")):
        cfg = build_config(cli=kw, env={})
        assert not cfg.loss.uses_reference
    assert not build_config(cli=dict(loss="power"), env={}).loss.uses_reference
    assert build_config(cli=dict(loss="kd"), env={}).loss.uses_reference
