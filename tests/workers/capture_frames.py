"""``python tests/workers/capture_frames.py OUT -- <lesft-worker args>``: run one worker with every
ZeroMQ frame it sends appended to OUT (4-byte big-endian length, then the bytes), for the
test that a client's data never leaves it (tests/workers/test_own_data_e2e.py)."""
from __future__ import annotations

import struct
import sys

import zmq

_send = zmq.Socket.send


def _capturing_send(self, data, *args, **kwargs):
    raw = data.bytes if isinstance(data, zmq.Frame) else bytes(memoryview(data))
    with open(OUT, "ab") as fh:
        fh.write(struct.pack(">I", len(raw)) + raw)
    return _send(self, data, *args, **kwargs)


def read_frames(path) -> list[bytes]:
    data, out, pos = open(path, "rb").read(), [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


if __name__ == "__main__":
    OUT = sys.argv[1]
    zmq.Socket.send = _capturing_send
    sys.argv = ["lesft-worker", *sys.argv[3:]]
    from workers.main import main

    sys.exit(main())
