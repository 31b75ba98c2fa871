"""The broker: a ROUTER (clients' DEALERs connect) <-> DEALER (the server connects) proxy.

It forwards whole multipart messages both ways without decoding them, so no content can
crash it; it counts messages and bytes per direction and stops cleanly on SIGTERM. The
adapter broadcast does not pass here: the aggregator publishes on its own PUB socket
(it belongs to another organisation than the server, paper sec. 3.2).

With CurveZMQ (``--keys-dir``) it is also where a client's identity is fixed: the ZAP
User-Id of a frontend message (``client-<i>``, from the key that sent it) goes to the
server as one envelope frame ``lesft-user:client-<i>`` (any frame of that prefix a
client put there is dropped first), and that frame is removed from replies.
"""

from __future__ import annotations

import time

import zmq

from lesft.config import Config
from workers import curve
from workers.common import Worker, frames_bytes, make_socket


class Broker(Worker):
    role = "broker"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, -1)

    def run(self) -> int:
        net = self.cfg.net
        front = make_socket(self.ctx, zmq.ROUTER, self.cfg, bind=net.broker_frontend, identity="broker")
        back = make_socket(self.ctx, zmq.DEALER, self.cfg, bind=net.broker_backend, identity="broker")
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        self.log.info("broker up: clients -> %s, server -> %s", net.broker_frontend, net.broker_backend)
        last = time.monotonic()
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(100))
                if front in events:
                    self._forward(front, back, "to_server")
                if back in events:
                    self._forward(back, front, "to_clients")
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
                frames = src.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            n = frames_bytes(frames)
            self.meter.received(direction, n)
            frames = self._identify(frames) if direction == "to_server" else curve.strip_stamps(frames, 1)
            if frames is None:
                self.meter.count(f"dropped.{direction}")
                continue
            try:
                dst.send_multipart(frames, zmq.NOBLOCK, copy=False)
                self.meter.sent(direction, n)
            except zmq.Again:  # no server connected yet / peer gone: the client will retry
                self.meter.count(f"dropped.{direction}")

    def _identify(self, frames: list) -> list | None:
        """Stamp a client's message with the id its CurveZMQ key proves (None: drop it)."""
        if not self.cfg.net.keys_dir:
            return curve.stamp(frames, None)
        user = curve.frame_user_id(frames[0])
        if user is None or not curve.CLIENT_NAME.match(user):
            self.meter.count("unauthenticated")
            return None
        return curve.stamp(frames, user)
