"""The methods of the paper's tables as a small table of switches (DESIGN.md sec. 2).

One training loop serves them all; a method only says where the model is cut, which
side trains, which loss and whether client adapters are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

from lesft.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    label: str            # as the paper's tables name it
    split: bool           # client/server split over the wire (False: each client holds the whole model)
    client_trains: bool   # client LoRA trained (False: forward only, no gradient returned)
    loss: str             # "lesft" (dual-path token-weighted) or "sft"
    aggregate: bool       # FedAvg of client adapters every I rounds
    centralized: bool = False  # one party over all data
    table_row: int = 0    # its row in the paper's tables (benchmarks list methods in that order)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lesft", "LESFT (Ours)", split=True, client_trains=True, loss="lesft", aggregate=True, table_row=6),
    Method("splitlora", "SplitLoRA", split=True, client_trains=True, loss="sft", aggregate=True, table_row=3),
    Method("sl", "SL", split=True, client_trains=True, loss="sft", aggregate=False, table_row=2),
    Method("splitfrozen", "SplitFrozen", split=True, client_trains=False, loss="sft", aggregate=False, table_row=4),
    Method("fedavg", "FedAvg", split=False, client_trains=True, loss="sft", aggregate=True, table_row=5),
    Method("centralized", "Centralized SFT", split=False, client_trains=True, loss="sft", aggregate=False,
           centralized=True, table_row=1),
)}


def table_order() -> tuple[str, ...]:
    """The method names in the order of the paper's tables (``centralized`` first, ``lesft`` last)."""
    return tuple(sorted(METHODS, key=lambda name: METHODS[name].table_row))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: use one of {', '.join(METHODS)}.")
    return METHODS[name]
