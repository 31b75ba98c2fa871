"""``lesft bench transport``: what the wire costs next to a plain memory copy.

For each activation shape ``[B, T, H]`` and wire dtype (fp32, bf16, fp16) it measures,
in one process and one run:

- ``memcpy``: ``bytearray(memoryview)`` of the activation already in its wire dtype (the
  baseline: one allocation and one single-threaded copy, the least a transport does
  once; unlike ``clone()`` it does not scale with torch's thread count, so the ratios
  compare across machines and ``--threads``);
- ``codec``: :func:`lesft.wire.encode` of a real FORWARD (fp32 activation cast to the
  wire dtype, plus ``lengths``/``y_start``/``y_len``/``targets``) and
  :func:`lesft.wire.decode` of its frames (validation and the finite check included);
- ``loopback``: the same FORWARD sent through a :class:`workers.transport.Channel` on a
  DEALER over ``tcp://127.0.0.1`` to an echo ROUTER in a child process (``--echo
  thread`` keeps it in this process) that decodes it, runs ``check_forward`` and
  answers a BACKWARD with a same-size fp32 gradient encoded in the same wire dtype, as
  the real server does; the client decodes it and runs ``check_backward``. A round
  trip moves the activation twice, so one-way time = round trip / 2.
- ``raw``: the activation's bytes echoed as one bare frame over the same sockets (no
  codec, no checks, no casts): the floor the loopback sits on, so ``loop / raw`` is
  what the codec and validation cost on top of ZeroMQ itself.
- ``wire bytes``: the FORWARD's frames (empty delimiter, msgpack header, tensor frames)
  plus ZMTP 3 framing (2 bytes per frame up to 255 bytes, 9 above), over the
  activation's own bytes.

Rates are in GB/s (1e9 bytes/s) of activation bytes; ratios are against ``memcpy``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from bench.common import BenchError, Column, ratio, summarize, time_interleaved
from lesft import wire

DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1, 128, 576), (4, 128, 576), (4, 512, 576), (8, 512, 896), (4, 1024, 2048))
DEFAULT_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
TARGET_SHAPE, TARGET_DTYPE = (4, 512, 576), "fp32"
TARGET_GBPS = 1.0
TARGET_OVERHEAD = 1.01
VOCAB = 1 << 17  # token ids of the synthetic targets stay below this
RAW_TAG = b"lesft-bench-raw"  # first body frame of a sockets-only echo (no codec)
GB = 1e9
CLIENT, SERVER = wire.Origin("client", 0, "bench"), wire.Origin("server", 0, "bench")


# --------------------------------------------------------------------------- inputs


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"1x128x576,4x512x576"`` -> ``[(1, 128, 576), (4, 512, 576)]`` (``[B, T, H]``)."""
    shapes = []
    for part in text.replace(";", ",").split(","):
        part = part.strip().strip("[]()").replace("*", "x").replace(" ", "")
        if not part:
            continue
        try:
            dims = tuple(int(d) for d in part.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) < 1:
            raise BenchError(f"size {part!r} is not B x T x H with positive integers: write e.g. 4x512x576.")
        if dims[1] < 2:
            raise BenchError(f"size {part!r} needs T >= 2 tokens (a prompt token and a target).")
        shapes.append(dims)
    if not shapes:
        raise BenchError("no sizes given: write e.g. --sizes 1x128x576,4x512x576.")
    return shapes


def parse_dtypes(text: str) -> list[str]:
    from lesft.wire import WIRE_DTYPES

    out = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in out if d not in WIRE_DTYPES]
    if bad or not out:
        raise BenchError(f"wire dtype {', '.join(bad) or '(none)'} unknown: choose from {', '.join(WIRE_DTYPES)}.")
    return out


