"""The broker: a ROUTER (clients' DEALERs connect) <-> ROUTER (the server's DEALER connects) proxy.

It forwards whole multipart messages both ways without decoding them, so no content can
crash it; it counts messages and bytes per direction and stops cleanly on SIGTERM. The
adapter broadcast does not pass here: the aggregator publishes on its own PUB socket
(it belongs to another organisation than the server, paper sec. 3.2).

Requests go to the server by its routing id (``lesft-server``), never round-robin to
whatever connected to the backend: a stray connection (a port scanner, an HTTP request,
which libzmq takes for a ZMTP/1.0 peer) receives nothing, and only the peer holding that
id can answer clients. libzmq gives an id to the first live connection that claims it
(a second one is refused until the first is gone), so a restarted server gets it back.
With CurveZMQ only the server's key can connect to the backend at all; in plaintext
mode a local process that connects first with that id can pose as the server
(docs/security.md). Messages above the frame or byte ceiling are dropped as they are
read (frame by frame), never forwarded.

With CurveZMQ (``--keys-dir``) it is also where a client's identity is fixed: the ZAP
User-Id of a frontend message (``client-<i>``, from the key that sent it) goes to the
server as one envelope frame ``lesft-user:client-<i>`` (any frame of that prefix a
client put there is dropped first), and that frame is removed from replies.

The edge-link emulator (``--link-up 4mbit --link-down 20mbit --link-latency-ms 50``, for
benchmarks and tests; off by default) gives every client one bottleneck link per direction
(:mod:`lesft.link`): a message waits in the broker until its link has carried it, then
leaves. A message counts as its body bytes (header frame + tensor frames: what the
client's meter counts), not the routing envelope nor ZMTP framing; with CurveZMQ these are
the plaintext lengths (encryption adds a few tens of bytes a frame). The loop polls until
the next message is due, so waiting costs no CPU and never holds up other traffic. Each
shaped message is one ``link`` line of the broker's metrics file (type, client, round,
bytes, arrival and departure on the machine's monotonic clock) for ``lesft bench link``.
The aggregator's traffic (uploads, the broadcast) does not pass the broker: not shaped.
"""

from __future__ import annotations

import math
import time

import zmq

from lesft import wire
from lesft.config import Config
from lesft.link import Shaper
from workers.frames import frame_user_id
from workers.process import Process
from workers.transport import (ENVELOPE_FRAMES, SERVER_ROUTING_ID, Oversized, frames_bytes, make_socket,
                               recv_bounded)


