"""Client adapter aggregation (paper eq. 10-11): the |D_i|/|D|-weighted average.

A pure function on tensor dicts, like Flower's ``aggregate``: the aggregator process and
the in-process trainer both call it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from lesft.lora import AdapterError, check_adapters


def fedavg(uploads: Sequence[tuple[Mapping[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """``sum_i n_i / sum_j n_j * Theta_i`` for uploads ``(adapters, n_samples)``.

    A and B matrices are averaged separately, each key on its own, as the paper does.
    Every upload must have the same keys and shapes, finite values and ``n_samples > 0``.
    The sum runs in the order given (callers sort by client id, so it is reproducible).
    """
    if not uploads:
        raise AdapterError("no adapters to aggregate")
    for _, n in uploads:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise AdapterError(f"n_samples={n!r} is not a positive integer")
    reference = uploads[0][0]
    for adapters, _ in uploads:
        check_adapters(adapters, reference)
    total = float(sum(n for _, n in uploads))
    out: dict[str, torch.Tensor] = {}
    for key in reference:
        acc = torch.zeros(reference[key].shape, dtype=torch.float64)
        for adapters, n in uploads:
            acc += adapters[key].detach().to("cpu", torch.float64) * (n / total)
        out[key] = acc.to(torch.float32)
    return out
