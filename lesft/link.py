"""The edge-link emulator's maths: when a frame sent over a slow link arrives.

One :class:`Link` is one bottleneck link in one direction (a client's uplink or its
downlink): a frame of ``n`` bytes handed to it at time ``t`` starts once the link is free,
occupies it for ``n * 8 / rate`` seconds, and arrives ``latency`` seconds after it left::

    due = max(t, free_at) + n * 8 / rate + latency

so back-to-back frames queue behind each other and a link never reorders. :class:`Shaper`
holds one link per (direction, peer) and the frames waiting on them; the broker
(:mod:`broker.proxy`) hands it frames and the time, sends what is due, and polls until
:meth:`Shaper.next_due`. No sockets and no clock here: the caller owns both, which is
why the rules are unit-tested with a fake clock.
"""

from __future__ import annotations

import heapq
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Hashable

_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmg]?bit)\s*$", re.IGNORECASE)
DIRECTIONS = ("up", "down")  # up: client -> server; down: server -> client


def parse_rate(text: str) -> float | None:
    """``"4mbit"`` -> 4e6 bit/s (units bit, kbit, mbit, gbit: powers of 1000, as ``tc``);
    ``""`` -> None (unshaped). A bad value raises ``ValueError`` naming the accepted forms."""
    if not text.strip():
        return None
    m = _RATE.match(text)
    rate = float(m.group(1)) * _UNITS[m.group(2).lower()] if m else 0.0
    if rate <= 0:
        raise ValueError(f"{text!r} is not a link rate: use a positive number and a unit, "
                         "e.g. 500kbit, 4mbit, 20mbit, 1gbit (or leave it empty for an unshaped link)")
    return rate


@dataclass
class Link:
    """One direction of one peer's bottleneck: ``rate`` in bit/s (None: no serialisation
    delay) and a one-way ``latency`` in seconds."""

    rate: float | None
    latency: float
    free_at: float = float("-inf")

    def send(self, nbytes: int, now: float) -> float:
        """Occupy the link with a frame of ``nbytes`` handed over at ``now``; its arrival time."""
        start = max(now, self.free_at)
        self.free_at = start + (nbytes * 8 / self.rate if self.rate else 0.0)
        return self.free_at + self.latency


@dataclass
class Shaper:
    """Frames waiting on per-peer links until they are due, released in due order (a
    link's own frames in the order they were handed over)."""

    up: float | None
    down: float | None
    latency: float
    links: dict[tuple[str, Hashable], Link] = field(default_factory=dict)
    _heap: list = field(default_factory=list)
    _seq: Any = field(default_factory=itertools.count)

    @property
    def active(self) -> bool:
        """Whether the links delay anything at all (else the broker forwards at once)."""
        return bool(self.up or self.down or self.latency > 0)

    def push(self, direction: str, peer: Hashable, nbytes: int, item: Any, now: float) -> float:
        """Hand ``item`` (``nbytes`` on the wire) to ``peer``'s link in ``direction``; its due time."""
        key = (direction, peer)
        link = self.links.get(key)
        if link is None:
            self._forget_idle(now)
            link = self.links[key] = Link(self.up if direction == "up" else self.down, self.latency)
        due = link.send(nbytes, now)
        heapq.heappush(self._heap, (due, next(self._seq), item))
        return due

    def pop_due(self, now: float) -> list:
        """The items due at ``now``, in due order (ties in hand-over order)."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def next_due(self) -> float | None:
        """When the next waiting item is due (None: nothing waits)."""
        return self._heap[0][0] if self._heap else None

    def _forget_idle(self, now: float) -> None:
        """Drop links that carry nothing any more, so peers that come and go (a reconnecting
        client gets a new routing id) do not grow the table without bound."""
        if len(self.links) >= 1024:
            self.links = {k: v for k, v in self.links.items() if v.free_at > now}
