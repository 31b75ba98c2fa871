"""The wire codec: messages <-> lists of byte frames (design §3). No sockets here.

A message body (what follows a ROUTER envelope) is frame 0, a msgpack header map, then
one raw frame per tensor in the order the header lists them; tensor bytes never enter
msgpack. Header keys::

    v: protocol version   t: message type   role: sender role   id: sender id (-1 = singleton)
    run: run id           r: round (>= -1)  seq: request sequence (>= 0)
    m: type-specific metadata (msgpack-native values only)
    ts: [[name, dtype_code, shape], ...]    one entry per tensor frame

`decode` validates everything generic and raises only `WireError`. Every message type has
one constructor here (`hello`, `forward`, ... `error`: workers never build meta by hand)
and one checker in `CHECKERS`; `check(msg, knows)` runs it with what the receiver knows
(`Knows`: model limits, its method's paths, adapter shapes, the expected gradient shape)
and the receivers' dispatchers run it before any handler sees the message. A worker
answers a `WireError` with `error(...)` and keeps serving. The broker's identity stamp
(the envelope frame naming the client a CurveZMQ key proved) is built and read here too.

Decoded tensors are zero-copy, READ-ONLY views over the received frames: `.clone()` or
`.to(...)` them before any in-place operation (including autograd leaves you mutate).
"""
from __future__ import annotations

import enum
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import msgpack
import torch

from lesft.batching import BASE_FIELDS, FLOAT_FIELDS, REF_FIELDS, Rows

# 2: FORWARD lost ``paths``/``want_grad``; BACKWARD carries ``loss_sum`` instead of a mean ``loss``
PROTOCOL_VERSION = 2


class MsgType(str, enum.Enum):
    HELLO = "hello"
    WELCOME = "welcome"
    FORWARD = "forward"
    BACKWARD = "backward"
    UPLOAD = "upload"
    ACK = "ack"
    ADAPTERS = "adapters"
    FETCH = "fetch"
    ERROR = "error"
    BYE = "bye"
    HEARTBEAT = "heartbeat"
    DONE = "done"
    HIDDEN = "hidden"  # label-private: the server's last-layer output at the target positions
    HEAD_GRAD = "head_grad"  # label-private: the client's dL/dH for it


ROLES = frozenset({"client", "server", "aggregator", "broker"})


@dataclass(frozen=True)
class DType:
    """One dtype the project names: its header code, its ``--wire-dtype`` name (floating
    tensors on the wire) and its ``--dtype`` name (base weights), where it has them."""

    dtype: torch.dtype
    code: str
    wire: str | None = None
    model: str | None = None


# The one dtype table: every map below derives from it.
DTYPES = (
    DType(torch.float32, "f32", "fp32", "float32"), DType(torch.bfloat16, "bf16", "bf16", "bfloat16"),
    DType(torch.float16, "f16", "fp16"), DType(torch.int32, "i32"), DType(torch.int64, "i64"),
    DType(torch.uint8, "u8"), DType(torch.bool, "b1"),
)
# Dtypes allowed on the wire, by header code.
ALLOWED_DTYPES = {d.code: d.dtype for d in DTYPES}
# Settings names for the wire dtype of activations and gradients.
WIRE_DTYPES = {d.wire: d.dtype for d in DTYPES if d.wire}
# Settings names for the dtype of the base weights.
MODEL_DTYPES = {d.model: d.dtype for d in DTYPES if d.model}
_DTYPE_CODES = {d.dtype: d.code for d in DTYPES}
_WIRE_NAMES = {d.dtype: d.wire for d in DTYPES if d.wire}


def wire_name(dtype: torch.dtype) -> str:
    """The ``--wire-dtype`` name of a floating dtype (what a reply is sent in: the request's)."""
    return _WIRE_NAMES[dtype]


FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
INDEX_DTYPES = frozenset({torch.int32, torch.int64})
_META_MAX_DEPTH = 16
# Most tensors a message of each type may carry, checked before any tensor is decoded:
# activations and their index tensors, a gradient; adapters (UPLOAD, ADAPTERS) may carry up
# to ``Limits.max_frames``; every other type carries none.
MAX_TENSORS = {"forward": 16, "backward": 2, "hidden": 2, "head_grad": 1}
_MANY_TENSORS = frozenset({"upload", "adapters"})


class ErrorCode(str, enum.Enum):
    BAD_FRAMES = "bad_frames"
    BAD_HEADER = "bad_header"
    BAD_VERSION = "bad_version"
    BAD_TYPE = "bad_type"
    BAD_FIELD = "bad_field"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    SIZE_MISMATCH = "size_mismatch"
    NOT_FINITE = "not_finite"
    OUT_OF_RANGE = "out_of_range"
    TOO_LARGE = "too_large"
    MISSING_TENSOR = "missing_tensor"
    UNEXPECTED_TENSOR = "unexpected_tensor"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    UNKNOWN_CLIENT = "unknown_client"
    DUPLICATE_CLIENT = "duplicate_client"
    STALE_ROUND = "stale_round"
    BAD_ADAPTER = "bad_adapter"
    NOT_READY = "not_ready"
    UNAUTHORISED = "unauthorised"
    INTERNAL = "internal"


class WireError(Exception):
    """A typed protocol error; `str(e)` is one line: ``"<code>: <text>"``. ``meta``: what
    goes with it on the wire (e.g. ``server_round`` of a STALE_ROUND); ``msg``: the refused
    message without its tensors, where :func:`decode`'s ``admit`` refused it."""

    def __init__(self, code: ErrorCode, text: str, meta: dict | None = None):
        self.code = ErrorCode(code)
        self.text = " ".join(str(text).split())
        self.meta = dict(meta or {})
        self.msg: Message | None = None
        super().__init__(f"{self.code.value}: {self.text}")


