"""What libzmq tells about a received frame: its own module, so that the transport, the
CURVE set-up and the broker can all read it without importing one another."""

from __future__ import annotations

import zmq


def frame_user_id(frame) -> str | None:
    """The ZAP User-Id of the CURVE peer a received frame came from (None: not known here)."""
    try:
        return frame.get("User-Id") or None
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