class Broker(Process):
    role = "broker"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, -1)
        self.shaper = Shaper(*cfg.net.link_rates, cfg.net.link_latency_ms / 1000)
        self.link_peers: dict[bytes, int] = {}  # routing id -> the client id its messages claim (trace only)

    def run(self) -> int:
        net = self.cfg.net
        front = make_socket(self.ctx, zmq.ROUTER, self.cfg, bind=net.broker_frontend, identity="broker")
        back = make_socket(self.ctx, zmq.ROUTER, self.cfg, bind=net.broker_backend, identity="broker")
        back.setsockopt(zmq.ROUTER_MANDATORY, 1)  # no server connected: the send fails and is counted
        lim = wire.Limits()
        self.max_frames = lim.max_frames + ENVELOPE_FRAMES
        self.max_bytes = net.max_message_mb * 2**20 + lim.max_header_bytes + 4096
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        self.log.info("broker up: clients -> %s, server -> %s%s", net.broker_frontend, net.broker_backend,
                      f" (emulated link: up {net.link_up or 'unshaped'}, down {net.link_down or 'unshaped'}, "
                      f"{net.link_latency_ms:g} ms one way)" if self.shaper.active else "")
        last = time.monotonic()
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(self._poll_ms()))
                if front in events:
                    self._forward(front, back, "to_server")
                if back in events:
                    self._forward(back, front, "to_clients")
                self._release()
                if time.monotonic() - last > 30:
                    self.record("traffic", **self.meter.snapshot())
                    last = time.monotonic()
        finally:
            front.close(linger=0)
            back.close(linger=0)
            self.finish()
        return 0

    def _forward(self, src: zmq.Socket, dst: zmq.Socket, direction: str) -> None:
        for _ in range(1000):  # drain a burst, but keep the other direction served
            try:
                frames = recv_bounded(src, self.max_frames, self.max_bytes, zmq.NOBLOCK)
            except zmq.Again:
                return
            except Oversized as e:
                self.meter.received(direction, e.nbytes)
                self.meter.count(f"dropped.too_large.{direction}")
                continue
            n = frames_bytes(frames)
            self.meter.received(direction, n)
            frames = self._identify(frames) if direction == "to_server" else self._from_server(frames)
            if frames is None:
                self.meter.count(f"dropped.{direction}")
            elif self.shaper.active:
                self._shape(dst, frames, direction, n)
            else:
                self._send(dst, frames, direction, n)

    def _send(self, dst: zmq.Socket, frames: list, direction: str, n: int) -> None:
        try:
            dst.send_multipart(frames, zmq.NOBLOCK, copy=False)
            self.meter.sent(direction, n)
        except (zmq.Again, zmq.ZMQError):  # no server connected yet / peer gone: the client will retry
            self.meter.count(f"dropped.{direction}")

    def _shape(self, dst: zmq.Socket, frames: list, direction: str, n: int) -> None:
        """Put a message on its client's link; :meth:`_release` sends it when it is due."""
        up = direction == "to_server"
        peer = bytes(frames[1] if up else frames[0])  # the client's routing id (up: after the server's)
        try:
            body = wire.split_envelope(frames)[1]
        except wire.WireError:  # not a routed message: the server drops it; it still crosses the link
            body = frames
        nbytes = frames_bytes(body)
        now = time.perf_counter()
        trace = {"event": "link", "dir": "up" if up else "down", "bytes": nbytes, "in": round(now, 6)}
        try:
            trace["type"], sender, trace["round"] = wire.peek(body)
        except wire.WireError:
            sender = None
        if up and sender is not None:
            if len(self.link_peers) >= 4096:  # clients that come and go: forget, relearn from their next message
                self.link_peers.clear()
            self.link_peers[peer] = sender
        trace["client"] = self.link_peers.get(peer)
        due = self.shaper.push(trace["dir"], peer, nbytes, (dst, frames, direction, n, trace), now)
        trace["out"] = round(due, 6)

    def _release(self) -> None:
        """Send every shaped message that is due, and note it in the metrics file."""
        for dst, frames, direction, n, trace in self.shaper.pop_due(time.perf_counter()):
            self._send(dst, frames, direction, n)
            self.metrics.write(trace)

    def _poll_ms(self) -> int:
        """Poll until the next shaped message is due (at most 100 ms: the stop flag is checked)."""
        due = self.shaper.next_due()
        if due is None:
            return 100
        return max(0, min(100, math.ceil((due - time.perf_counter()) * 1000)))

    def _from_server(self, frames: list) -> list | None:
        """A backend message goes to a client only when the server sent it (its routing id)."""
        if len(frames) < 2 or frames[0].bytes != SERVER_ROUTING_ID:
            self.meter.count("dropped.not_server")
            return None
        return wire.strip_stamps(frames[1:], 1)

    def _identify(self, frames: list) -> list | None:
        """Stamp a client's message with the id its CurveZMQ key proves (None: drop it), and
        address it to the server."""
        if not self.cfg.net.keys_dir:
            return [SERVER_ROUTING_ID, *wire.stamp(frames, None)]
        user = frame_user_id(frames[0])
        if user is None or not wire.CLIENT_NAME.match(user):
            self.meter.count("unauthenticated")
            return None
        return [SERVER_ROUTING_ID, *wire.stamp(frames, user)]