@dataclass
class Message:
    """One protocol message; `tensors` keeps insertion order, which is the frame order."""

    type: MsgType
    role: str
    sender: int
    run_id: str = ""
    round: int = -1
    seq: int = 0
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    """Ceilings `decode` enforces before it allocates or trusts anything."""

    max_frames: int = 4096  # header + tensors
    max_header_bytes: int = 1 << 18  # a 1,200-tensor adapter upload's specs take ~90 kB
    max_meta_items: int = 10_000  # values in the meta map, all levels together
    max_tensor_bytes: int = 1 << 31
    max_total_bytes: int = 1 << 31
    max_ndim: int = 4
    check_finite: bool = True


@dataclass(frozen=True)
class ModelLimits:
    """What the receiving model accepts: hidden size, tokens per row, rows, vocabulary."""

    hidden_size: int
    max_length: int
    max_rows: int
    vocab_size: int


# ----------------------------------------------------------------------------- helpers

def _fail(code: ErrorCode, text: str) -> WireError:
    return WireError(code, text)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN/Inf. A finite fp32 sum proves it (NaN and Inf
    propagate through a sum) at a fraction of `isfinite`'s cost; an overflowed sum
    falls back to the exact test."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _nbytes(frame: Any) -> int:
    return memoryview(getattr(frame, "buffer", frame)).nbytes


def _check_meta(x: Any, path: str, depth: int = 0, budget: list | None = None) -> None:
    """Types and nesting of a meta value; ``budget`` ([items left]) bounds the work to
    ``Limits.max_meta_items`` values, so a huge list costs no more than a small one."""
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise _fail(ErrorCode.TOO_LARGE, "meta holds too many values (a list or map too long)")
    if depth > _META_MAX_DEPTH:
        raise _fail(ErrorCode.BAD_FIELD, f"meta nested deeper than {_META_MAX_DEPTH} at {path}")
    if x is None or isinstance(x, (bool, int, float, str)):
        return
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _check_meta(v, f"{path}[{i}]", depth + 1, budget)
    elif isinstance(x, dict):
        for k, v in x.items():
            if not isinstance(k, str):
                raise _fail(ErrorCode.BAD_FIELD, f"meta key {k!r} at {path} is not a string")
            _check_meta(v, f"{path}.{k}", depth + 1, budget)
    else:
        raise _fail(ErrorCode.BAD_FIELD, f"meta value at {path} has type {type(x).__name__}")


_HEADER_KEYS = {"v": int, "t": str, "role": str, "id": int, "run": str,
                "r": int, "seq": int, "m": dict, "ts": list}


def _check_header(h: Any, limits: "Limits | None" = None) -> None:
    """Validate a header map's keys, types and generic ranges (not the tensor specs)."""
    if not isinstance(h, dict):
        raise _fail(ErrorCode.BAD_HEADER, f"header is a {type(h).__name__}, not a map")
    v = h.get("v")
    if not _is_int(v):
        raise _fail(ErrorCode.BAD_HEADER, "header has no integer protocol version 'v'")
    if v != PROTOCOL_VERSION:
        raise _fail(ErrorCode.BAD_VERSION, f"protocol version {v}, expected {PROTOCOL_VERSION}")
    missing = [k for k in _HEADER_KEYS if k not in h]
    extra = [k for k in h if k not in _HEADER_KEYS]
    if missing or extra:
        raise _fail(ErrorCode.BAD_HEADER, f"header keys missing {missing}, unknown {extra}")
    for key, typ in _HEADER_KEYS.items():
        ok = _is_int(h[key]) if typ is int else isinstance(h[key], typ)
        if not ok:
            raise _fail(ErrorCode.BAD_FIELD,
                        f"header '{key}' is {type(h[key]).__name__}, expected {typ.__name__}")
    if h["t"] not in MsgType._value2member_map_:
        raise _fail(ErrorCode.BAD_TYPE, f"unknown message type {h['t'][:40]!r}")
    if h["role"] not in ROLES:
        raise _fail(ErrorCode.BAD_FIELD, f"unknown role {h['role'][:40]!r}")
    if h["id"] < -1 or h["r"] < -1 or h["seq"] < 0:
        raise _fail(ErrorCode.BAD_FIELD,
                    f"id={h['id']} r={h['r']} seq={h['seq']}: need id>=-1, r>=-1, seq>=0")
    _check_meta(h["m"], "m", budget=[(limits or Limits()).max_meta_items])
    cap = (limits or Limits()).max_frames if h["t"] in _MANY_TENSORS else MAX_TENSORS.get(h["t"], 0)
    if len(h["ts"]) > cap:
        raise _fail(ErrorCode.TOO_LARGE, f"a {h['t']} message carries {len(h['ts'])} tensors, at most {cap}")


def _check_specs(ts: list, limits: Limits) -> list[tuple[str, torch.dtype, tuple, int]]:
    """Validate `ts` entries -> [(name, dtype, shape, nbytes)]."""
    out, seen, total = [], set(), 0
    for i, spec in enumerate(ts):
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)
                and spec[0] and isinstance(spec[1], str) and isinstance(spec[2], list)):
            raise _fail(ErrorCode.BAD_FIELD, f"tensor spec {i} is not [name, dtype, shape]")
        name, code, shape = spec
        if name in seen:
            raise _fail(ErrorCode.BAD_FIELD, f"tensor name {name!r} repeated")
        seen.add(name)
        if code not in ALLOWED_DTYPES:
            raise _fail(ErrorCode.BAD_DTYPE,
                        f"tensor {name!r} dtype {code[:16]!r} not in {sorted(ALLOWED_DTYPES)}")
        if len(shape) > limits.max_ndim:
            raise _fail(ErrorCode.BAD_SHAPE,
                        f"tensor {name!r} has {len(shape)} dims, max {limits.max_ndim}")
        if not all(_is_int(d) and 0 <= d <= limits.max_tensor_bytes for d in shape):
            raise _fail(ErrorCode.BAD_SHAPE, f"tensor {name!r} shape {shape} has an invalid dim")
        dtype = ALLOWED_DTYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if nbytes > limits.max_tensor_bytes:
            raise _fail(ErrorCode.TOO_LARGE,
                        f"tensor {name!r} shape {shape} needs {nbytes} bytes, "
                        f"limit {limits.max_tensor_bytes}")
        total += nbytes
        if total > limits.max_total_bytes:
            raise _fail(ErrorCode.TOO_LARGE, f"tensors exceed {limits.max_total_bytes} bytes")
        out.append((name, dtype, tuple(shape), nbytes))
    return out


