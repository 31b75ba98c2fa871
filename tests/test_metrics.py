"""Tests for lesft.metrics: Meter counting, fake-clock phase timing, JSONL files, run summary."""

import json
import logging
import math

import numpy as np
import pytest
import torch

from lesft import metrics
from lesft.metrics import JsonlWriter, Meter, read_jsonl, summarize_run, to_jsonable


class FakeClock:
    """Stands in for time.perf_counter: time moves only when a test says so."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", fake)
    return fake


def test_bytes_and_messages_are_counted_per_type():
    meter = Meter("client", 3)
    meter.sent("FORWARD", 1000)
    meter.sent("FORWARD", 500)
    meter.sent("UPLOAD", 64)
    meter.received("BACKWARD", 700)
    meter.received("BACKWARD", 300)

    snap = meter.snapshot()

    assert snap["bytes_sent"] == {"FORWARD": 1500, "UPLOAD": 64}
    assert snap["msgs_sent"] == {"FORWARD": 2, "UPLOAD": 1}
    assert snap["bytes_received"] == {"BACKWARD": 1000}
    assert snap["msgs_received"] == {"BACKWARD": 2}
    assert snap["total_sent"] == 1564
    assert snap["total_received"] == 1000
    assert snap["role"] == "client" and snap["id"] == 3 and meter.name == "client-3"


def test_negative_byte_count_is_rejected():
    with pytest.raises(ValueError):
        Meter("client", 0).sent("FORWARD", -1)


def test_free_counters():
    meter = Meter("server", 0)
    meter.count("rounds")
    meter.count("rounds")
    meter.count("rejected.BAD_SHAPE", 3)
    assert meter.snapshot()["counters"] == {"rounds": 2, "rejected.BAD_SHAPE": 3}


def test_phase_timing_accumulates_with_fake_clock(clock):
    meter = Meter("client", 0)
    with meter.phase("forward"):
        clock.advance(0.25)
    with meter.phase("backward"):
        clock.advance(1.0)
    with meter.phase("forward"):
        clock.advance(0.5)
    clock.advance(2.0)  # outside any phase: wall time only

    snap = meter.snapshot()

    assert snap["compute_s"] == pytest.approx({"forward": 0.75, "backward": 1.0})
    assert snap["compute_n"] == {"forward": 2, "backward": 1}
    assert snap["wall_s"] == pytest.approx(3.75)


def test_phase_spans_are_kept_only_when_asked_and_taken_once(clock):
    meter = Meter("client", 0)
    with meter.phase("forward"):
        clock.advance(0.25)
    assert meter.take_spans() == []  # off by default: the in-process trainer keeps none
    meter.spans = []
    with meter.phase("forward"):
        clock.advance(0.25)
    clock.advance(1.0)
    with meter.phase("backward"):
        clock.advance(0.5)
    assert meter.take_spans() == [["forward", 100.25, 100.5], ["backward", 101.5, 102.0]]
    assert meter.take_spans() == []


def test_phase_counts_time_when_the_body_raises(clock):
    meter = Meter("server", 0)
    with pytest.raises(RuntimeError):
        with meter.phase("loss"):
            clock.advance(0.125)
            raise RuntimeError("boom")
    assert meter.compute_s["loss"] == pytest.approx(0.125)


def test_phase_with_sync_cuda_on_cpu_does_not_touch_cuda(clock, monkeypatch):
    monkeypatch.setattr(metrics, "_cuda_available", lambda: False)
    monkeypatch.setattr(
        metrics, "_cuda_synchronize", lambda: pytest.fail("synchronised without CUDA")
    )
    meter = Meter("server", 0)
    with meter.phase("forward", sync_cuda=True):
        clock.advance(0.5)
    assert meter.compute_s["forward"] == pytest.approx(0.5)


def test_phase_with_sync_cuda_synchronises_at_both_ends(clock, monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "_cuda_available", lambda: True)
    monkeypatch.setattr(metrics, "_cuda_synchronize", lambda: calls.append(clock.t))
    meter = Meter("server", 0, device="cuda")
    with meter.phase("forward", sync_cuda=True):
        clock.advance(0.5)
    assert calls == [100.0, 100.5]


def test_memory_figures_are_positive_and_cuda_none_on_cpu():
    meter = Meter("aggregator", 0)
    meter.sample_memory()
    snap = meter.snapshot()
    assert snap["current_rss_mb"] > 0
    assert snap["peak_rss_mb"] >= snap["current_rss_mb"]
    assert snap["cuda_peak_mb"] is None
    assert len(meter.memory_samples) == 1


def test_memory_samples_stay_bounded_and_cover_the_run(clock, monkeypatch):
    monkeypatch.setattr(metrics, "MAX_MEMORY_SAMPLES", 8)
    meter = Meter("client", 0)
    rss = iter(range(1, 101))
    monkeypatch.setattr(meter, "current_rss_mb", lambda: float(next(rss)))
    for _ in range(100):
        meter.sample_memory()
        clock.advance(1.0)

    samples = meter.memory_samples

    assert len(samples) < 8
    assert samples[0] == (0.0, 1.0)  # the start is kept, not only the tail
    assert samples[-1][0] >= 80.0
    assert meter._rss_max_mb == 100.0  # the max sees every sample, kept or not


def test_snapshot_is_json_dumpable():
    meter = Meter("client", 1)
    meter.sent("FORWARD", 10)
    with meter.phase("forward"):
        pass
    meter.count("rounds")
    meter.sample_memory()
    json.loads(json.dumps(meter.snapshot(), allow_nan=False))


def test_to_jsonable_converts_numpy_torch_and_non_finite():
    rec = {
        "a": np.float32(1.5),
        "b": np.int64(7),
        "c": torch.tensor(2.0),
        "d": torch.tensor([1, 2]),
        "e": float("nan"),
        "f": (1, float("inf")),
        "g": np.array([[1.0, 2.0]]),
        3: "int key",
    }
    out = to_jsonable(rec)
    assert out == {"a": 1.5, "b": 7, "c": 2.0, "d": [1, 2], "e": None, "f": [1, None],
                   "g": [[1.0, 2.0]], "3": "int key"}
    json.dumps(out, allow_nan=False)


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "runs" / "r1" / "client-0.jsonl"  # parents do not exist yet
    writer = JsonlWriter(path)
    writer.write({"event": "round", "round": 1, "loss": np.float64(0.5)})
    writer.write({"event": "final", "time": 123.0, "loss": torch.tensor(0.25)})
    writer.close()

    records = read_jsonl(path)

    assert len(records) == 2
    assert records[0]["loss"] == 0.5 and isinstance(records[0]["time"], float)
    assert records[1] == {"event": "final", "time": 123.0, "loss": 0.25}
    assert len(path.read_text().splitlines()) == 2


def test_jsonl_writer_appends_and_flushes_each_line(tmp_path):
    path = tmp_path / "server-0.jsonl"
    with JsonlWriter(path) as writer:
        writer.write({"n": 1})
        assert len(read_jsonl(path)) == 1  # visible before close: flushed
    with JsonlWriter(path) as writer:
        writer.write({"n": 2})
    assert [r["n"] for r in read_jsonl(path)] == [1, 2]


def test_jsonl_writer_drops_after_close_without_raising(tmp_path, caplog):
    path = tmp_path / "client-0.jsonl"
    writer = JsonlWriter(path)
    writer.write({"n": 1})
    writer.close()
    writer.close()  # idempotent
    with caplog.at_level(logging.WARNING, logger="lesft.metrics"):
        writer.write({"n": 2})
        writer.write({"n": 3})
    assert [r["n"] for r in read_jsonl(path)] == [1]
    assert sum("dropped" in r.message for r in caplog.records) == 1


def test_read_jsonl_skips_a_half_written_tail(tmp_path):
    path = tmp_path / "client-0.jsonl"
    path.write_text('{"n": 1}\n\n{"n": 2}\n{"n": 3, "tr')
    assert read_jsonl(path) == [{"n": 1}, {"n": 2}]


def _write(path, records):
    with JsonlWriter(path) as writer:
        for rec in records:
            writer.write(rec)


def test_summarize_run(tmp_path):
    run = tmp_path / "runs" / "run-1"
    _write(run / "client-0.jsonl", [
        {"event": "round", "total_sent": 1, "wall_s": 1.0},
        {"event": "final", "role": "client", "id": 0, "wall_s": 10.0, "total_sent": 100,
         "total_received": 40, "peak_rss_mb": 200.0, "compute_s": {"forward": 1.0, "backward": 2.0},
         "counters": {"rounds": 5}, "cuda_peak_mb": None},
        {"event": "bye", "wall_s": 11.0},  # after final: ignored
    ])
    _write(run / "client-1.jsonl", [
        {"event": "final", "role": "client", "id": 1, "wall_s": 12.0, "total_sent": 300,
         "total_received": 60, "peak_rss_mb": 400.0, "compute_s": {"forward": 0.5},
         "counters": {"rounds": 5}, "cuda_peak_mb": None},
    ])
    _write(run / "server-0.jsonl", [
        {"event": "round", "wall_s": 5.0, "bytes_sent": {"BACKWARD": 7, "WELCOME": 3},
         "bytes_received": {"FORWARD": 9}, "peak_rss_mb": 900.0, "compute_s": {"forward": 4.0}},
    ])  # no final record: the last record stands in
    (run / "config.json").write_text("{}")
    (run / "eval.jsonl").write_text('{"acc": 0.5}\n')  # not a worker file

    summary = summarize_run(run)

    assert list(summary["workers"]) == ["client-0", "client-1", "server-0"]
    assert summary["workers"]["client-0"]["total_sent"] == 100
    clients = summary["by_role"]["client"]
    assert clients["n"] == 2
    assert clients["bytes_sent"] == 400
    assert clients["bytes_received"] == 100
    assert clients["peak_rss_mb_max"] == 400.0
    assert clients["peak_rss_mb_mean"] == pytest.approx(300.0)
    assert clients["wall_s_max"] == 12.0
    assert clients["cuda_peak_mb_max"] is None
    assert clients["compute_s"] == pytest.approx({"forward": 1.5, "backward": 2.0})
    assert clients["counters"] == {"rounds": 10}
    server = summary["by_role"]["server"]
    assert server["n"] == 1
    assert server["bytes_sent"] == 10 and server["bytes_received"] == 9
    assert server["wall_s_max"] == 5.0
    json.dumps(summary, allow_nan=False)


def test_summarize_run_from_real_meters(tmp_path, clock):
    meters = [Meter("client", i) for i in range(2)]
    for i, meter in enumerate(meters):
        meter.sent("FORWARD", 100 * (i + 1))
        with meter.phase("forward"):
            clock.advance(0.5)
        _write(tmp_path / f"{meter.name}.jsonl", [{"event": "final", **meter.snapshot()}])

    clients = summarize_run(tmp_path)["by_role"]["client"]

    assert clients["bytes_sent"] == 300
    assert clients["compute_s"]["forward"] == pytest.approx(1.0)
    assert not math.isnan(clients["peak_rss_mb_mean"])


def test_summarize_run_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        summarize_run(tmp_path / "nope")


def test_round_tally_sums_microbatches_and_divides_once():
    from types import SimpleNamespace as NS

    from lesft.metrics import RoundTally

    tally = RoundTally()
    part = NS(act=torch.zeros(2, 5, 3), ref_act=torch.zeros(2, 7, 3))
    tally.add([part], NS(loss_sums=[2.0, 0.0], valid_rows=[2, 0], stats={"tokens": 10, "nll": 1.0, "rows": 4}))
    tally.add([NS(act=torch.zeros(1, 4, 3), ref_act=None)],
              NS(loss_sums=[4.0], valid_rows=[1], stats={"tokens": 30, "nll": 3.0, "rows": 1}))
    rec = tally.close()
    assert rec == {"loss": (1.0 * 2 + 4.0) / 3, "rows": 3, "tokens": 40, "microbatches": 2, "act_tokens": 14,
                   "ref_tokens": 14, "nll": 2.5}
    assert tally.close() == {"loss": 0.0, "rows": 0, "tokens": 0, "microbatches": 0, "act_tokens": 0,
                             "ref_tokens": 0}