def forward_message(shape: Sequence[int], seed: int = 0):
    """A valid FORWARD of ``B`` rows: fp32 ``act [B, T, H]`` and its int32 bookkeeping
    (every row full length, the second half of each row is target)."""
    from lesft.batching import Rows

    b, t, h = shape
    g = torch.Generator().manual_seed(seed)
    y_start = t // 2
    y_len = t - y_start
    rows = Rows(act=torch.randn(b, t, h, generator=g), lengths=torch.full((b,), t, dtype=torch.int32),
                y_start=torch.full((b,), y_start, dtype=torch.int32),
                targets=torch.randint(0, VOCAB, (b, y_len), generator=g, dtype=torch.int32),
                y_len=torch.full((b,), y_len, dtype=torch.int32), keys=torch.zeros(b, dtype=torch.int64))
    return wire.forward(CLIENT, 0, 0, rows)


def _frame_len(f) -> int:
    return memoryview(getattr(f, "buffer", f)).nbytes


def zmtp_bytes(frames: Sequence) -> int:
    """Bytes of a multipart message on a ZMTP 3 TCP stream: every frame's bytes plus its
    header (1 flag byte + 1 length byte up to 255 bytes, + 8 length bytes above)."""
    return sum(n + (2 if n <= 255 else 9) for n in map(_frame_len, frames))


# --------------------------------------------------------------------------- echo server


def _limits_for(act: torch.Tensor):
    from lesft.wire import ModelLimits

    b, t, h = act.shape
    return ModelLimits(hidden_size=int(h), max_length=int(t), max_rows=int(b), vocab_size=VOCAB)


def echo_serve(address: str, max_message_mb: int = 512, stop: threading.Event | None = None,
               parent_pid: int | None = None) -> None:
    """Serve FORWARD -> BACKWARD echoes on a ROUTER connected to ``address`` until a BYE
    (or ``stop``, or the parent process going away). Each FORWARD is decoded, checked
    like the server checks it, and answered with an fp32 ``grad`` of the activation's
    shape encoded in the activation's wire dtype. A ``[RAW_TAG, payload]`` message is
    sent straight back untouched (the sockets-only baseline)."""
    import zmq

    from lesft.config import Config
    from lesft.metrics import Meter
    from lesft.wire import MsgType
    from workers.transport import Channel, make_socket

    cfg = Config().replace(max_message_mb=max_message_mb)
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.ROUTER, cfg, connect=address)
    chan = Channel(sock, Meter("server", 0), routed=True,
                   limits=wire.Limits(max_total_bytes=max_message_mb * 2**20))
    grads: dict[tuple, torch.Tensor] = {}
    try:
        while not (stop is not None and stop.is_set()):
            if not sock.poll(200):
                if parent_pid is not None and os.getppid() != parent_pid:
                    return
                continue
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 4 and len(frames[2]) == len(RAW_TAG) and frames[2].bytes == RAW_TAG:
                sock.send_multipart(frames, copy=False)  # the sockets-only baseline: bytes straight back
                continue
            try:
                envelope, body = wire.split_envelope(frames)
                msg = wire.decode(body, chan.limits)
            except wire.WireError as e:
                chan.send(wire.error(SERVER, e.code, e.text), frames[:2])
                continue
            if msg.type == MsgType.FORWARD:
                act = msg.tensors.get("act")
                try:
                    wire.check_forward(msg, _limits_for(act) if act is not None and act.dim() == 3
                                       else wire.ModelLimits(1, 1, 1, 1))
                except wire.WireError as e:
                    chan.send(wire.error(SERVER, e.code, e.text, msg.round, msg.seq), envelope)
                    continue
                shape = tuple(act.shape)
                if shape not in grads:
                    grads.clear()  # one shape at a time: keep memory flat across sizes
                    grads[shape] = torch.randn(shape, generator=torch.Generator().manual_seed(1))
                reply = wire.backward(SERVER, msg.round, msg.seq, loss_sum=1.0, valid_rows=shape[0],
                                      grad=grads[shape])
                chan.send(reply, envelope, wire.wire_name(act.dtype))
            elif msg.type == MsgType.BYE:
                chan.send(wire.done(SERVER, msg.seq), envelope)
                return
            else:
                chan.send(wire.heartbeat(SERVER, msg.round, msg.seq), envelope)
    finally:
        chan.close()
        ctx.term()