# ------------------------------------------------------------------------ encode/decode

def _wire_dtype(float_dtype: str | torch.dtype | None) -> torch.dtype | None:
    if float_dtype is None or float_dtype in FLOAT_DTYPES:
        return float_dtype
    dt = WIRE_DTYPES.get(float_dtype) or ALLOWED_DTYPES.get(float_dtype)
    if dt not in FLOAT_DTYPES:
        raise ValueError(f"wire float dtype {float_dtype!r}: use one of {sorted(WIRE_DTYPES)}")
    return dt


def _tensor_buffer(t: torch.Tensor) -> memoryview:
    """Bytes of a contiguous CPU tensor, sharing its storage (bf16 has no numpy dtype)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode(msg: Message, float_dtype: str | torch.dtype | None = None) -> list:
    """Message -> ``[header_bytes, buf_1, ..., buf_n]``, one buffer per tensor.

    Floating tensors are cast to `float_dtype` ("fp32" | "bf16" | "fp16" or a torch
    dtype) when given; integer and bool tensors are sent as they are. A contiguous CPU
    tensor already in its wire dtype is sent as a memoryview of its own storage (no
    copy): do not modify it until the frames are sent. CUDA tensors are cast on the
    device, then copied to the CPU. Raises `WireError` for a message `decode` would reject
    on its header, names or dtypes; `ValueError` for an unknown `float_dtype`.
    """
    target = _wire_dtype(float_dtype)
    specs, bufs = [], []
    for name, t in msg.tensors.items():
        if not isinstance(name, str) or not name or not isinstance(t, torch.Tensor):
            raise _fail(ErrorCode.BAD_FIELD, f"tensor entry {name!r} is not str -> Tensor")
        t = t.detach()
        if target is not None and t.is_floating_point() and t.dtype != target:
            t = t.to(target)
        if t.dtype not in _DTYPE_CODES:
            raise _fail(ErrorCode.BAD_DTYPE, f"tensor {name!r} has dtype {t.dtype} not allowed")
        t = t.cpu().contiguous()
        specs.append([name, _DTYPE_CODES[t.dtype], list(t.shape)])
        bufs.append(_tensor_buffer(t))
    mtype = msg.type.value if isinstance(msg.type, MsgType) else msg.type
    header = {"v": PROTOCOL_VERSION, "t": mtype, "role": msg.role, "id": msg.sender,
              "run": msg.run_id, "r": msg.round, "seq": msg.seq, "m": msg.meta, "ts": specs}
    _check_header(header)
    try:
        raw = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise _fail(ErrorCode.BAD_FIELD, f"header not packable: {e}") from e
    return [raw, *bufs]


def _unpack_header(raw: memoryview, limits: Limits) -> dict:
    n = raw.nbytes
    if n > limits.max_header_bytes:
        raise _fail(ErrorCode.TOO_LARGE, f"header is {n} bytes, limit {limits.max_header_bytes}")
    try:
        # msgpack checks each length prefix before it allocates: a long list fails at once
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True,
                               max_bin_len=0, max_ext_len=0, max_str_len=n,
                               max_array_len=min(n, limits.max_frames), max_map_len=min(n, limits.max_frames))
    except Exception as e:  # msgpack raises several unrelated types on hostile input
        raise _fail(ErrorCode.BAD_HEADER, f"header is not valid msgpack: {e}") from e


def _frame_tensor(buf: memoryview, name: str, dtype: torch.dtype, shape: tuple,
                  check_finite: bool) -> torch.Tensor:
    if buf.nbytes == 0:  # frombuffer refuses empty buffers
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t = torch.frombuffer(buf, dtype=torch.uint8)
    if dtype == torch.bool and int(t.max()) > 1:
        raise _fail(ErrorCode.OUT_OF_RANGE, f"bool tensor {name!r} holds bytes other than 0/1")
    if t.data_ptr() % dtype.itemsize:  # unaligned frame (small zmq messages): copy once
        t = t.clone()
    t = t.view(dtype).view(shape)
    if check_finite and dtype in FLOAT_DTYPES and not all_finite(t):
        raise _fail(ErrorCode.NOT_FINITE, f"tensor {name!r} holds NaN or Inf")
    return t


def _decode(frames: Sequence, limits: Limits, admit: "Callable[[Message], None] | None" = None) -> Message:
    frames = list(frames)
    if not frames:
        raise _fail(ErrorCode.BAD_FRAMES, "empty message: no header frame")
    if len(frames) > limits.max_frames:
        raise _fail(ErrorCode.TOO_LARGE, f"{len(frames)} frames, limit {limits.max_frames}")
    try:
        bufs = [memoryview(getattr(f, "buffer", f)).cast("B") for f in frames]
    except (TypeError, ValueError) as e:
        raise _fail(ErrorCode.BAD_FRAMES, f"a frame is not a contiguous buffer: {e}") from e
    h = _unpack_header(bufs[0], limits)
    _check_header(h, limits)
    if len(bufs) - 1 != len(h["ts"]):
        raise _fail(ErrorCode.BAD_FRAMES,
                    f"header lists {len(h['ts'])} tensor frames, got {len(bufs) - 1}")
    msg = Message(MsgType(h["t"]), h["role"], h["id"], h["run"], h["r"], h["seq"], h["m"], {})
    if admit is not None:  # the receiver's cheap checks (run id, type, session) before any tensor
        try:
            admit(msg)
        except WireError as e:
            e.msg = msg
            raise
    specs = _check_specs(h["ts"], limits)
    tensors = {}
    for (name, dtype, shape, nbytes), buf in zip(specs, bufs[1:]):
        if buf.nbytes != nbytes:
            raise _fail(ErrorCode.SIZE_MISMATCH,
                        f"tensor {name!r} {list(shape)} expects {nbytes} bytes, got {buf.nbytes}")
        tensors[name] = _frame_tensor(buf, name, dtype, shape, limits.check_finite)
    msg.tensors = tensors
    return msg


def decode(frames: Sequence, limits: Limits | None = None,
           admit: "Callable[[Message], None] | None" = None) -> Message:
    """Frames (``bytes``/``memoryview``/``bytearray``/``zmq.Frame``) -> validated Message.

    Raises only `WireError`. Tensors are read-only zero-copy views over the frames (they
    keep the frames alive); `.clone()` or `.to(...)` them before in-place use. ``admit``
    sees the message without its tensors once the header is valid and may raise
    `WireError` to refuse it before any tensor is decoded (the error then carries the
    header-only message as ``e.msg``, so the refusal can answer the right round and seq).
    """
    try:
        return _decode(frames, limits or Limits(), admit)
    except WireError:
        raise
    except Exception as e:  # never let a hostile message raise anything but WireError
        raise _fail(ErrorCode.BAD_FRAMES, f"undecodable message: {type(e).__name__}: {e}") from e


def split_envelope(frames: list) -> tuple[list, list]:
    """ROUTER frames -> (envelope up to and including the first empty frame, body)."""
    for i, f in enumerate(frames):
        try:
            empty = _nbytes(f) == 0
        except TypeError as e:
            raise _fail(ErrorCode.BAD_FRAMES, f"frame {i} is not a buffer") from e
        if empty:
            return list(frames[: i + 1]), list(frames[i + 1:])
    raise _fail(ErrorCode.BAD_FRAMES, "no empty delimiter frame: not a routed message")


def peek(body: Sequence) -> tuple[str, int, int]:
    """(type, sender id, round) of a message body, from its header alone, checked as
    :func:`decode` checks a header (``WireError`` otherwise): what the broker's link trace
    notes about a message it forwards without decoding any tensor."""
    if not body:
        raise _fail(ErrorCode.BAD_FRAMES, "empty message: no header frame")
    try:
        raw = memoryview(getattr(body[0], "buffer", body[0])).cast("B")
    except (TypeError, ValueError) as e:
        raise _fail(ErrorCode.BAD_FRAMES, f"the header frame is not a contiguous buffer: {e}") from e
    limits = Limits()
    h = _unpack_header(raw, limits)
    _check_header(h, limits)
    return h["t"], h["id"], h["r"]


# ------------------------------------------------------------------------- constructors

@dataclass(frozen=True)
class Origin:
    """Who sends: the header fields every message of one process carries, and a client's
    session (its messages carry it in meta, see ``workers.common.Sessions``)."""

    role: str
    sender: int
    run_id: str = ""
    session: str | None = None

    @classmethod
    def of(cls, msg: Message) -> "Origin":
        """The origin a message was sent with (to send more in its name: heartbeats)."""
        session = msg.meta.get("session")
        return cls(msg.role, msg.sender, msg.run_id, session if isinstance(session, str) else None)


def _message(origin: Origin, t: MsgType, round: int = -1, seq: int = 0, meta: dict | None = None,
             tensors: dict | None = None) -> Message:
    meta = dict(meta or {})
    if origin.session is not None:
        meta["session"] = origin.session
    return Message(t, origin.role, origin.sender, origin.run_id, round, seq, meta, dict(tensors or {}))


def hello(origin: Origin, seq: int, *, client_id: int, n_samples: int, fingerprint: str, parts: dict) -> Message:
    """A client registers: its id, its number of examples (the FedAvg weight) and what the
    receiver must agree on (the fingerprint and its named parts)."""
    return _message(origin, MsgType.HELLO, -1, seq, {"client_id": client_id, "n_samples": n_samples,
                                                      "fingerprint": fingerprint, "parts": parts})


def welcome(origin: Origin, seq: int, *, rounds: int, round: int, clients: int) -> Message:
    """The server's answer to a HELLO once every client registered: the run's rounds and where it is."""
    return _message(origin, MsgType.WELCOME, -1, seq, {"rounds": rounds, "round": round, "clients": clients})


def forward(origin: Origin, round: int, seq: int, rows: Rows) -> Message:
    """A client's rows of one round (the row schema's tensors; the dropout keys stay local)."""
    return _message(origin, MsgType.FORWARD, round, seq, tensors=rows.tensors())


def backward(origin: Origin, round: int, seq: int, *, loss_sum: float | None, valid_rows: int,
             grad: torch.Tensor | None = None) -> Message:
    """The server's answer to a FORWARD (label-private: to a HEAD_GRAD): the sum of the per-row
    losses over the ``valid_rows`` rows that have target tokens (the client divides, once;
    None in a label-private run, where only the client knows its loss), and ``dL/dS`` when
    the client trains."""
    meta = ({"loss_sum": loss_sum} if loss_sum is not None else {}) | {"valid_rows": valid_rows}
    return _message(origin, MsgType.BACKWARD, round, seq, meta, {"grad": grad} if grad is not None else {})


def hidden(origin: Origin, round: int, seq: int, *, hidden: torch.Tensor, ref_hidden: torch.Tensor | None) -> Message:
    """Label-private: the server's answer to a FORWARD, its last layer's output (before the
    final norm) at the target positions ``[B, Ty, H]`` of the trained path and, when sent, the
    reference path."""
    tensors = {"hidden": hidden} | ({"ref_hidden": ref_hidden} if ref_hidden is not None else {})
    return _message(origin, MsgType.HIDDEN, round, seq, tensors=tensors)


def head_grad(origin: Origin, round: int, seq: int, grad: torch.Tensor) -> Message:
    """Label-private: the client's ``dL/dH [B, Ty, H]`` for the HIDDEN of this round (the sum of
    its rows' losses; neither the loss nor any label id goes with it)."""
    return _message(origin, MsgType.HEAD_GRAD, round, seq, tensors={"grad": grad})


