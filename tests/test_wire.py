"""Tests for lesft.wire: round trips, zero-copy, and one test per rejection."""
from __future__ import annotations

import ast
import random
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from lesft import wire
from lesft.wire import (ALLOWED_DTYPES, PROTOCOL_VERSION, ErrorCode, Limits, Message,
                        ModelLimits, MsgType, WireError, check_adapters, check_backward,
                        check_forward, check_hello, check_upload, decode, encode,
                        error, raise_if_error, split_envelope)

LIM = ModelLimits(hidden_size=8, max_length=16, max_rows=4, vocab_size=50)


def forward_msg(b=2, t=6, h=8, ref=True, **meta) -> Message:
    """A valid FORWARD: y_start=2, y_len=3, lengths=t on both paths."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "act": torch.randn(b, t, h, generator=g),
        "lengths": torch.full((b,), t, dtype=torch.int64),
        "y_start": torch.full((b,), 2, dtype=torch.int32),
        "targets": torch.randint(0, 50, (b, 4), generator=g),
        "y_len": torch.full((b,), 3, dtype=torch.int64),
    }
    if ref:
        tensors |= {"ref_act": torch.randn(b, t + 2, h, generator=g),
                    "ref_lengths": torch.full((b,), t + 2, dtype=torch.int64),
                    "ref_y_start": torch.full((b,), 4, dtype=torch.int64)}
    return Message(MsgType.FORWARD, "client", 3, "run-1", 5, 7, dict(meta), tensors)


def header_of(frames) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def with_header(frames, **changes) -> list:
    h = header_of(frames) | changes
    return [msgpack.packb(h, use_bin_type=True), *frames[1:]]


def rejects(code: ErrorCode, fn, *args, **kw) -> WireError:
    with pytest.raises(WireError) as info:
        fn(*args, **kw)
    assert info.value.code == code, str(info.value)
    assert "\n" not in str(info.value) and str(info.value).startswith(code.value + ": ")
    return info.value


def roundtrip(msg: Message, float_dtype=None, limits=None) -> Message:
    return decode([bytes(f) for f in encode(msg, float_dtype)], limits)


# ------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("mtype", list(MsgType))
def test_roundtrip_every_type(mtype):
    carries = mtype in (MsgType.FORWARD, MsgType.BACKWARD, MsgType.UPLOAD, MsgType.ADAPTERS, MsgType.HIDDEN,
                        MsgType.HEAD_GRAD)
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    msg = Message(mtype, "server", -1, "r", 2, 9,
                  {"a": 1, "b": [1.5, "x", None, True], "c": {"d": []}}, tensors if carries else {})
    out = roundtrip(msg)
    assert (out.type, out.role, out.sender, out.run_id, out.round, out.seq) == \
           (mtype, "server", -1, "r", 2, 9)
    assert out.meta == msg.meta
    if carries:
        assert torch.equal(out.tensors["w"], msg.tensors["w"])
    else:  # types that carry no tensor refuse one (a cheap bound, checked before any decoding)
        assert out.tensors == {}
        with pytest.raises(WireError) as e:
            encode(Message(mtype, "server", -1, "r", 2, 9, {}, tensors))
        assert e.value.code == ErrorCode.TOO_LARGE


@pytest.mark.parametrize("code", sorted(ALLOWED_DTYPES))
def test_roundtrip_every_allowed_dtype(code):
    dtype = ALLOWED_DTYPES[code]
    if dtype == torch.bool:
        t = torch.rand(3, 5) > 0.5
    elif dtype.is_floating_point:
        t = torch.randn(3, 5).to(dtype)
    else:
        t = torch.randint(0, 200, (3, 5)).to(dtype)
    out = roundtrip(Message(MsgType.UPLOAD, "client", 0, tensors={"x": t})).tensors["x"]
    assert out.dtype == dtype and torch.equal(out, t)


@pytest.mark.parametrize("wire_dtype,tol", [("fp32", 0.0), ("bf16", 1e-2), ("fp16", 1e-3),
                                            (torch.bfloat16, 1e-2), ("f16", 1e-3)])
def test_float_cast_leaves_ints_alone(wire_dtype, tol):
    msg = forward_msg()
    out = roundtrip(msg, wire_dtype)
    want = wire._wire_dtype(wire_dtype)
    assert out.tensors["act"].dtype == want and out.tensors["ref_act"].dtype == want
    torch.testing.assert_close(out.tensors["act"].float(), msg.tensors["act"], rtol=tol, atol=tol)
    for k in ("lengths", "y_start", "targets", "y_len"):
        assert out.tensors[k].dtype == msg.tensors[k].dtype
        assert torch.equal(out.tensors[k], msg.tensors[k])
    check_forward(out, LIM)


def test_fp32_is_bit_exact():
    t = torch.randn(1000) * 1e30
    out = roundtrip(Message(MsgType.FORWARD, "client", 0, tensors={"a": t})).tensors["a"]
    assert torch.equal(out.view(torch.int32), t.view(torch.int32))


def test_empty_and_scalar_tensors():
    msg = Message(MsgType.ADAPTERS, "aggregator", -1,
                  tensors={"e": torch.zeros(0, 4), "e2": torch.zeros(3, 0, dtype=torch.int64),
                           "s": torch.tensor(2.5), "b": torch.tensor([True, False])})
    out = roundtrip(msg)
    assert out.tensors["e"].shape == (0, 4) and out.tensors["e2"].shape == (3, 0)
    assert out.tensors["s"].shape == () and out.tensors["s"].item() == 2.5
    assert out.tensors["b"].tolist() == [True, False]
    assert list(out.tensors) == ["e", "e2", "s", "b"]


def test_non_contiguous_and_grad_tensors_encode():
    base = torch.randn(4, 6, requires_grad=True)
    out = roundtrip(Message(MsgType.BACKWARD, "server", -1, tensors={"grad": base.t()[None]}))
    assert torch.equal(out.tensors["grad"][0], base.detach().t())


def test_decode_accepts_memoryview_bytearray_and_frame_objects():
    frames = encode(forward_msg())

    class FakeFrame:  # like zmq.Frame received with copy=False
        def __init__(self, b):
            self.buffer = memoryview(b)

    for conv in (bytes, bytearray, lambda f: memoryview(bytes(f)), lambda f: FakeFrame(bytes(f))):
        check_forward(decode([conv(f) for f in frames]), LIM)
    zmq = pytest.importorskip("zmq")
    check_forward(decode([zmq.Frame(bytes(f)) for f in frames]), LIM)


# ---------------------------------------------------------------------------- zero copy

def test_encode_is_zero_copy_for_contiguous_cpu_tensor():
    t = torch.randn(4, 32, 8)
    buf = encode(Message(MsgType.FORWARD, "client", 0, tensors={"act": t}))[1]
    arr = np.frombuffer(buf, dtype=np.uint8)
    assert arr.ctypes.data == t.data_ptr() and np.shares_memory(arr, t.numpy())
    bf = torch.randn(4, 8).bfloat16()
    buf = encode(Message(MsgType.FORWARD, "client", 0, tensors={"a": bf}), "bf16")[1]
    assert np.frombuffer(buf, dtype=np.uint8).ctypes.data == bf.data_ptr()


def test_decode_is_zero_copy_and_documented_read_only():
    frames = [bytes(encode(Message(MsgType.FORWARD, "client", 0, tensors={"a": torch.randn(64)}))[0]),
              bytearray(torch.randn(64).numpy().tobytes())]
    t = decode(frames).tensors["a"]
    assert t.data_ptr() == np.frombuffer(frames[1], dtype=np.uint8).ctypes.data
    assert "READ-ONLY" in wire.__doc__ and ".clone()" in decode.__doc__


def test_buffers_outlive_their_sources():
    import gc
    frames = encode(Message(MsgType.UPLOAD, "server", -1, tensors={"a": torch.arange(1000.0)}))
    gc.collect()  # the source tensor is gone; the memoryview keeps its storage alive
    t = decode([bytes(f) for f in frames]).tensors["a"]
    del frames
    gc.collect()  # the frames are gone; the decoded tensor keeps them alive
    assert torch.equal(t, torch.arange(1000.0))


def test_unaligned_frame_is_copied_not_misread():
    t = torch.arange(5, dtype=torch.float32)
    raw = bytearray(b"\0" + t.numpy().tobytes())
    frames = [encode(Message(MsgType.UPLOAD, "server", -1, tensors={"a": t}))[0], memoryview(raw)[1:]]
    assert torch.equal(decode(frames).tensors["a"], t)


def test_header_never_holds_tensor_bytes():
    small = encode(Message(MsgType.FORWARD, "client", 0, tensors={"act": torch.randn(1, 1, 576)}))
    big = encode(Message(MsgType.FORWARD, "client", 0, tensors={"act": torch.randn(4, 512, 576)}))
    assert abs(len(small[0]) - len(big[0])) <= 8 and len(big[0]) < 200


def test_wire_overhead_below_one_percent():
    frames = encode(Message(MsgType.FORWARD, "client", 0, run_id="run-xyz", round=12,
                            tensors={"act": torch.randn(4, 512, 576)}))
    payload = 4 * 512 * 576 * 4
    assert sum(memoryview(f).nbytes for f in frames) <= 1.01 * payload


def test_wire_module_imports_no_zmq():
    tree = ast.parse(Path(wire.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "zmq" for n in names)


# -------------------------------------------------------------------- envelope, errors

def test_split_envelope():
    body = encode(forward_msg())
    env, got = split_envelope([b"id1", b"id2", b"", *body])
    assert env == [b"id1", b"id2", b""] and got == body
    rejects(ErrorCode.BAD_FRAMES, split_envelope, body)


def test_error_message_roundtrip_and_raise():
    msg = error(wire.Origin("server", -1), ErrorCode.BAD_SHAPE, "act\nwrong", 3, 4)
    out = roundtrip(msg)
    assert out.type == MsgType.ERROR and out.meta == {"code": "bad_shape", "text": "act wrong"}
    e = rejects(ErrorCode.BAD_SHAPE, raise_if_error, out)
    assert e.text == "act wrong" and str(e) == "bad_shape: act wrong" and e.meta == {}
    stale = roundtrip(error(wire.Origin("server", -1), ErrorCode.STALE_ROUND, "over", 3, 4, server_round=5))
    e = rejects(ErrorCode.STALE_ROUND, raise_if_error, stale)
    assert e.meta == {"server_round": 5}  # what came with the code and text, ready to pass on to error()
    assert error(wire.Origin("server", -1), e.code, e.text, **e.meta).meta == stale.meta
    raise_if_error(forward_msg())  # not an error: no raise
    rejects(ErrorCode.INTERNAL, raise_if_error, Message(MsgType.ERROR, "server", -1,
                                                        meta={"code": "nope", "text": "x"}))


def test_encode_rejects_bad_messages():
    rejects(ErrorCode.BAD_DTYPE, encode, Message(MsgType.UPLOAD, "server", -1,
                                                 tensors={"x": torch.zeros(2, dtype=torch.float64)}))
    rejects(ErrorCode.BAD_FIELD, encode, Message(MsgType.ACK, "wizard", -1))
    rejects(ErrorCode.BAD_FIELD, encode, Message(MsgType.ACK, "server", -1, meta={"b": b"x"}))
    with pytest.raises(ValueError):
        encode(forward_msg(), "fp64")


# --------------------------------------------------------- decode: one test per rejection

def good_frames():
    return encode(forward_msg())


def test_reject_no_frames():
    rejects(ErrorCode.BAD_FRAMES, decode, [])


def test_reject_non_buffer_frame():
    rejects(ErrorCode.BAD_FRAMES, decode, [good_frames()[0], 12345])


def test_reject_random_bytes_header():
    rejects(ErrorCode.BAD_HEADER, decode, [bytes([0xc1, 0x00, 0x13])])


def test_reject_trailing_header_bytes():
    rejects(ErrorCode.BAD_HEADER, decode, [good_frames()[0] + b"\x00"])


def test_reject_non_map_header():
    rejects(ErrorCode.BAD_HEADER, decode, [msgpack.packb([1, 2, 3])])


def test_reject_ext_type_in_header():
    h = header_of(good_frames()) | {"m": {"x": msgpack.ExtType(5, b"abc")}}
    rejects(ErrorCode.BAD_HEADER, decode, [msgpack.packb(h)])


def test_reject_int_map_key():
    raw = msgpack.packb({**header_of(good_frames()), 7: 1})
    rejects(ErrorCode.BAD_HEADER, decode, [raw])


def test_reject_missing_header_key():
    h = header_of(good_frames())
    del h["seq"]
    rejects(ErrorCode.BAD_HEADER, decode, [msgpack.packb(h), *good_frames()[1:]])


def test_reject_unknown_header_key():
    rejects(ErrorCode.BAD_HEADER, decode, with_header(good_frames(), extra=1))


def test_reject_header_too_large():
    rejects(ErrorCode.TOO_LARGE, decode, good_frames(), Limits(max_header_bytes=16))


def test_reject_version_mismatch():
    e = rejects(ErrorCode.BAD_VERSION, decode, with_header(good_frames(), v=PROTOCOL_VERSION + 1))
    assert str(PROTOCOL_VERSION) in e.text and str(PROTOCOL_VERSION + 1) in e.text


def test_reject_version_as_bool():
    rejects(ErrorCode.BAD_HEADER, decode, with_header(good_frames(), v=True))


@pytest.mark.parametrize("key,bad", [
    ("t", 3), ("role", None), ("id", "3"), ("id", True), ("id", 1.0), ("run", 5),
    ("r", False), ("r", "1"), ("seq", True), ("seq", 2.5), ("m", [1]), ("ts", {"a": 1}),
])
def test_reject_wrong_header_field_type(key, bad):
    rejects(ErrorCode.BAD_FIELD, decode, with_header(good_frames(), **{key: bad}))


def test_reject_unknown_type():
    rejects(ErrorCode.BAD_TYPE, decode, with_header(good_frames(), t="teleport"))


def test_reject_unknown_role():
    rejects(ErrorCode.BAD_FIELD, decode, with_header(good_frames(), role="wizard"))


@pytest.mark.parametrize("key,bad", [("r", -2), ("seq", -1), ("id", -2)])
def test_reject_header_int_out_of_range(key, bad):
    rejects(ErrorCode.BAD_FIELD, decode, with_header(good_frames(), **{key: bad}))


def test_reject_meta_with_bytes_value():
    rejects(ErrorCode.BAD_FIELD, decode, with_header(good_frames(), m={"k": b""}))


def test_reject_malformed_tensor_spec():
    frames = good_frames()
    ts = header_of(frames)["ts"]
    for bad in (["act", "f32"], ["act", 3, [1]], ["", "f32", [1]], "act", ["act", "f32", 5]):
        rejects(ErrorCode.BAD_FIELD, decode, with_header(frames, ts=[bad, *ts[1:]]))


def test_reject_duplicate_tensor_name():
    frames = good_frames()
    ts = header_of(frames)["ts"]
    rejects(ErrorCode.BAD_FIELD, decode, with_header(frames, ts=[ts[0], [ts[0][0], *ts[1][1:]], *ts[2:]]))


def test_reject_extra_frame():
    e = rejects(ErrorCode.BAD_FRAMES, decode, [*good_frames(), b"x"])
    assert "8" in e.text and "9" in e.text


def test_reject_missing_frame():
    rejects(ErrorCode.BAD_FRAMES, decode, good_frames()[:-1])


def test_reject_too_many_frames():
    rejects(ErrorCode.TOO_LARGE, decode, good_frames(), Limits(max_frames=4))


def test_reject_truncated_frame():
    frames = [bytes(f) for f in good_frames()]
    frames[1] = frames[1][:-3]
    e = rejects(ErrorCode.SIZE_MISMATCH, decode, frames)
    assert "act" in e.text and str(2 * 6 * 8 * 4) in e.text and str(2 * 6 * 8 * 4 - 3) in e.text


def test_reject_shape_length_mismatch():
    frames = good_frames()
    ts = header_of(frames)["ts"]
    ts[0][2] = [2, 6, 9]
    rejects(ErrorCode.SIZE_MISMATCH, decode, with_header(frames, ts=ts))


def test_reject_dtype_outside_allow_list():
    frames = good_frames()
    ts = header_of(frames)["ts"]
    ts[0][1] = "f64"
    rejects(ErrorCode.BAD_DTYPE, decode, with_header(frames, ts=ts))


def test_reject_too_many_dims():
    frames = [msgpack.packb(header_of(good_frames()) | {"ts": [["x", "u8", [1, 1, 1, 1, 1]]]}), b"a"]
    rejects(ErrorCode.BAD_SHAPE, decode, frames)


def test_reject_negative_dim():
    frames = [msgpack.packb(header_of(good_frames()) | {"ts": [["x", "u8", [-1, 2]]]}), b"ab"]
    rejects(ErrorCode.BAD_SHAPE, decode, frames)


def test_reject_overflow_sized_shape():
    frames = [msgpack.packb(header_of(good_frames()) | {"ts": [["x", "i64", [2**31, 2**31, 2**31, 2**31]]]}), b"abcdefgh"]
    rejects(ErrorCode.TOO_LARGE, decode, frames)
    frames = [msgpack.packb(header_of(good_frames()) | {"ts": [["x", "i64", [0, 2**63]]]}), b""]
    rejects(ErrorCode.BAD_SHAPE, decode, frames)


def test_reject_tensor_too_large():
    rejects(ErrorCode.TOO_LARGE, decode, good_frames(), Limits(max_tensor_bytes=100))


def test_reject_total_too_large():
    rejects(ErrorCode.TOO_LARGE, decode, good_frames(), Limits(max_total_bytes=500))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_reject_not_finite(bad):
    msg = forward_msg()
    msg.tensors["ref_act"][1, 2, 3] = bad
    e = rejects(ErrorCode.NOT_FINITE, roundtrip, msg)
    assert "ref_act" in e.text
    assert not torch.isfinite(roundtrip(msg, limits=Limits(check_finite=False)).tensors["ref_act"]).all()


def test_finite_values_whose_sum_overflows_are_accepted():
    t = torch.full((4,), 3e38)
    assert wire.all_finite(t) and not wire.all_finite(torch.tensor([3e38, float("nan")]))
    assert torch.equal(roundtrip(Message(MsgType.UPLOAD, "server", -1, tensors={"a": t})).tensors["a"], t)


def test_reject_not_finite_after_fp16_overflow():
    msg = Message(MsgType.FORWARD, "client", 0, tensors={"act": torch.tensor([1e6])})
    rejects(ErrorCode.NOT_FINITE, roundtrip, msg, "fp16")


def test_reject_bool_byte_not_zero_or_one():
    frames = encode(Message(MsgType.UPLOAD, "server", -1, tensors={"m": torch.ones(3, dtype=torch.bool)}))
    rejects(ErrorCode.OUT_OF_RANGE, decode, [frames[0], b"\x01\x02\x00"])


def test_fuzz_decode_raises_only_wire_error():
    rng = random.Random(1234)
    base = [bytes(f) for f in encode(forward_msg())]
    ok = 0
    for _ in range(3000):
        frames = list(base)
        op = rng.randrange(6)
        i = rng.randrange(len(frames))
        f = bytearray(frames[i])
        if op == 0 and f:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                f[rng.randrange(len(f))] = rng.randrange(256)
        elif op == 1:  # truncate
            f = f[: rng.randrange(len(f) + 1)]
        elif op == 2:  # append garbage
            f += bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        elif op == 3:  # drop or duplicate a frame
            frames.pop(i) if rng.random() < 0.5 else frames.insert(i, frames[i])
            f = None
        elif op == 4:  # random bytes
            f = bytearray(rng.randbytes(rng.randint(0, 64)))
        else:  # header byte flips only
            i, f = 0, bytearray(frames[0])
            f[rng.randrange(len(f))] = rng.randrange(256)
        if f is not None:
            frames[i] = bytes(f)
        try:
            decode(frames)
            ok += 1
        except WireError:
            pass
    assert ok < 3000  # most mutations are caught; none raised anything else


# ------------------------------------------------------------- check_forward rejections

def test_forward_valid_with_and_without_ref():
    check_forward(roundtrip(forward_msg()), LIM)
    check_forward(roundtrip(forward_msg(ref=False)), LIM)
    check_forward(roundtrip(forward_msg()), LIM, reference=True)
    check_forward(roundtrip(forward_msg(ref=False)), LIM, reference=False)


def test_forward_rejects_wrong_type():
    rejects(ErrorCode.BAD_TYPE, check_forward, Message(MsgType.UPLOAD, "client", 0), LIM)


def test_forward_rejects_missing_tensor():
    msg = forward_msg()
    del msg.tensors["y_len"]
    rejects(ErrorCode.MISSING_TENSOR, check_forward, msg, LIM)


def test_forward_rejects_unexpected_tensor():
    msg = forward_msg()
    msg.tensors["labels"] = torch.zeros(2, dtype=torch.int64)
    rejects(ErrorCode.UNEXPECTED_TENSOR, check_forward, msg, LIM)


@pytest.mark.parametrize("drop", ["ref_act", "ref_lengths", "ref_y_start"])
def test_forward_rejects_partial_ref(drop):
    msg = forward_msg()
    del msg.tensors[drop]
    e = rejects(ErrorCode.MISSING_TENSOR, check_forward, msg, LIM)
    assert drop in e.text


def test_forward_paths_are_the_receivers_method():
    """The server knows from its own method whether the reference path comes (the paths are
    in the fingerprint): a FORWARD that differs is refused, whatever it claims."""
    e = rejects(ErrorCode.MISSING_TENSOR, check_forward, forward_msg(ref=False), LIM, reference=True)
    assert "ref_act" in e.text
    e = rejects(ErrorCode.UNEXPECTED_TENSOR, check_forward, forward_msg(), LIM, reference=False)
    assert "does not use" in e.text


def test_forward_rejects_int_activation():
    msg = forward_msg()
    msg.tensors["act"] = msg.tensors["act"].long()
    rejects(ErrorCode.BAD_DTYPE, check_forward, msg, LIM)


def test_forward_rejects_float_lengths():
    msg = forward_msg()
    msg.tensors["lengths"] = msg.tensors["lengths"].float()
    rejects(ErrorCode.BAD_DTYPE, check_forward, msg, LIM)


def test_forward_rejects_wrong_hidden_size():
    rejects(ErrorCode.BAD_SHAPE, check_forward, forward_msg(h=9), LIM)


def test_forward_rejects_too_many_rows():
    rejects(ErrorCode.BAD_SHAPE, check_forward, forward_msg(b=5), LIM)


def test_forward_rejects_too_long():
    rejects(ErrorCode.BAD_SHAPE, check_forward, forward_msg(t=17), LIM)


def test_forward_rejects_act_not_3d():
    msg = forward_msg()
    msg.tensors["act"] = msg.tensors["act"][0]
    rejects(ErrorCode.BAD_SHAPE, check_forward, msg, LIM)


def test_forward_rejects_row_mismatch():
    msg = forward_msg()
    msg.tensors["y_len"] = msg.tensors["y_len"][:1]
    rejects(ErrorCode.BAD_SHAPE, check_forward, msg, LIM)


def test_forward_rejects_ref_row_mismatch():
    msg = forward_msg()
    msg.tensors["ref_act"] = msg.tensors["ref_act"][:1]
    rejects(ErrorCode.BAD_SHAPE, check_forward, msg, LIM)


@pytest.mark.parametrize("bad", [50, -1])
def test_forward_rejects_label_out_of_range(bad):
    msg = forward_msg()
    msg.tensors["targets"][1, 2] = bad
    rejects(ErrorCode.OUT_OF_RANGE, check_forward, msg, LIM)


@pytest.mark.parametrize("key,value", [
    ("lengths", 0), ("lengths", 7), ("y_start", 0), ("y_start", 6),
    ("y_len", -1), ("y_len", 5), ("y_len", 4), ("ref_lengths", 9), ("ref_y_start", 0),
    ("ref_y_start", 6),
])
def test_forward_rejects_index_out_of_range(key, value):
    # t=6, y_start=2, Ty=4: y_len=4 fits Ty but y_start+y_len=6 is fine; so make lengths tight
    msg = forward_msg()
    if (key, value) == ("y_len", 4):
        msg.tensors["lengths"][0] = 5
    msg.tensors[key][0] = value
    rejects(ErrorCode.OUT_OF_RANGE, check_forward, msg, LIM)


def test_forward_rejects_y_len_past_ref_lengths():
    msg = forward_msg()
    msg.tensors["ref_y_start"][1] = 6  # 6 + 3 > ref_lengths 8
    rejects(ErrorCode.OUT_OF_RANGE, check_forward, msg, LIM)


def test_forward_rejects_targets_longer_than_act():
    msg = forward_msg(t=3)
    msg.tensors["targets"] = torch.zeros(2, 4, dtype=torch.int64)
    rejects(ErrorCode.BAD_SHAPE, check_forward, msg, LIM)


# ------------------------------------------------------- backward / upload / adapters / hello

def test_backward_valid_and_rejections():
    g = torch.randn(2, 6, 8)
    meta = {"loss_sum": 1.5, "valid_rows": 2}
    ok = roundtrip(Message(MsgType.BACKWARD, "server", -1, meta=meta, tensors={"grad": g}))
    check_backward(ok, expected_shape=(2, 6, 8))
    check_backward(Message(MsgType.BACKWARD, "server", -1, meta=meta))
    rejects(ErrorCode.BAD_SHAPE, check_backward, ok, expected_shape=(2, 6, 9))
    rejects(ErrorCode.UNEXPECTED_TENSOR, check_backward,
            Message(MsgType.BACKWARD, "server", -1, meta=meta, tensors={"grad": g, "x": g}))
    rejects(ErrorCode.BAD_DTYPE, check_backward,
            Message(MsgType.BACKWARD, "server", -1, meta=meta, tensors={"grad": g.long()}))
    rejects(ErrorCode.NOT_FINITE, check_backward,
            Message(MsgType.BACKWARD, "server", -1, meta=meta, tensors={"grad": g / 0}))
    for loss in (float("nan"), True, "1", None):
        rejects(ErrorCode.BAD_FIELD, check_backward,
                Message(MsgType.BACKWARD, "server", -1, meta={**meta, "loss_sum": loss}))
    for rows, code in ((-1, ErrorCode.OUT_OF_RANGE), (1.0, ErrorCode.BAD_FIELD), (None, ErrorCode.BAD_FIELD)):
        rejects(code, check_backward, Message(MsgType.BACKWARD, "server", -1, meta={**meta, "valid_rows": rows}))


ADAPTER_KEYS = {"l0.lora_A": (8, 16), "l0.lora_B": (16, 8)}


def upload(n_samples=10, **tensors) -> Message:
    tensors = tensors or {k: torch.randn(*s) for k, s in ADAPTER_KEYS.items()}
    return Message(MsgType.UPLOAD, "client", 1, meta={"n_samples": n_samples}, tensors=tensors)


def test_upload_valid():
    check_upload(roundtrip(upload()), ADAPTER_KEYS)
    check_upload(upload())


@pytest.mark.parametrize("n,code", [(0, ErrorCode.OUT_OF_RANGE), (-3, ErrorCode.OUT_OF_RANGE),
                                    (True, ErrorCode.BAD_FIELD), (2.0, ErrorCode.BAD_FIELD),
                                    (None, ErrorCode.BAD_FIELD)])
def test_upload_rejects_bad_n_samples(n, code):
    rejects(code, check_upload, upload(n_samples=n))


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_upload_rejects_adapter_key_mismatch(change):
    msg = upload()
    if change == "missing":
        del msg.tensors["l0.lora_B"]
    elif change == "extra":
        msg.tensors["l1.lora_A"] = torch.randn(8, 16)
    else:
        msg.tensors["l0.lora_A"] = torch.randn(4, 16)
    e = rejects(ErrorCode.BAD_ADAPTER, check_upload, msg, ADAPTER_KEYS)
    assert {"missing": "l0.lora_B", "extra": "l1.lora_A", "shape": "l0.lora_A"}[change] in e.text


def test_upload_rejects_bad_tensors():
    rejects(ErrorCode.BAD_ADAPTER, check_upload, Message(MsgType.UPLOAD, "client", 1,
                                                         meta={"n_samples": 1}))
    rejects(ErrorCode.BAD_ADAPTER, check_upload, upload(a=torch.zeros(0, 3)))
    rejects(ErrorCode.BAD_DTYPE, check_upload, upload(a=torch.zeros(2, dtype=torch.int64)))
    rejects(ErrorCode.NOT_FINITE, check_upload, upload(a=torch.tensor([1.0, float("nan")])))
    rejects(ErrorCode.BAD_TYPE, check_upload, Message(MsgType.ADAPTERS, "aggregator", -1))


def test_adapters_checks():
    msg = Message(MsgType.ADAPTERS, "aggregator", -1, round=4,
                  tensors={k: torch.randn(*s) for k, s in ADAPTER_KEYS.items()})
    check_adapters(roundtrip(msg, "bf16"), ADAPTER_KEYS)
    del msg.tensors["l0.lora_A"]
    rejects(ErrorCode.BAD_ADAPTER, check_adapters, msg, ADAPTER_KEYS)


def test_hello_checks():
    good = {"client_id": 0, "n_samples": 5, "fingerprint": "abc123"}
    check_hello(roundtrip(Message(MsgType.HELLO, "client", 0, meta=good)))
    for change, code in [({"client_id": -1}, ErrorCode.OUT_OF_RANGE),
                         ({"client_id": False}, ErrorCode.BAD_FIELD),
                         ({"n_samples": 0}, ErrorCode.OUT_OF_RANGE),
                         ({"fingerprint": ""}, ErrorCode.BAD_FIELD),
                         ({"fingerprint": 7}, ErrorCode.BAD_FIELD)]:
        rejects(code, check_hello, Message(MsgType.HELLO, "client", 0, meta=good | change))


# ------------------------------------------------------------- constructors and checkers

CLIENT = wire.Origin("client", 3, "run-1", "s" * 32)
SERVER = wire.Origin("server", 0, "run-1")


def constructed() -> dict[MsgType, Message]:
    """One message of every type, from its constructor."""
    from lesft.batching import Rows

    f = forward_msg().tensors
    rows = Rows.from_tensors(f, torch.zeros(2, dtype=torch.int64))
    adapters = {k: torch.randn(*s) for k, s in ADAPTER_KEYS.items()}
    return {
        MsgType.HELLO: wire.hello(CLIENT, 1, client_id=3, n_samples=4, fingerprint="f" * 16, parts={"k": 1}),
        MsgType.WELCOME: wire.welcome(SERVER, 1, rounds=8, round=0, clients=4),
        MsgType.FORWARD: wire.forward(CLIENT, 5, 7, rows),
        MsgType.BACKWARD: wire.backward(SERVER, 5, 7, loss_sum=3.5, valid_rows=2, grad=torch.randn(2, 6, 8)),
        MsgType.UPLOAD: wire.upload(CLIENT, 3, 8, n_samples=4, adapters=adapters),
        MsgType.ACK: wire.ack(SERVER, 3, 8, rounds=8, aggregated=True),
        MsgType.ADAPTERS: wire.adapters(SERVER, 3, 0, adapters, clients=[0, 3], n_samples=8, of_round=3),
        MsgType.FETCH: wire.fetch(CLIENT, -1, 9),
        MsgType.ERROR: wire.error(SERVER, ErrorCode.STALE_ROUND, "round 2 is over", 2, 10, server_round=4),
        MsgType.BYE: wire.bye(CLIENT, 11),
        MsgType.HEARTBEAT: wire.heartbeat(SERVER, 5, 7, have=True),
        MsgType.DONE: wire.done(SERVER, 11),
        MsgType.HIDDEN: wire.hidden(SERVER, 5, 7, hidden=torch.randn(2, 3, 8), ref_hidden=torch.randn(2, 3, 8)),
        MsgType.HEAD_GRAD: wire.head_grad(CLIENT, 5, 8, torch.randn(2, 3, 8)),
    }


def test_every_type_has_a_constructor_and_a_checker():
    assert set(constructed()) == set(MsgType) == set(wire.CHECKERS)


@pytest.mark.parametrize("mtype", list(MsgType))
def test_a_constructors_message_passes_its_checker(mtype):
    msg = constructed()[mtype]
    knows = wire.Knows(model=LIM, reference=True, adapters=ADAPTER_KEYS, grad_shape=(2, 6, 8), hidden_shape=(2, 3))
    out = roundtrip(msg)
    assert out.type == mtype and out.meta == msg.meta
    wire.check(out, knows)
    if msg.role == "client":
        assert out.meta["session"] == CLIENT.session  # a client's every message speaks for its session
        assert wire.Origin.of(out) == CLIENT


@pytest.mark.parametrize("mtype, meta", [
    (MsgType.WELCOME, {"rounds": 0, "round": 0, "clients": 1}), (MsgType.WELCOME, {"rounds": 2}),
    (MsgType.ACK, {"rounds": "8"}), (MsgType.ACK, {"aggregated": 1}), (MsgType.HEARTBEAT, {"have": "no"}),
    (MsgType.ERROR, {"code": 3, "text": "x"}), (MsgType.ERROR, {"code": "internal", "text": "x", "server_round": -1}),
])
def test_checkers_refuse_bad_meta(mtype, meta):
    with pytest.raises(WireError):
        wire.check(Message(mtype, "server", 0, meta=meta), wire.Knows())


def test_check_refuses_a_type_without_checker(monkeypatch):
    monkeypatch.delitem(wire.CHECKERS, MsgType.BYE)
    rejects(ErrorCode.BAD_TYPE, wire.check, constructed()[MsgType.BYE], wire.Knows())


def test_one_dtype_table():
    assert wire.WIRE_DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert wire.MODEL_DTYPES == {"float32": torch.float32, "bfloat16": torch.bfloat16}
    assert all(wire.WIRE_DTYPES[wire.wire_name(dt)] == dt for dt in wire.WIRE_DTYPES.values())
    assert len(ALLOWED_DTYPES) == len(wire.DTYPES) == len({d.dtype for d in wire.DTYPES})


def test_stamps_are_replaced_and_read():
    rid = b"\x00ab"
    forged = [rid, wire.USER_PREFIX + b"client-1", b"", b"header"]
    stamped = wire.stamp(forged, "client-0")
    assert stamped == [rid, b"lesft-user:client-0", b"", b"header"]
    assert wire.stamped_user(stamped[:3], 0) == "client-0"
    assert wire.strip_stamps(stamped, 1) == [rid, b"", b"header"]
    rejects(ErrorCode.UNAUTHORISED, wire.stamped_user, [rid, b""], 0)


def test_peek_reads_type_sender_and_round_from_the_header_alone():
    frames = wire.encode(wire.heartbeat(CLIENT, 6, 9))
    assert wire.peek(frames) == ("heartbeat", 3, 6)
    with pytest.raises(WireError) as e:
        wire.peek([b"\xc1not msgpack"])
    assert e.value.code == ErrorCode.BAD_HEADER
    with pytest.raises(WireError):
        wire.peek([])


# ------------------------------------------------------------- label-private messages


def test_a_label_private_forward_carries_no_label_ids_and_its_server_refuses_any():
    from lesft.batching import Rows
    from lesft.private import without_labels

    rows = without_labels(Rows.from_tensors(forward_msg().tensors, torch.zeros(2, dtype=torch.int64)))
    out = roundtrip(wire.forward(CLIENT, 5, 7, rows))
    assert "targets" not in out.tensors
    wire.check(out, wire.Knows(model=LIM, reference=True, private=True))
    rejects(ErrorCode.MISSING_TENSOR, wire.check, out, wire.Knows(model=LIM, reference=True, private=False))
    err = rejects(ErrorCode.UNEXPECTED_TENSOR, wire.check, forward_msg(), wire.Knows(model=LIM, private=True))
    assert "--label-private" in err.text


def test_a_label_private_backward_has_no_loss_and_a_standard_one_needs_it():
    msg = roundtrip(wire.backward(SERVER, 5, 7, loss_sum=None, valid_rows=2, grad=torch.randn(2, 6, 8)))
    assert "loss_sum" not in msg.meta
    wire.check(msg, wire.Knows(grad_shape=(2, 6, 8), private=True))
    rejects(ErrorCode.BAD_FIELD, wire.check, msg, wire.Knows(grad_shape=(2, 6, 8)))


@pytest.mark.parametrize("make, knows, code", [
    (lambda: wire.hidden(SERVER, 5, 7, hidden=torch.randn(2, 4, 8), ref_hidden=None),
     wire.Knows(hidden_shape=(2, 3)), ErrorCode.BAD_SHAPE),
    (lambda: wire.hidden(SERVER, 5, 7, hidden=torch.randn(2, 3, 8), ref_hidden=None),
     wire.Knows(hidden_shape=(2, 3), reference=True), ErrorCode.MISSING_TENSOR),
    (lambda: wire.hidden(SERVER, 5, 7, hidden=torch.randn(2, 3, 8), ref_hidden=torch.randn(2, 3, 8)),
     wire.Knows(hidden_shape=(2, 3), reference=False), ErrorCode.UNEXPECTED_TENSOR),
    (lambda: wire.hidden(SERVER, 5, 7, hidden=torch.randn(2, 3, 8), ref_hidden=torch.randn(2, 2, 8)),
     wire.Knows(hidden_shape=(2, 3), reference=True), ErrorCode.BAD_SHAPE),
    (lambda: wire.head_grad(CLIENT, 5, 8, torch.randn(2, 3, 9)), wire.Knows(model=LIM), ErrorCode.BAD_SHAPE),
    (lambda: wire.head_grad(CLIENT, 5, 8, torch.full((2, 3, 8), float("nan"))), wire.Knows(model=LIM),
     ErrorCode.NOT_FINITE),
])
def test_label_private_checkers_refuse_what_does_not_fit(make, knows, code):
    msg = make()
    decoded = decode([bytes(f) for f in encode(msg)], wire.Limits(check_finite=False))
    rejects(code, wire.check, decoded, knows)