class EchoPeer:
    """The client end: a DEALER bound on a free loopback port, an echo ROUTER (child
    process or thread) connected to it, and :meth:`roundtrip`."""

    def __init__(self, mode: str = "process", max_message_mb: int = 512, timeout_s: float = 60.0) -> None:
        import zmq

        from lesft.config import Config
        from lesft.metrics import Meter
        from workers.transport import Channel, make_socket

        if mode not in ("process", "thread"):
            raise BenchError(f"--echo {mode!r} unknown: use process or thread.")
        self.mode, self.timeout_s = mode, timeout_s
        cfg = Config().replace(max_message_mb=max_message_mb)
        self.ctx = zmq.Context()
        sock = make_socket(self.ctx, zmq.DEALER, cfg, bind="tcp://127.0.0.1:*")
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.chan = Channel(sock, Meter("client", 0), routed=False)
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stderr = tempfile.TemporaryFile()
        if mode == "process":
            cmd = [sys.executable, "-m", "bench.transport", "echo", self.address, str(max_message_mb), str(os.getpid()),
                   str(torch.get_num_threads())]  # the child computes with as many threads as this process
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._stderr)
        else:
            self.thread = threading.Thread(target=echo_serve, args=(self.address, max_message_mb, self._stop),
                                           daemon=True, name="bench-echo")
            self.thread.start()
        try:
            self._hello()
        except BaseException:
            self.close()
            raise

    def _child_error(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip().splitlines()
        return text[-1] if text else "no message"

    def _await(self, seq: int):
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.chan.sock.poll(50):
                inbound = self.chan.recv()
                if inbound.msg is None:
                    raise BenchError(f"echo server sent an undecodable reply: {inbound.error}")
                wire.raise_if_error(inbound.msg)
                if inbound.msg.seq == seq:
                    return inbound.msg
                continue
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"the echo process exited with status {self.proc.returncode}: {self._child_error()}")
            if time.monotonic() > deadline:
                raise BenchError(f"no reply from the echo server on {self.address} in {self.timeout_s:.0f}s.")

    def _hello(self) -> None:
        """Wait for the echo server: a DEALER blocks on send until a peer connects, so send
        with a timeout and watch the child meanwhile (a child that fails to start says why)."""
        import zmq

        sock = self.chan.sock
        sock.setsockopt(zmq.SNDTIMEO, 200)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                try:
                    self.chan.send(wire.heartbeat(CLIENT))
                    break
                except zmq.Again:
                    if self.proc is not None and self.proc.poll() is not None:
                        raise BenchError(f"the echo process exited with status {self.proc.returncode}: "
                                         f"{self._child_error()}") from None
                    if time.monotonic() > deadline:
                        raise BenchError(f"the echo server never connected to {self.address} in "
                                         f"{self.timeout_s:.0f}s.") from None
        finally:
            sock.setsockopt(zmq.SNDTIMEO, -1)
        self._await(0)

    def roundtrip(self, msg, float_dtype: str) -> None:
        """Send one FORWARD, receive and check its BACKWARD (same shape as ``act``)."""
        self.chan.send(msg, float_dtype=float_dtype)
        if not self.chan.sock.poll(int(self.timeout_s * 1000)):
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"the echo process exited with status {self.proc.returncode}: "
                                 f"{self._child_error()}")
            raise BenchError(f"no reply from the echo server on {self.address} in {self.timeout_s:.0f}s.")
        reply = self.chan.recv().msg
        if reply is None:
            raise BenchError("echo server sent an undecodable reply")
        wire.raise_if_error(reply)
        wire.check_backward(reply, tuple(msg.tensors["act"].shape))

    def raw_roundtrip(self, payload: memoryview) -> None:
        """Send ``payload`` as a bare frame and receive it back: ZeroMQ over TCP loopback
        with no codec, no validation, no casts (the floor under :meth:`roundtrip`)."""
        sock = self.chan.sock
        sock.send_multipart([b"", RAW_TAG, payload], copy=False)
        if not sock.poll(int(self.timeout_s * 1000)):
            raise BenchError(f"no raw echo from the echo server on {self.address} in {self.timeout_s:.0f}s.")
        frames = sock.recv_multipart(copy=False)
        if len(frames) != 3 or len(frames[2]) != payload.nbytes:
            raise BenchError("the raw echo came back with a different size")

    def close(self) -> None:
        try:
            if (self.proc is not None and self.proc.poll() is None) or (self.thread is not None
                                                                         and self.thread.is_alive()):
                self.chan.send(wire.bye(CLIENT, 1))
                if self.chan.sock.poll(2000):
                    self.chan.recv()
        except Exception:  # best effort: the child is stopped below either way
            pass
        self._stop.set()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=5)
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.chan.close()
        self.ctx.term()
        self._stderr.close()

    def __enter__(self) -> "EchoPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- measuring