def upload(origin: Origin, round: int, seq: int, *, n_samples: int, adapters: dict) -> Message:
    """A client's adapters of an aggregation round, weighted by its ``n_samples``."""
    return _message(origin, MsgType.UPLOAD, round, seq, {"n_samples": n_samples}, adapters)


def ack(origin: Origin, round: int, seq: int, *, rounds: int | None = None, aggregated: bool = False) -> Message:
    """The aggregator's answer: to a HELLO (with the run's ``rounds`` when it decides them),
    an UPLOAD (``aggregated``: that round is averaged already) or a BYE."""
    meta = {"rounds": rounds} if rounds is not None else {}
    return _message(origin, MsgType.ACK, round, seq, meta | ({"aggregated": True} if aggregated else {}))


def adapters(origin: Origin, round: int, seq: int, tensors: dict, *, clients: list[int], n_samples: int,
             of_round: int | None = None) -> Message:
    """The global adapters averaged over ``clients`` (``n_samples`` in all): the broadcast of
    a round, or the answer to a FETCH (``of_round``: the round they were averaged in)."""
    meta = {"clients": clients, "n_samples": n_samples} | ({"round": of_round} if of_round is not None else {})
    return _message(origin, MsgType.ADAPTERS, round, seq, meta, tensors)


def fetch(origin: Origin, round: int, seq: int) -> Message:
    """A client asks for the global adapters of ``round`` (-1: the latest)."""
    return _message(origin, MsgType.FETCH, round, seq)


