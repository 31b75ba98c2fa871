"""The edge-link emulator's scheduler (lesft/link.py) with a fake clock."""

import pytest

from lesft.config import build_config
from lesft.errors import ConfigError
from lesft.link import Link, Shaper, parse_rate

MBIT = 1e6


@pytest.mark.parametrize("text, rate", [("4mbit", 4e6), ("20MBit", 20e6), ("500kbit", 5e5), ("1gbit", 1e9),
                                        ("2.5mbit", 2.5e6), ("800bit", 800.0), (" 4 mbit ", 4e6)])
def test_rates_parse_in_powers_of_1000(text, rate):
    assert parse_rate(text) == rate


def test_empty_rate_is_unshaped_and_bad_ones_name_the_forms():
    assert parse_rate("") is None
    for bad in ("4mb", "fast", "0mbit", "-1mbit", "4 mbit/s"):
        with pytest.raises(ValueError, match="e.g. 500kbit, 4mbit"):
            parse_rate(bad)


def test_config_checks_the_link_flags_in_one_line():
    cfg = build_config(cli={"link_up": "4mbit", "link_down": "20mbit", "link_latency_ms": 50}, env={})
    assert cfg.net.link_rates == (4e6, 20e6) and cfg.net.link_latency_ms == 50
    with pytest.raises(ConfigError, match="^link_down: '20 Mbps' is not a link rate"):
        build_config(cli={"link_down": "20 Mbps"}, env={})
    with pytest.raises(ConfigError, match="link_latency_ms=-1.0"):
        build_config(cli={"link_latency_ms": -1}, env={})
    assert not Shaper(*build_config(cli={}, env={}).net.link_rates, 0.0).active


def test_a_frame_is_due_after_its_serialisation_plus_latency():
    link = Link(rate=4 * MBIT, latency=0.05)
    assert link.send(50_000, now=10.0) == pytest.approx(10.0 + 50_000 * 8 / 4e6 + 0.05)  # 10.15


def test_back_to_back_frames_queue_and_an_idle_link_starts_fresh():
    link = Link(rate=8 * MBIT, latency=0.01)
    first = link.send(100_000, now=0.0)   # 0.1 s on the wire
    second = link.send(100_000, now=0.02)  # waits for the first to leave at 0.1
    assert first == pytest.approx(0.11) and second == pytest.approx(0.21)
    assert link.send(1000, now=5.0) == pytest.approx(5.0 + 0.001 + 0.01)


def test_unshaped_rate_adds_only_the_latency():
    assert Link(rate=None, latency=0.05).send(10**9, now=1.0) == pytest.approx(1.05)


def test_shaper_releases_in_order_and_only_when_due():
    sh = Shaper(up=8 * MBIT, down=None, latency=0.0)
    dues = [sh.push("up", b"c0", 100_000, i, now=0.0) for i in range(3)]  # 0.1, 0.2, 0.3
    assert dues == pytest.approx([0.1, 0.2, 0.3])
    assert sh.pop_due(0.05) == [] and sh.next_due() == pytest.approx(0.1)
    assert sh.pop_due(0.25) == [0, 1]
    assert sh.pop_due(1.0) == [2] and sh.next_due() is None


def test_links_of_clients_and_directions_are_independent():
    sh = Shaper(up=8 * MBIT, down=80 * MBIT, latency=0.02)
    a = sh.push("up", b"c0", 1_000_000, "a0", now=0.0)  # 1 s of c0's uplink
    b = sh.push("up", b"c1", 1_000, "b0", now=0.0)      # c1's own uplink is free
    d = sh.push("down", b"c0", 1_000_000, "d0", now=0.0)  # c0's downlink: 10x faster
    assert a == pytest.approx(1.02) and b == pytest.approx(0.021) and d == pytest.approx(0.12)
    assert sh.pop_due(2.0) == ["b0", "d0", "a0"]


def test_equal_due_times_keep_hand_over_order():
    sh = Shaper(up=None, down=None, latency=0.05)
    for i in range(5):
        sh.push("up", b"c0", 10, i, now=1.0)
    assert sh.pop_due(2.0) == [0, 1, 2, 3, 4]


def test_many_peers_that_left_do_not_grow_the_table():
    sh = Shaper(up=8 * MBIT, down=None, latency=0.0)
    for i in range(3000):
        sh.push("up", i, 1000, i, now=float(i))  # each link is idle again 1 ms later
    assert len(sh.links) <= 1024
    assert sh.pop_due(1e9) == list(range(3000))
