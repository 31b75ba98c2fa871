"""CurveZMQ for every socket of a run: key files, the ZAP allow-list, authenticated ids.

Key folder (``lesft keys generate --out DIR``; docs/security.md says who gets what)::

    server.key     server.key_secret       the server (connects to the broker backend)
    broker.key     broker.key_secret       the broker (serves clients and the server)
    aggregator.key aggregator.key_secret   the aggregator (ROUTER + PUB)
    clients/client-<i>.key(_secret)        client i (also found as DIR/client-<i>.key_secret)
    allowed_clients/client-<i>.key         the public keys the broker and aggregator accept

Every bound socket is a CURVE server whose ZAP domain says who may connect:

- ``lesft-clients`` (broker frontend, aggregator ROUTER and PUB): a key in
  ``allowed_clients/``; the ZAP User-Id is ``client-<i>``, taken from the file name.
  The folder is re-read when it changes, so removing a file refuses that key at its
  next handshake (restart the broker and aggregator to cut live connections).
- ``lesft-server`` (broker backend): only ``server.key``; User-Id ``server``. Without
  it anyone reaching the backend could pose as the server and receive activations.

Connecting sockets are CURVE clients with their own key pair and the public key of the
process they connect to. Identity travels as follows: the aggregator reads the ZAP
User-Id of each received frame; the server sits behind the broker, so the broker
inserts one envelope frame ``lesft-user:client-<i>`` (after removing any a client
forged; ``lesft.wire.stamp``) and removes it from replies. :func:`authorise` checks either form.
"""

from __future__ import annotations

import _thread
import atexit
import logging
import signal
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from lesft.config import Config, ConfigError
from lesft.wire import CLIENT_NAME, ErrorCode, WireError, stamped_user
from workers.transport import frame_user_id

log = logging.getLogger("curve")

DOMAIN_CLIENTS = "lesft-clients"
DOMAIN_SERVER = "lesft-server"
ROLES = ("server", "broker", "aggregator")
HINT = "create keys with `lesft keys generate --out DIR` and pass --keys-dir DIR (see docs/security.md)"


# ----------------------------------------------------------------------------- key files

def _keys_dir(cfg: Config) -> Path:
    return Path(cfg.net.keys_dir).expanduser()


def secret_path(cfg: Config, identity: str) -> Path:
    """Where ``identity`` ("server", "broker", "aggregator", "client-<i>") keeps its key pair."""
    root = _keys_dir(cfg)
    if CLIENT_NAME.match(identity):
        nested = root / "clients" / f"{identity}.key_secret"
        flat = root / f"{identity}.key_secret"
        return flat if flat.is_file() and not nested.is_file() else nested
    return root / f"{identity}.key_secret"


def _load(path: Path, who: str, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"missing CurveZMQ key file {path} (needed by the {who}): {HINT}")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"unreadable CurveZMQ key file {path} ({e}): {HINT}") from None
    if secret and not secret_key:
        raise ConfigError(f"{path} holds no secret key (needed by the {who}): {HINT}")
    return public, secret_key


def key_pair(cfg: Config, identity: str) -> tuple[bytes, bytes]:
    public, secret = _load(secret_path(cfg, identity), identity, secret=True)
    return public, secret  # type: ignore[return-value]


def public_key(cfg: Config, owner: str, who: str) -> bytes:
    """The z85 public key of ``owner`` (as every key here: the form ZeroMQ options and ZAP use)."""
    return _load(_keys_dir(cfg) / f"{owner}.key", who, secret=False)[0]


# ----------------------------------------------------------------------------- ZAP