@dataclass
class TransportSettings:
    shapes: list[tuple[int, int, int]]
    dtypes: list[str]
    repeat: int = 10
    min_seconds: float = 0.05
    echo: str = "process"
    max_message_mb: int = 512


def measure_case(shape: tuple[int, int, int], dtype: str, peer: EchoPeer, repeat: int,
                 min_seconds: float) -> dict:
    """One row: memcpy, codec and loopback seconds and rates for one shape and dtype."""
    msg = forward_message(shape)
    payload = msg.tensors["act"].to(wire.WIRE_DTYPES[dtype])
    act_bytes = payload.numel() * payload.element_size()
    frames = wire.encode(msg, dtype)
    body = [b""] + frames  # what the DEALER sends: empty delimiter, header, tensors
    tensor_bytes = sum(_frame_len(f) for f in frames[1:])
    wire_bytes = zmtp_bytes(body)

    def codec() -> None:
        wire.decode(wire.encode(msg, dtype))

    raw = memoryview(payload.reshape(-1).view(torch.uint8).numpy())
    times = time_interleaved({"memcpy": lambda: bytearray(raw), "codec": codec, "raw": lambda: peer.raw_roundtrip(raw),
                              "loopback": lambda: peer.roundtrip(msg, dtype)}, repeat, min_seconds, warmup=2)
    mem, cod, rawt, loop = (summarize(times[k]) for k in ("memcpy", "codec", "raw", "loopback"))
    raw_gbps = act_bytes / (rawt["median_s"] / 2) / GB
    oneway = loop["median_s"] / 2
    mem_gbps = act_bytes / mem["median_s"] / GB
    codec_gbps = act_bytes / cod["median_s"] / GB
    loop_gbps = act_bytes / oneway / GB
    return {
        "shape": list(shape), "dtype": dtype, "act_bytes": act_bytes, "tensor_bytes": tensor_bytes,
        "header_bytes": _frame_len(frames[0]), "wire_bytes": wire_bytes,
        "wire_over_act": wire_bytes / act_bytes, "wire_over_tensors": wire_bytes / tensor_bytes,
        "memcpy_s": mem["median_s"], "memcpy_GBps": mem_gbps,
        "codec_s": cod["median_s"], "codec_GBps": codec_gbps, "codec_vs_memcpy": ratio(codec_gbps, mem_gbps),
        "raw_roundtrip_s": rawt["median_s"], "raw_GBps": raw_gbps, "raw_vs_memcpy": ratio(raw_gbps, mem_gbps),
        "roundtrip_s": loop["median_s"], "oneway_s": oneway, "loopback_GBps": loop_gbps,
        "loopback_msgs_per_s": 1.0 / oneway, "loopback_vs_memcpy": ratio(loop_gbps, mem_gbps),
        "loopback_vs_raw": ratio(loop_gbps, raw_gbps), "loopback_spread": loop["spread"], "samples": repeat,
    }


def run_transport(settings: TransportSettings, on_case: Callable[[dict], None] | None = None) -> list[dict]:
    """Every (shape, dtype) case, one echo server for all of them."""
    rows = []
    with EchoPeer(settings.echo, settings.max_message_mb) as peer:
        for shape in settings.shapes:
            for dtype in settings.dtypes:
                row = measure_case(shape, dtype, peer, settings.repeat, settings.min_seconds)
                rows.append(row)
                if on_case is not None:
                    on_case(row)
    return rows


