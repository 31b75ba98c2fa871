"""The methods of the paper's tables as a small table of switches (DESIGN.md sec. 2).

One training loop serves them all; a method only says where the model is cut, which
side trains, which loss and whether client adapters are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

from lesft.config import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    label: str            # as the paper's tables name it
    split: bool           # client/server split over the wire (False: each client holds the whole model)
    client_trains: bool   # client LoRA trained (False: forward only, no gradient returned)
    loss: str             # "lesft" (dual-path token-weighted) or "sft"
    aggregate: bool       # FedAvg of client adapters every I rounds
    centralized: bool = False  # one party over all data


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lesft", "LESFT (Ours)", split=True, client_trains=True, loss="lesft", aggregate=True),
    Method("splitlora", "SplitLoRA", split=True, client_trains=True, loss="sft", aggregate=True),
    Method("sl", "SL", split=True, client_trains=True, loss="sft", aggregate=False),
    Method("splitfrozen", "SplitFrozen", split=True, client_trains=False, loss="sft", aggregate=False),
    Method("fedavg", "FedAvg", split=False, client_trains=True, loss="sft", aggregate=True),
    Method("centralized", "Centralized SFT", split=False, client_trains=True, loss="sft", aggregate=False,
           centralized=True),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: use one of {', '.join(METHODS)}.")
    return METHODS[name]