def bye(origin: Origin, seq: int) -> Message:
    """A client has trained every round."""
    return _message(origin, MsgType.BYE, -1, seq)


def done(origin: Origin, seq: int) -> Message:
    """The server's answer to a BYE once the run is complete and saved."""
    return _message(origin, MsgType.DONE, -1, seq)


def heartbeat(origin: Origin, round: int = -1, seq: int = 0, have: bool | None = None) -> Message:
    """A sign of life; a waiting client's carries its request's (round, seq), and the answer
    says whether the receiver ``have``s that request."""
    return _message(origin, MsgType.HEARTBEAT, round, seq, {"have": have} if have is not None else {})


def error(origin: Origin, code: ErrorCode, text: str, round: int = -1, seq: int = 0, **extra) -> Message:
    """An ERROR reply carrying ``meta = {"code": code.value, "text": text, **extra}`` (one line,
    at most 1000 characters; ``extra``: e.g. ``server_round`` of a STALE_ROUND)."""
    text = " ".join(str(text).split())[:1000]
    return Message(MsgType.ERROR, origin.role, origin.sender, origin.run_id, round, seq,
                   {"code": ErrorCode(code).value, "text": text, **extra})


def raise_if_error(msg: Message) -> None:
    """Raise the `WireError` an ERROR message carries (what goes with its code and text as
    ``e.meta``); do nothing for other types."""
    if msg.type != MsgType.ERROR:
        return
    code, text = msg.meta.get("code"), msg.meta.get("text", "")
    if code not in ErrorCode._value2member_map_:
        code, text = ErrorCode.INTERNAL, f"peer sent unknown error code {code!r}: {text}"
    raise WireError(ErrorCode(code), str(text), {k: v for k, v in msg.meta.items() if k not in ("code", "text")})


# ---------------------------------------------------------------- per-type schema checks

def _expect_type(msg: Message, t: MsgType) -> None:
    if msg.type != t:
        raise _fail(ErrorCode.BAD_TYPE, f"expected a {t.value} message, got {msg.type}")


def _tensor(msg: Message, name: str, dtypes: frozenset, ndim: int) -> torch.Tensor:
    t = msg.tensors.get(name)
    if t is None:
        raise _fail(ErrorCode.MISSING_TENSOR, f"{msg.type.value} needs tensor {name!r}")
    if t.dtype not in dtypes:
        raise _fail(ErrorCode.BAD_DTYPE, f"tensor {name!r} has dtype {t.dtype}")
    if t.dim() != ndim:
        raise _fail(ErrorCode.BAD_SHAPE, f"tensor {name!r} has shape {list(t.shape)}, "
                                         f"expected {ndim} dims")
    return t


def _expect_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise _fail(ErrorCode.BAD_SHAPE, f"tensor {name!r} has shape {list(t.shape)}, "
                                         f"expected {list(shape)}")


def _in_range(what: str, ok: torch.Tensor) -> None:
    if not bool(ok.all()):
        raise _fail(ErrorCode.OUT_OF_RANGE, what)


def _activation(msg: Message, name: str, lim: ModelLimits, rows: int | None) -> torch.Tensor:
    """An activation ``[B, T, H]`` with H == hidden, 1 <= B <= max_rows, 1 <= T <= max_length."""
    a = _tensor(msg, name, FLOAT_DTYPES, 3)
    b, t, h = a.shape
    if h != lim.hidden_size:
        raise _fail(ErrorCode.BAD_SHAPE, f"{name!r} hidden size {h}, model has {lim.hidden_size}")
    if not 1 <= b <= lim.max_rows or (rows is not None and b != rows):
        raise _fail(ErrorCode.BAD_SHAPE, f"{name!r} has {b} rows, allowed 1..{lim.max_rows}"
                                         + (f" and == {rows}" if rows is not None else ""))
    if not 1 <= t <= lim.max_length:
        raise _fail(ErrorCode.BAD_SHAPE, f"{name!r} has {t} tokens, allowed 1..{lim.max_length}")
    return a