class AllowList:
    """ZAP credentials for one domain: z85 public key -> user id, re-read when changed.

    ``folder``: every ``client-<i>.key`` in it is allowed as ``client-<i>``; ``fixed``:
    one key with its user id (the server on the broker backend).
    """

    def __init__(self, folder: Path | None = None, fixed: tuple[bytes, str] | None = None) -> None:
        self.folder, self.fixed = folder, fixed
        self.names: dict[bytes, str] = {}
        self._stamp: tuple | None = None
        self._denied: set[bytes] = set()
        self.reload()

    def reload(self) -> None:
        if self.fixed is not None:
            self.names = {self.fixed[0]: self.fixed[1]}
            return
        try:
            files = sorted(self.folder.glob("*.key"))
            stamp = tuple((p.name, p.stat().st_mtime_ns) for p in files)
        except OSError:
            self.names, self._stamp = {}, None
            return
        if stamp == self._stamp:
            return
        names: dict[bytes, str] = {}
        for path in files:
            name = path.name[: -len(".key")]
            if not CLIENT_NAME.match(name):
                log.warning("ignoring %s in the allow-list: names must be client-<i>.key", path)
                continue
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (ValueError, OSError) as e:
                log.warning("ignoring unreadable allow-list file %s (%s)", path, e)
                continue
            names[public] = name
        self.names, self._stamp = names, stamp

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP check of a z85 client key (runs on the authenticator thread)."""
        self.reload()
        if key in self.names:
            return True
        if key not in self._denied:
            self._denied.add(key)
            where = self.folder if self.folder is not None else "server.key"
            log.warning("refused a CurveZMQ key not in %s (domain %s, key %s)", where, domain, key.decode())
        return False


class Authenticator(ThreadAuthenticator):
    """The ZAP handler of one context; the User-Id of a peer is its allow-list name."""

    def curve_user_id(self, client_public_key: bytes) -> str:
        key = z85.encode(client_public_key)
        for provider in self.credentials_providers.values():
            name = provider.names.get(key)
            if name:
                return name
        return "anonymous"


_AUTH: dict[int, tuple[zmq.Context, Authenticator]] = {}
_AUTH_LOCK = threading.Lock()


def authenticator(ctx: zmq.Context, cfg: Config, domain: str) -> Authenticator:
    """The running ZAP handler of ``ctx`` with ``domain`` configured (started once per context).

    It must run before any CURVE server socket binds: libzmq lets every key in when no
    handler is bound at ``inproc://zeromq.zap.01``.
    """
    with _AUTH_LOCK:
        entry = _AUTH.get(id(ctx))
        if entry is None or entry[0] is not ctx:
            auth = Authenticator(ctx, log=logging.getLogger("zap"))
            auth.start()
            _AUTH[id(ctx)] = entry = (ctx, auth)
        auth = entry[1]
        if domain not in auth.credentials_providers:
            if domain == DOMAIN_CLIENTS:
                folder = _keys_dir(cfg) / "allowed_clients"
                if not folder.is_dir():
                    raise ConfigError(f"missing CurveZMQ allow-list folder {folder}: {HINT}")
                provider = AllowList(folder=folder)
                if not provider.names:
                    log.warning("the allow-list %s holds no client-<i>.key: every client will be refused", folder)
            else:
                provider = AllowList(fixed=(public_key(cfg, "server", "broker"), "server"))
            auth.configure_curve_callback(domain, provider)
        return auth


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the ZAP handler of ``ctx`` (before ``ctx.term()``; also done at exit)."""
    with _AUTH_LOCK:
        entry = _AUTH.pop(id(ctx), None)
    if entry is not None:
        entry[1].stop()


@atexit.register
def _stop_all() -> None:
    for ctx, _ in list(_AUTH.values()):
        stop_authenticator(ctx)


# ----------------------------------------------------------------------------- sockets

def endpoint_owner(cfg: Config, address: str | None) -> str | None:
    """Which key pair serves ``address``: "broker", "aggregator", or None when unknown."""
    net = cfg.net
    if address in (net.broker_frontend, net.broker_backend):
        return "broker"
    if address in (net.aggregator_address, net.aggregator_pub):
        return "aggregator"
    return None


def resolve_identity(cfg: Config, kind: int, address: str | None, serving: bool, identity: str | None) -> str:
    if identity:
        return identity
    owner = endpoint_owner(cfg, address)
    if serving and owner:
        return owner
    if not serving and kind in (zmq.ROUTER, zmq.DEALER) and address == cfg.net.broker_backend:
        return "server"
    raise ConfigError(f"cannot tell which CurveZMQ key pair the socket for {address} should use: "
                      "pass identity= to make_socket")


