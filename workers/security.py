"""Transport security: CurveZMQ when keys are configured; plaintext only on loopback
unless ``--insecure``."""

from __future__ import annotations

import ipaddress
import socket
import sys
from urllib.parse import urlparse

import zmq

from lesft.config import Config, ConfigError


def is_loopback(address: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine (ipc://, inproc://, 127.x, ::1, localhost)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = urlparse(address).hostname or ""
    if host in ("localhost",):
        return True
    if host in ("*", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def configure(sock: zmq.Socket, cfg: Config, *, address: str | None, serving: bool,
              server_key: bytes | None = None, identity: str | None = None) -> None:
    """Secure ``sock`` before it binds or connects.

    With ``cfg.net.keys_dir`` every socket speaks CurveZMQ (:mod:`workers.curve`);
    ``identity`` names its key pair ("server", "broker", "aggregator", "client-<i>") and
    is inferred from the address and the calling worker when left out. Without keys,
    plaintext TCP to an address off this machine is refused unless ``cfg.net.insecure``.
    """
    if cfg.net.keys_dir:
        from workers import curve

        curve.apply(sock, cfg, serving=serving, server_key=server_key, address=address, identity=identity)
        return
    if address and not is_loopback(address) and not cfg.net.insecure:
        raise ConfigError(f"refusing plaintext TCP on {address}: activations can be inverted to text. "
                          "Set up keys (lesft keys generate --out DIR; --keys-dir DIR) or pass --insecure.")


def authorise(envelope: list, sender: int, cfg: Config, user_id: str | None = None) -> None:
    """Check that a message claiming to come from client ``sender`` was sent with that
    client's key. Without CurveZMQ there is nothing to check (loopback/insecure runs).
    Raises ``WireError(UNAUTHORISED)`` on a mismatch."""
    if cfg.net.keys_dir:
        from workers import curve

        curve.authorise(envelope, sender, cfg, user_id)


def refusal() -> str | None:
    """Why a peer refused this process's CurveZMQ key, once that has happened (else None)."""
    if "workers.curve" not in sys.modules:
        return None
    from workers import curve

    return curve.refusal()