def _reference_tensors(msg: Message, reference: bool | None) -> bool:
    """Whether the FORWARD carries the reference path: all of its tensors or none, and
    (``reference`` given) as the receiver's own method says (the paths are in the fingerprint)."""
    have = [k for k in REF_FIELDS if k in msg.tensors]
    missing = [k for k in REF_FIELDS if k not in msg.tensors]
    if missing and (have or reference):
        raise _fail(ErrorCode.MISSING_TENSOR, f"the reference path lacks {missing}")
    if have and reference is False:
        raise _fail(ErrorCode.UNEXPECTED_TENSOR, f"forward carries the reference path {have}, "
                                                 "which this run does not use")
    return bool(have)


def _label_ids(msg: Message, private: bool | None) -> torch.Tensor | None:
    """The FORWARD's ``targets``: required in a standard run, refused in a label-private one
    (``private`` None: either)."""
    if "targets" in msg.tensors and private:
        raise _fail(ErrorCode.UNEXPECTED_TENSOR, "forward carries label ids ('targets'), which a label-private run "
                                                 "never sends: start every party with the same --label-private")
    if "targets" not in msg.tensors and private is False:
        raise _fail(ErrorCode.MISSING_TENSOR, "forward needs tensor 'targets' (this run is not --label-private)")
    return _tensor(msg, "targets", INDEX_DTYPES, 2) if "targets" in msg.tensors else None


def check_forward(msg: Message, lim: ModelLimits, reference: bool | None = None, private: bool | None = None) -> None:
    """FORWARD: the row schema's tensors (``lesft.batching.Rows``): ``act [B,T,H]`` float,
    ``lengths/y_start/y_len [B]`` and ``targets [B,Ty]`` int32/int64 (with ``private`` True
    never, False always), and the reference path ``ref_act [B,T2,H]``,
    ``ref_lengths/ref_y_start [B]`` (all or none; with ``reference`` True all, False none).

    Ranges: 1 <= lengths <= T, 1 <= y_start < lengths, 0 <= y_len <= Ty (without targets:
    <= T), y_start + y_len <= lengths (and the same on the reference path), targets in
    [0, vocab).
    """
    _expect_type(msg, MsgType.FORWARD)
    extra = [k for k in msg.tensors if k not in BASE_FIELDS + REF_FIELDS]
    if extra:
        raise _fail(ErrorCode.UNEXPECTED_TENSOR, f"forward has unexpected tensors {extra}")
    have_ref = _reference_tensors(msg, reference)
    act = _activation(msg, "act", lim, None)
    b, t = act.shape[0], act.shape[1]
    lengths, y_start, y_len = (_tensor(msg, k, INDEX_DTYPES, 1)
                               for k in ("lengths", "y_start", "y_len"))
    targets = _label_ids(msg, private)
    for name, x in (("lengths", lengths), ("y_start", y_start), ("y_len", y_len)):
        _expect_shape(name, x, (b,))
    if targets is not None and (targets.shape[0] != b or targets.shape[1] > t):
        raise _fail(ErrorCode.BAD_SHAPE, f"targets {list(targets.shape)} vs act [{b}, {t}, H]")
    ty = targets.shape[1] if targets is not None else t
    lengths, y_start, y_len = lengths.long(), y_start.long(), y_len.long()
    _in_range(f"lengths must be in 1..{t}", (lengths >= 1) & (lengths <= t))
    _in_range("y_start must be in 1..lengths-1", (y_start >= 1) & (y_start < lengths))
    _in_range(f"y_len must be in 0..{ty}", (y_len >= 0) & (y_len <= ty))
    _in_range("y_start + y_len must be <= lengths", y_start + y_len <= lengths)
    if targets is not None and targets.numel():
        _in_range(f"targets must be token ids in [0, {lim.vocab_size})",
                  (targets >= 0) & (targets < lim.vocab_size))
    if have_ref:
        ref = _activation(msg, "ref_act", lim, b)
        t2 = ref.shape[1]
        ref_len, ref_start = (_tensor(msg, k, INDEX_DTYPES, 1) for k in REF_FIELDS if k not in FLOAT_FIELDS)
        _expect_shape("ref_lengths", ref_len, (b,))
        _expect_shape("ref_y_start", ref_start, (b,))
        ref_len, ref_start = ref_len.long(), ref_start.long()
        _in_range(f"ref_lengths must be in 1..{t2}", (ref_len >= 1) & (ref_len <= t2))
        _in_range("ref_y_start must be in 1..ref_lengths-1",
                  (ref_start >= 1) & (ref_start < ref_len))
        _in_range("ref_y_start + y_len must be <= ref_lengths", ref_start + y_len <= ref_len)


def check_backward(msg: Message, expected_shape: tuple[int, ...] | None = None, private: bool | None = None) -> None:
    """BACKWARD: optional ``grad [B,T,H]`` float (== `expected_shape`, the sent act's,
    when given); meta ``loss_sum`` a finite number (absent in a label-private run:
    ``private`` True), ``valid_rows`` an int >= 0."""
    _expect_type(msg, MsgType.BACKWARD)
    extra = [k for k in msg.tensors if k != "grad"]
    if extra:
        raise _fail(ErrorCode.UNEXPECTED_TENSOR, f"backward has unexpected tensors {extra}")
    if "grad" in msg.tensors:
        g = _tensor(msg, "grad", FLOAT_DTYPES, 3)
        if expected_shape is not None:
            _expect_shape("grad", g, expected_shape)
        if not all_finite(g):
            raise _fail(ErrorCode.NOT_FINITE, "tensor 'grad' holds NaN or Inf")
    loss = msg.meta.get("loss_sum")
    owed = not private or "loss_sum" in msg.meta  # a label-private server does not know the loss
    if owed and not (isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)):
        raise _fail(ErrorCode.BAD_FIELD, f"meta loss_sum={loss!r} is not a finite number")
    _positive_int(msg, "valid_rows", 0)