def check_targets(rows: Sequence[dict]) -> list[dict]:
    """The transport targets: loopback (codec + sockets) of a [4,512,576] fp32 FORWARD
    >= 1 GB/s one way; wire bytes <= 1.01 x activation bytes (every case)."""
    out = []
    for r in rows:
        if tuple(r["shape"]) == TARGET_SHAPE and r["dtype"] == TARGET_DTYPE:
            out.append({"target": f"loopback {list(TARGET_SHAPE)} {TARGET_DTYPE} >= {TARGET_GBPS:g} GB/s one way",
                        "value": r["loopback_GBps"], "met": r["loopback_GBps"] >= TARGET_GBPS})
            out.append({"target": f"codec {list(TARGET_SHAPE)} {TARGET_DTYPE} >= {TARGET_GBPS:g} GB/s",
                        "value": r["codec_GBps"], "met": r["codec_GBps"] >= TARGET_GBPS})
    if rows:
        worst = max(rows, key=lambda r: r["wire_over_act"])
        out.append({"target": f"wire bytes <= {TARGET_OVERHEAD} x activation bytes (worst case "
                              f"{'x'.join(map(str, worst['shape']))} {worst['dtype']})",
                    "value": worst["wire_over_act"], "met": worst["wire_over_act"] <= TARGET_OVERHEAD})
    return out


def _shape(v) -> str:
    return "x".join(map(str, v))


def codec_roundtrip_seconds(shape=(4, 512, 576), dtype="fp32", repeat=20) -> dict:
    """Time encode and decode of one FORWARD-sized tensor of `shape`, cast to `dtype`.

    Decoding reads `bytes` copies of the frames, as a socket would hand them over.
    Returns seconds per call and payload throughput in bytes/s.
    """
    msg = wire.Message(wire.MsgType.FORWARD, "client", 0, tensors={"act": torch.randn(*shape)})
    wire.encode(msg, dtype)  # warm-up
    enc_s = dec_s = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        frames = wire.encode(msg, dtype)
        t1 = time.perf_counter()
        received = [bytes(f) for f in frames]
        t2 = time.perf_counter()
        wire.decode(received)
        dec_s += time.perf_counter() - t2
        enc_s += t1 - t0
    payload = sum(len(f) for f in received[1:])
    wire_bytes = sum(len(f) for f in received)
    enc_s, dec_s = enc_s / repeat, dec_s / repeat
    return {"shape": list(shape), "dtype": dtype, "payload_bytes": payload, "wire_bytes": wire_bytes,
            "encode_s": enc_s, "decode_s": dec_s, "roundtrip_s": enc_s + dec_s,
            "bytes_per_s": payload / max(enc_s + dec_s, 1e-12)}


COLUMNS = [
    Column("shape", "shape", _shape), Column("dtype"),
    Column("act_bytes", "MB", lambda v: f"{v / 1e6:.2f}"),
    Column("memcpy_GBps", "memcpy GB/s", ".2f"),
    Column("codec_GBps", "codec GB/s", ".2f"), Column("codec_vs_memcpy", "codec /memcpy", ".2f"),
    Column("loopback_GBps", "loop GB/s", ".2f"), Column("loopback_msgs_per_s", "msg/s", ".0f"),
    Column("loopback_vs_memcpy", "loop /memcpy", ".3f"),
    Column("raw_GBps", "raw zmq GB/s", ".2f"), Column("loopback_vs_raw", "loop /raw", ".2f"),
    Column("wire_over_act", "wire /act", ".4f"),
]


# --------------------------------------------------------------------------- child entry


def _main(argv: list[str]) -> int:
    """``python -m bench.transport echo ADDRESS [MAX_MESSAGE_MB] [PARENT_PID] [TORCH_THREADS]``."""
    if len(argv) < 2 or argv[0] != "echo":
        print("usage: python -m bench.transport echo ADDRESS [MAX_MESSAGE_MB] [PARENT_PID] [TORCH_THREADS]",
              file=sys.stderr)
        return 2
    mb = int(argv[2]) if len(argv) > 2 else 512
    parent = int(argv[3]) if len(argv) > 3 else None
    if len(argv) > 4:
        torch.set_num_threads(int(argv[4]))
    echo_serve(argv[1], mb, parent_pid=parent)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