def apply(sock: zmq.Socket, cfg: Config, *, serving: bool, server_key: bytes | None = None,
          address: str | None = None, identity: str | None = None) -> None:
    """Make ``sock`` a CURVE server (bound sockets) or CURVE client (connecting ones)."""
    if not zmq.has("curve"):
        raise ConfigError("this libzmq has no CURVE support: install pyzmq with libsodium/CURVE, "
                          "or run without --keys-dir on loopback")
    me = resolve_identity(cfg, sock.type, address, serving, identity)
    public, secret = key_pair(cfg, me)
    sock.curve_publickey, sock.curve_secretkey = public, secret
    if serving:
        domain = DOMAIN_SERVER if (me == "broker" and address == cfg.net.broker_backend) else DOMAIN_CLIENTS
        authenticator(sock.context, cfg, domain)
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        return
    if server_key is None:
        owner = endpoint_owner(cfg, address)
        if owner is None:
            raise ConfigError(f"no CurveZMQ server key known for {address}: it is none of the --broker-*/"
                              "--aggregator-* addresses")
        server_key = public_key(cfg, owner, me)
    sock.curve_serverkey = server_key
    _watch(sock, address or "?", me, endpoint_owner(cfg, address) or "peer")


# ----------------------------------------------------------------------------- refusals

_refusals: list[str] = []
_warned: set[tuple[str, str]] = set()


def refusal() -> str | None:
    """The first CurveZMQ refusal this process met (a peer rejected its key), if any."""
    return _refusals[0] if _refusals else None


def _watch(sock: zmq.Socket, address: str, me: str, owner: str) -> None:
    """Watch a connecting socket's handshakes: a refused key ends the worker cleanly.

    A refusal is final (the key is not in the peer's allow-list), so waiting out
    request timeouts would only hide it. The line is logged, kept for :func:`refusal`,
    and the worker's own SIGTERM handler is run (nothing happens where none is set).
    """
    events = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_MONITOR_STOPPED)
    mon = sock.get_monitor_socket(events)
    mon.linger = 0
    threading.Thread(target=_monitor, args=(mon, address, me, owner), daemon=True,
                     name=f"curve-monitor-{me}").start()


def _monitor(mon: zmq.Socket, address: str, me: str, owner: str) -> None:
    from zmq.utils.monitor import recv_monitor_message

    try:
        while True:
            if not mon.poll(500):
                continue
            event = recv_monitor_message(mon)["event"]
            if event == zmq.EVENT_MONITOR_STOPPED:
                return
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                _refused(f"the {owner} at {address} refused the CurveZMQ key of {me}: "
                         + (f"its public key {me}.key must be in the {owner}'s allowed_clients/ folder"
                            if me.startswith("client-") else f"the {owner} must hold this {me}.key")
                         + " (lesft keys generate; docs/security.md)")
            elif ("handshake", address) not in _warned:
                _warned.add(("handshake", address))
                log.warning("CurveZMQ handshake with the %s at %s failed: check that --keys-dir holds that "
                            "%s's current %s.key (retrying)", owner, address, owner, owner)
    except zmq.ZMQError:  # the context is ending
        return
    finally:
        mon.close(linger=0)


def _refused(line: str) -> None:
    if _refusals:
        return
    _refusals.append(line)
    log.error("%s", line)
    if callable(signal.getsignal(signal.SIGTERM)):
        _thread.interrupt_main(signal.SIGTERM)


# ----------------------------------------------------------------------------- identity

def authorise(envelope: list, sender: int, cfg: Config, user_id: str | None = None) -> None:  # noqa: ARG001
    """Raise ``WireError(UNAUTHORISED)`` unless the message was sent with client ``sender``'s key.

    A direct CURVE peer (the aggregator's clients) is known by the User-Id of its frames
    (or ``user_id``); a client behind the broker (the server's) by the broker's stamp.
    """
    expected = f"client-{sender}"
    user = user_id or next((u for u in map(frame_user_id, envelope) if u), None) or stamped_user(envelope, sender)
    if user != expected:
        raise WireError(ErrorCode.UNAUTHORISED, f"the message claims client {sender} but was sent with the key "
                                                f"of {user}: a client may only speak as itself")