def _check_positions(msg: Message, name: str, lim: ModelLimits | None, shape: tuple[int, int] | None) -> None:
    """A float ``[B, Ty, H]`` at the target positions: finite, H the model's hidden size, 1 <= B
    <= max rows and Ty <= max length (``lim``), or exactly ``shape`` = (B, Ty) when known."""
    x = _tensor(msg, name, FLOAT_DTYPES, 3)
    if shape is not None and tuple(x.shape[:2]) != tuple(shape):
        raise _fail(ErrorCode.BAD_SHAPE, f"tensor {name!r} has shape {list(x.shape)}, expected {list(shape)} x hidden")
    if lim is not None and (x.shape[2] != lim.hidden_size or not 1 <= x.shape[0] <= lim.max_rows
                            or x.shape[1] > lim.max_length):
        raise _fail(ErrorCode.BAD_SHAPE, f"tensor {name!r} has shape {list(x.shape)}: the model takes 1..{lim.max_rows}"
                                         f" rows of at most {lim.max_length} x {lim.hidden_size}")
    if not all_finite(x):
        raise _fail(ErrorCode.NOT_FINITE, f"tensor {name!r} holds NaN or Inf")


def check_hidden(msg: Message, shape: tuple[int, int] | None = None, reference: bool | None = None,
                 ref_shape: tuple[int, int] | None = None) -> None:
    """HIDDEN: ``hidden [B,Ty,H]`` float, finite (``shape`` = (B, Ty) of the rows asked for,
    when given) and ``ref_hidden`` alike (with ``reference`` True required, False refused; its
    (B, Ty) is ``ref_shape``, else the same: with client tail layers both paths come whole)."""
    _expect_type(msg, MsgType.HIDDEN)
    extra = [k for k in msg.tensors if k not in ("hidden", "ref_hidden")]
    if extra:
        raise _fail(ErrorCode.UNEXPECTED_TENSOR, f"hidden has unexpected tensors {extra}")
    _check_positions(msg, "hidden", None, shape)
    if "ref_hidden" in msg.tensors and reference is False:
        raise _fail(ErrorCode.UNEXPECTED_TENSOR, "hidden carries the reference path, which this run does not use")
    if "ref_hidden" in msg.tensors or reference:
        _check_positions(msg, "ref_hidden", None, ref_shape or tuple(msg.tensors["hidden"].shape[:2]))


def check_head_grad(msg: Message, lim: ModelLimits | None) -> None:
    """HEAD_GRAD: ``grad [B,Ty,H]`` float, finite, within the model's sizes (the server checks
    it against the HIDDEN it answers when it takes it)."""
    _expect_type(msg, MsgType.HEAD_GRAD)
    extra = [k for k in msg.tensors if k != "grad"]
    if extra:
        raise _fail(ErrorCode.UNEXPECTED_TENSOR, f"head_grad has unexpected tensors {extra}")
    _check_positions(msg, "grad", lim, None)


def _check_adapter_dict(msg: Message, expected_keys: Mapping[str, tuple] | None) -> None:
    if not msg.tensors:
        raise _fail(ErrorCode.BAD_ADAPTER, "adapter dict is empty")
    for k, t in msg.tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise _fail(ErrorCode.BAD_DTYPE, f"adapter {k!r} has dtype {t.dtype}")
        if t.numel() == 0:
            raise _fail(ErrorCode.BAD_ADAPTER, f"adapter {k!r} is empty {list(t.shape)}")
        if not all_finite(t):
            raise _fail(ErrorCode.NOT_FINITE, f"adapter {k!r} holds NaN or Inf")
    if expected_keys is None:
        return
    for k, shape in expected_keys.items():
        if k not in msg.tensors:
            raise _fail(ErrorCode.BAD_ADAPTER, f"adapter key {k!r} missing")
        if tuple(msg.tensors[k].shape) != tuple(shape):
            raise _fail(ErrorCode.BAD_ADAPTER, f"adapter {k!r} has shape "
                                               f"{list(msg.tensors[k].shape)}, expected {list(shape)}")
    for k in msg.tensors:
        if k not in expected_keys:
            raise _fail(ErrorCode.BAD_ADAPTER, f"adapter key {k!r} unexpected")


def _positive_int(msg: Message, key: str, minimum: int, optional: bool = False) -> None:
    v = msg.meta.get(key)
    if optional and key not in msg.meta:
        return
    if not _is_int(v):
        raise _fail(ErrorCode.BAD_FIELD, f"meta {key}={v!r} must be an integer")
    if v < minimum:
        raise _fail(ErrorCode.OUT_OF_RANGE, f"meta {key}={v} must be >= {minimum}")


