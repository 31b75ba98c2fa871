"""Tests for lesft.aggregate.fedavg: hand-computed weighted averages (paper eq. 10-11),
A and B averaged separately, rejections, order independence."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from lesft.aggregate import fedavg
from lesft.lora import AdapterError

A, B = "layers.0.mlp.up_proj.lora_A", "layers.0.mlp.up_proj.lora_B"


def upload(a, b) -> dict[str, torch.Tensor]:
    return {A: torch.tensor(a, dtype=torch.float32), B: torch.tensor(b, dtype=torch.float32)}


def test_weighted_average_by_hand():
    # Prepare: n = 1 and 3 -> weights 0.25 and 0.75
    first = upload([[1.0, 2.0], [3.0, 4.0]], [[0.0], [8.0]])
    second = upload([[5.0, 6.0], [7.0, 8.0]], [[4.0], [0.0]])

    # Execute
    out = fedavg([(first, 1), (second, 3)])

    # Assert
    assert out.keys() == {A, B}
    assert_close(out[A], torch.tensor([[4.0, 5.0], [6.0, 7.0]]), atol=0, rtol=0)
    assert_close(out[B], torch.tensor([[3.0], [2.0]]), atol=0, rtol=0)
    assert all(t.dtype == torch.float32 for t in out.values())


def test_a_and_b_are_averaged_separately_not_their_product():
    # Prepare
    first, second = upload([[1.0, 0.0]], [[1.0]]), upload([[0.0, 1.0]], [[3.0]])

    # Execute
    out = fedavg([(first, 2), (second, 2)])

    # Assert
    assert_close(out[A], torch.tensor([[0.5, 0.5]]), atol=0, rtol=0)
    assert_close(out[B], torch.tensor([[2.0]]), atol=0, rtol=0)
    product_average = 0.5 * (first[B] @ first[A]) + 0.5 * (second[B] @ second[A])
    assert not torch.allclose(out[B] @ out[A], product_average)


def test_three_clients_and_one_client():
    g = torch.Generator().manual_seed(0)
    ups = [({A: torch.randn(4, 3, generator=g), B: torch.randn(5, 4, generator=g)}, n) for n in (2, 5, 1)]
    out = fedavg(ups)
    for key in (A, B):
        expected = sum(u[key].double() * n for u, n in ups) / 8
        assert_close(out[key], expected.float(), atol=1e-7, rtol=0)
    alone = fedavg([ups[0]])
    assert all(torch.equal(alone[k], ups[0][0][k]) for k in (A, B))


def test_inputs_are_not_modified():
    first, second = upload([[1.0]], [[2.0]]), upload([[3.0]], [[4.0]])
    copies = [{k: v.clone() for k, v in u.items()} for u in (first, second)]
    out = fedavg([(first, 1), (second, 1)])
    out[A].add_(100.0)
    assert all(torch.equal(u[k], c[k]) for u, c in zip((first, second), copies) for k in (A, B))


def test_order_of_uploads_is_irrelevant():
    # Prepare
    g = torch.Generator().manual_seed(1)
    ups = [({A: torch.randn(8, 64, generator=g), B: torch.randn(128, 8, generator=g)}, n) for n in (3, 1, 7, 2)]
    reference = fedavg(ups)

    # Execute / Assert
    for perm in itertools.permutations(ups):
        out = fedavg(list(perm))
        for key in (A, B):
            assert_close(out[key], reference[key], atol=1e-7, rtol=0)


@pytest.mark.parametrize("n", [0, -1, True, False, 1.5, 2.0, "3", None])
def test_bad_sample_counts_are_rejected(n):
    with pytest.raises(AdapterError):
        fedavg([(upload([[1.0]], [[1.0]]), 1), (upload([[2.0]], [[2.0]]), n)])


def test_nothing_to_aggregate():
    with pytest.raises(AdapterError):
        fedavg([])


@pytest.mark.parametrize("problem", ["missing", "extra", "shape", "nan-second", "nan-first", "inf"])
def test_mismatched_or_non_finite_uploads_are_rejected(problem):
    # Prepare
    good = upload([[1.0, 2.0]], [[3.0]])
    bad = upload([[1.0, 2.0]], [[3.0]])
    first = good
    if problem == "missing":
        del bad[B]
    elif problem == "extra":
        bad["layers.1.mlp.up_proj.lora_A"] = torch.zeros(1, 2)
    elif problem == "shape":
        bad[A] = torch.zeros(1, 3)
    elif problem == "nan-second":
        bad[A][0, 1] = float("nan")
    elif problem == "nan-first":
        first, bad = bad, good
        first[B][0, 0] = float("nan")
    else:
        bad[B][0, 0] = float("-inf")

    # Execute / Assert
    with pytest.raises(AdapterError) as info:
        fedavg([(first, 1), (bad, 1)])
    assert "\n" not in str(info.value)
