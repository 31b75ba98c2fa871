"""Tests for ``lesft bench transport`` / ``lesft bench microbatch`` and ``bench.common``:
the commands run end to end on tiny settings, write their CSV/JSON/markdown, and every
rate and ratio in the JSON is the one its own measured seconds and byte counts give.
No speed is asserted (this runs on shared CI machines)."""
from __future__ import annotations

import csv
import json
import math

import pytest
from typer.testing import CliRunner

from bench.common import Column, markdown_table, rich_table, write_results
from lesft.cli import app

runner = CliRunner()


def invoke(args: list[str]):
    result = runner.invoke(app, args, catch_exceptions=False)
    return result


def load(out, name):
    doc = json.loads((out / f"{name}.json").read_text())
    with open(out / f"{name}.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    return doc, csv_rows


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


# --------------------------------------------------------------------------- common


def test_write_results_files_and_tables(tmp_path):
    # Prepare
    rows = [{"shape": [1, 2, 3], "x": 1.5, "name": "a|b"}, {"shape": [4, 5, 6], "x": float("nan"), "extra": 7}]
    cols = [Column("shape"), Column("x", "x value", ".2f"), "name"]
    # Execute
    paths = write_results(tmp_path / "o", "demo", rows, {"k": 1}, cols, title="Demo", notes=["a note"])
    # Assert
    doc = json.loads(paths["json"].read_text())
    assert doc["name"] == "demo" and doc["config"] == {"k": 1}
    assert doc["rows"][1]["x"] is None  # NaN is not valid JSON: written as null
    assert {"cpu_model", "cpu_logical", "torch", "pyzmq", "libzmq", "date"} <= set(doc["machine"])
    with open(paths["csv"], newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["shape"] for r in got] == ["1x2x3", "4x5x6"] and got[1]["extra"] == "7"
    md = paths["md"].read_text()
    assert md.startswith("# Demo") and "| shape | x value | name |" in md and "a\\|b" in md
    assert "| 4x5x6 | nan | - |" in md and "- a note" in md
    assert markdown_table(rows, cols).count("\n") == 4
    assert rich_table(rows, cols, "t").row_count == 2


# --------------------------------------------------------------------------- transport


def test_transport_command_writes_consistent_results(tmp_path):
    # Prepare
    out = tmp_path / "transport"
    shapes = [(1, 16, 32), (2, 40, 24)]
    # Execute
    result = invoke(["bench", "transport", "--sizes", ",".join("x".join(map(str, s)) for s in shapes),
                     "--dtypes", "fp32,bf16", "--repeat", "2", "--min-time", "0", "--threads", "1",
                     "--out", str(out)])
    # Assert
    assert result.exit_code == 0, result.output
    doc, csv_rows = load(out, "transport")
    assert (out / "transport.md").is_file() and (out / "config.json").is_file()
    assert len(doc["rows"]) == len(csv_rows) == 4
    assert doc["config"]["sizes"] == [list(s) for s in shapes]
    itemsize = {"fp32": 4, "bf16": 2}
    for r in doc["rows"]:
        b, t, h = r["shape"]
        assert r["act_bytes"] == b * t * h * itemsize[r["dtype"]]
        # the FORWARD's frames, counted independently: delimiter, header, act, lengths,
        # y_start, targets [B, T - T//2] int32, y_len; each with its ZMTP frame header
        tensors = [r["act_bytes"], 4 * b, 4 * b, 4 * b * (t - t // 2), 4 * b]
        frames = [0, r["header_bytes"]] + tensors
        assert r["tensor_bytes"] == sum(tensors)
        assert r["wire_bytes"] == sum(n + (2 if n <= 255 else 9) for n in frames)
        assert close(r["wire_over_act"], r["wire_bytes"] / r["act_bytes"])
        for key in ("memcpy_s", "codec_s", "roundtrip_s"):
            assert r[key] > 0
        assert close(r["memcpy_GBps"], r["act_bytes"] / r["memcpy_s"] / 1e9)
        assert close(r["codec_GBps"], r["act_bytes"] / r["codec_s"] / 1e9)
        assert close(r["oneway_s"], r["roundtrip_s"] / 2)
        assert close(r["loopback_GBps"], r["act_bytes"] / r["oneway_s"] / 1e9)
        assert close(r["loopback_msgs_per_s"], 2 / r["roundtrip_s"])
        assert close(r["codec_vs_memcpy"], r["codec_GBps"] / r["memcpy_GBps"])
        assert close(r["loopback_vs_memcpy"], r["loopback_GBps"] / r["memcpy_GBps"])
        assert r["raw_roundtrip_s"] > 0
        assert close(r["raw_GBps"], r["act_bytes"] / (r["raw_roundtrip_s"] / 2) / 1e9)
        assert close(r["raw_vs_memcpy"], r["raw_GBps"] / r["memcpy_GBps"])
        assert close(r["loopback_vs_raw"], r["loopback_GBps"] / r["raw_GBps"])
    targets = doc["config"]["targets"]
    worst = max(doc["rows"], key=lambda r: r["wire_over_act"])
    assert targets[-1]["value"] == worst["wire_over_act"]
    assert targets[-1]["met"] == (worst["wire_over_act"] <= 1.01)
    assert "transport" in result.output and "wire" in result.output


def test_transport_thread_echo_default_shape_target(tmp_path):
    # Prepare: the target shape in fp32 only, echo in a thread
    out = tmp_path / "t"
    # Execute
    result = invoke(["bench", "transport", "--sizes", "4x512x576", "--dtypes", "fp32", "--repeat", "1",
                     "--min-time", "0", "--echo", "thread", "--out", str(out)])
    # Assert
    assert result.exit_code == 0, result.output
    doc, _ = load(out, "transport")
    (row,) = doc["rows"]
    names = [t["target"] for t in doc["config"]["targets"]]
    assert any(n.startswith("loopback [4, 512, 576] fp32") for n in names)
    loop = next(t for t in doc["config"]["targets"] if t["target"].startswith("loopback"))
    assert loop["value"] == row["loopback_GBps"] and loop["met"] == (row["loopback_GBps"] >= 1.0)


def test_codec_roundtrip_seconds():
    from bench.transport import codec_roundtrip_seconds

    r = codec_roundtrip_seconds(shape=(2, 4, 8), dtype="bf16", repeat=2)
    assert r["payload_bytes"] == 2 * 4 * 8 * 2 and r["bytes_per_s"] > 0


@pytest.mark.parametrize("args, words", [
    (["--sizes", "4x5"], "not B x T x H"),
    (["--dtypes", "fp8"], "fp8"),
    (["--echo", "pipe"], "--echo"),
    (["--repeat", "0"], "--repeat"),
])
def test_transport_bad_flags_end_in_one_line(tmp_path, args, words):
    result = invoke(["bench", "transport", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- microbatch


def test_microbatch_command_writes_consistent_results(tmp_path):
    # Prepare
    out = tmp_path / "mb"
    # Execute
    result = invoke(["bench", "microbatch", "--model", "arch:tiny-qwen2", "--clients-list", "1,2",
                     "--repeat", "1", "--threads", "1", "--samples-per-client", "1", "--max-length", "64",
                     "--out", str(out)])
    # Assert
    assert result.exit_code == 0, result.output
    doc, csv_rows = load(out, "microbatch")
    assert (out / "microbatch.md").is_file() and (out / "config.json").is_file()
    assert [r["clients"] for r in doc["rows"]] == [1, 2] and len(csv_rows) == 2
    work = doc["config"]["workload"]
    assert work["method"] == "lesft" and work["device"] == "cpu"
    lengths, ref_lengths = work["row_lengths"], work["ref_lengths"]
    for r in doc["rows"]:
        n = r["clients"]
        assert r["batched_s"] > 0 and r["sequential_s"] > 0
        assert r["tokens"] == sum(lengths[:n]) + sum(ref_lengths[:n])  # batch 1: a row is its own width
        assert r["padded_tokens_sequential"] == r["tokens"]
        assert r["padded_tokens_batched"] == n * max(lengths[:n]) + n * max(ref_lengths[:n])
        assert close(r["pad_waste"], 1 - r["tokens"] / r["padded_tokens_batched"])
        assert close(r["ratio"], r["batched_s"] / r["sequential_s"])
        assert close(r["speedup"], r["sequential_s"] / r["batched_s"])
        assert close(r["batched_tokens_per_s"], r["tokens"] / r["batched_s"])
        assert close(r["sequential_tokens_per_s"], r["tokens"] / r["sequential_s"])
        assert all(r[f"{m}_{p}_s"] > 0 for m in ("batched", "sequential") for p in ("forward", "backward"))
    assert doc["config"]["targets"] == []  # no 8-client row asked for
    assert doc["config"]["settings"]["model"]["model"] == "arch:tiny-qwen2"


@pytest.mark.parametrize("args, words", [
    (["--clients-list", "0,2"], "--clients-list"),
    (["--method", "fedavg"], "fedavg"),
])
def test_microbatch_bad_flags_end_in_one_line(tmp_path, args, words):
    result = invoke(["bench", "microbatch", "--model", "arch:tiny-qwen2", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert words in result.output and "Traceback" not in result.output