def check_upload(msg: Message, expected_keys: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """UPLOAD: meta ``n_samples`` int > 0; tensors = a float, finite, non-empty adapter dict
    whose keys and shapes equal `expected_keys` when given."""
    _expect_type(msg, MsgType.UPLOAD)
    _positive_int(msg, "n_samples", 1)
    _check_adapter_dict(msg, expected_keys)


def check_adapters(msg: Message, expected_keys: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """ADAPTERS (the broadcast): the global adapter dict, same checks as an upload's."""
    _expect_type(msg, MsgType.ADAPTERS)
    _check_adapter_dict(msg, expected_keys)


def check_hello(msg: Message) -> None:
    """HELLO meta: ``client_id`` int >= 0, ``n_samples`` int > 0, ``fingerprint`` str."""
    _expect_type(msg, MsgType.HELLO)
    _positive_int(msg, "client_id", 0)
    _positive_int(msg, "n_samples", 1)
    fp = msg.meta.get("fingerprint")
    if not isinstance(fp, str) or not fp:
        raise _fail(ErrorCode.BAD_FIELD, "meta fingerprint must be a non-empty string")


def check_welcome(msg: Message) -> None:
    """WELCOME meta: ``rounds`` int > 0, ``round`` int >= 0, ``clients`` int > 0."""
    _expect_type(msg, MsgType.WELCOME)
    for key, minimum in (("rounds", 1), ("round", 0), ("clients", 1)):
        _positive_int(msg, key, minimum)


def check_ack(msg: Message) -> None:
    """ACK meta: optional ``rounds`` int > 0, optional ``aggregated`` bool."""
    _expect_type(msg, MsgType.ACK)
    _positive_int(msg, "rounds", 1, optional=True)
    _optional_bool(msg, "aggregated")


def check_heartbeat(msg: Message) -> None:
    """HEARTBEAT meta: optional ``have`` bool."""
    _expect_type(msg, MsgType.HEARTBEAT)
    _optional_bool(msg, "have")


def check_error(msg: Message) -> None:
    """ERROR meta: ``code`` and ``text`` strings (an unknown code is read as INTERNAL, see
    `raise_if_error`), optional ``server_round`` int >= 0."""
    _expect_type(msg, MsgType.ERROR)
    if not isinstance(msg.meta.get("code"), str) or not isinstance(msg.meta.get("text", ""), str):
        raise _fail(ErrorCode.BAD_FIELD, "an error needs string meta code and text")
    _positive_int(msg, "server_round", 0, optional=True)


def check_empty(msg: Message) -> None:
    """FETCH, BYE, DONE: a header alone (their tensors are refused by `decode`)."""


def _optional_bool(msg: Message, key: str) -> None:
    if key in msg.meta and not isinstance(msg.meta[key], bool):
        raise _fail(ErrorCode.BAD_FIELD, f"meta {key}={msg.meta[key]!r} must be true or false")


@dataclass(frozen=True)
class Knows:
    """What a receiver checks messages against (None: not known, not checked)."""

    model: ModelLimits | None = None  # FORWARD: the model's sizes
    reference: bool | None = None  # FORWARD: whether this run's method sends the reference path
    adapters: Mapping[str, tuple[int, ...]] | None = None  # UPLOAD / ADAPTERS: names and shapes
    grad_shape: tuple[int, ...] | None = None  # BACKWARD: the shape of the activations it answers
    private: bool | None = None  # FORWARD / BACKWARD: whether this run is --label-private
    hidden_shape: tuple[int, int] | None = None  # HIDDEN: (rows, target width) of the FORWARD it answers
    ref_hidden_shape: tuple[int, int] | None = None  # HIDDEN: its reference path's, when it differs


# One checker per message type, given what the receiver knows.
CHECKERS: dict[MsgType, Callable[[Message, Knows], None]] = {
    MsgType.HELLO: lambda m, k: check_hello(m),
    MsgType.WELCOME: lambda m, k: check_welcome(m),
    MsgType.FORWARD: lambda m, k: check_forward(m, k.model, k.reference, k.private),
    MsgType.BACKWARD: lambda m, k: check_backward(m, k.grad_shape, k.private),
    MsgType.HIDDEN: lambda m, k: check_hidden(m, k.hidden_shape, k.reference, k.ref_hidden_shape),
    MsgType.HEAD_GRAD: lambda m, k: check_head_grad(m, k.model),
    MsgType.UPLOAD: lambda m, k: check_upload(m, k.adapters),
    MsgType.ACK: lambda m, k: check_ack(m),
    MsgType.ADAPTERS: lambda m, k: check_adapters(m, k.adapters),
    MsgType.FETCH: lambda m, k: check_empty(m),
    MsgType.ERROR: lambda m, k: check_error(m),
    MsgType.BYE: lambda m, k: check_empty(m),
    MsgType.HEARTBEAT: lambda m, k: check_heartbeat(m),
    MsgType.DONE: lambda m, k: check_empty(m),
}


def check(msg: Message, knows: Knows) -> None:
    """Run the checker of ``msg``'s type (what the dispatchers do before any handler sees it);
    a type without one is refused."""
    checker = CHECKERS.get(msg.type)
    if checker is None:
        raise _fail(ErrorCode.BAD_TYPE, f"no checker for {msg.type.value} messages")
    checker(msg, knows)


# ---------------------------------------------------------------------- identity stamps

# With CurveZMQ the broker puts one envelope frame ``lesft-user:client-<i>`` (the User-Id
# the client's key proved) on each request it passes to the server, after removing any
# frame of that prefix a client forged, and removes it from replies.
USER_PREFIX = b"lesft-user:"
CLIENT_NAME = re.compile(r"^client-(\d+)$")  # a client's key name and authenticated user id


def is_stamp(frame) -> bool:
    n = len(USER_PREFIX)
    return _nbytes(frame) >= n and bytes(memoryview(frame)[:n]) == USER_PREFIX


def _envelope_end(frames: list, start: int) -> int:
    for i in range(start, len(frames)):
        if _nbytes(frames[i]) == 0:
            return i
    return len(frames)


def strip_stamps(frames: list, start: int = 0) -> list:
    """Frames without any ``lesft-user:`` frame in the envelope (before the first empty frame)."""
    end = _envelope_end(frames, start)
    return frames[:start] + [f for f in frames[start:end] if not is_stamp(f)] + frames[end:]


def stamp(frames: list, user_id: str | None) -> list:
    """Broker frontend -> server: drop forged stamps, then put the authenticated one after
    the routing id (``frames[0]``). Without a user id (plaintext) only the drop happens."""
    clean = strip_stamps(frames, 1)
    if user_id:
        clean.insert(1, USER_PREFIX + user_id.encode())
    return clean


def stamped_user(envelope: list, sender: int) -> str:
    """The user id of the one stamp in ``envelope``; ``WireError(UNAUTHORISED)`` unless there is exactly one."""
    stamps = [f for f in envelope if is_stamp(f)]
    if len(stamps) != 1:
        raise WireError(ErrorCode.UNAUTHORISED, f"a message claiming client {sender} carries "
                                                f"{len(stamps)} broker identity frames, not 1: it did not come "
                                                "through a CurveZMQ broker")
    return bytes(memoryview(stamps[0])[len(USER_PREFIX):]).decode("utf-8", "replace")
