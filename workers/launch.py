"""One launcher for tests, benchmarks and ``lesft train``: start the roles of a run as
real subprocesses on free loopback ports, wait for them, collect their metrics, and
always clean up (no orphan process survives a failure or an interrupt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from lesft.config import Config
from lesft.methods import get_method
from lesft.metrics import read_jsonl, summarize_run


class LaunchError(RuntimeError):
    """A worker failed; the message names it and quotes the end of its log."""


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def local_addresses(transport: str = "tcp", folder: Path | None = None) -> dict[str, str]:
    """Fresh loopback endpoints for the four bound sockets (tcp ports or ipc:// paths)."""
    names = ("broker_frontend", "broker_backend", "aggregator_address", "aggregator_pub")
    if transport == "ipc":
        folder = folder or Path("/tmp")
        return {n: f"ipc://{folder}/lesft-{os.getpid()}-{n}.sock" for n in names}
    return {n: f"tcp://127.0.0.1:{p}" for n, p in zip(names, free_ports(len(names)))}


def roles_for(cfg: Config) -> list[tuple[str, int]]:
    """Which processes a method needs: (role, id) in start order."""
    m = get_method(cfg.train.method)
    roles: list[tuple[str, int]] = []
    if m.centralized:
        return [("server", 0)]
    if m.split:
        roles += [("broker", 0), ("server", 0)]
    if m.aggregate:
        roles.append(("aggregator", 0))
    return roles + [("client", i) for i in range(cfg.data.clients)]


@dataclass
class Proc:
    role: str
    id: int
    popen: subprocess.Popen
    log_path: Path

    @property
    def name(self) -> str:
        return f"{self.role}-{self.id}"

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class LaunchResult:
    run_dir: Path
    returncodes: dict[str, int]
    wall_s: float
    summary: dict = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The children's environment: no LESFT_* settings (the run's TOML is the one source)."""
    from lesft.config import leaf_fields

    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("LESFT_") and k[6:].lower() in leaf_fields()) and k != "LESFT_CONFIG"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start(cfg_path: Path, role: str, worker_id: int, log_dir: Path, env: dict, extra_args: Sequence[str] = ()) -> Proc:
    log_path = log_dir / f"{role}-{worker_id}.log"
    cmd = [sys.executable, "-m", "workers.main", "--role", role, "--id", str(worker_id), "--config", str(cfg_path),
           *extra_args]
    fh = open(log_path, "ab")
    env = dict(env, LESFT_PARENT_PID=str(os.getpid()))  # it stops when this process dies (even by SIGKILL)
    popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    fh.close()
    return Proc(role, worker_id, popen, log_path)


def stop_all(procs: Sequence[Proc], grace_s: float = 10.0) -> None:
    """SIGTERM every live process, then SIGKILL what is left after the grace period."""
    live = [p for p in procs if p.popen.poll() is None]
    for p in live:
        try:
            os.killpg(p.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.popen.wait()


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the block like Ctrl-C (KeyboardInterrupt), so the ``finally``
    that stops the workers runs; outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A second Ctrl-C or SIGTERM waits until the workers are stopped (it cannot orphan them)."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def progress_records(run_dir: Path) -> list[dict]:
    """The round records that measure a run's progress: the server's, else client 0's (fedavg)."""
    recs = server_rounds(run_dir)
    if not recs and (run_dir / "client-0.jsonl").is_file():
        recs = [r for r in read_jsonl(run_dir / "client-0.jsonl") if r.get("event") == "round"]
    return recs


def launch(cfg: Config, *, roles: Sequence[tuple[str, int]] | None = None, timeout_s: float | None = None,
           client_threads: int | None = 1, transport: str = "tcp", extra_args: dict[str, Sequence[str]] | None = None,
           on_poll: Callable[[Path, list[Proc]], None] | None = None, env: dict[str, str] | None = None,
           existing: str = "new") -> LaunchResult:
    """Run a whole fine-tune as real processes on this machine; return when it has ended.

    ``cfg.run.run_id`` names the run folder (a timestamp when empty); ``existing`` says what
    to do when it already holds a run (``new``: refuse, ``overwrite``: delete it, ``resume``:
    continue it; see :func:`lesft.runs.open_run_dir`). The addresses in ``cfg`` are
    replaced by fresh loopback ones. Raises :class:`LaunchError` when a worker fails or
    ``timeout_s`` passes, :class:`lesft.runs.RunInterrupted` on Ctrl-C, SIGTERM or
    SIGHUP; every process is stopped either way (and stops by itself if this one is killed).
    """
    from lesft.runs import RunInterrupted, mark_run, new_run_id, open_run_dir

    run_id = cfg.run.run_id or new_run_id()
    run_dir = open_run_dir(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_id=run_id)), existing)
    net = dataclasses.replace(cfg.net, **local_addresses(transport, run_dir))
    cfg = dataclasses.replace(cfg, net=net, run=dataclasses.replace(cfg.run, run_id=run_id))
    cfg_path = run_dir / "config.toml"
    cfg_path.write_text(cfg.to_toml())
    cfg.save(run_dir / "config.json")
    log_dir = run_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    child_env = worker_env(env)
    roles = list(roles or roles_for(cfg))
    procs: list[Proc] = []
    t0 = time.monotonic()
    try:
        with interrupt_on_signals():
            try:
                for role, wid in roles:
                    args = list((extra_args or {}).get(role, ()))
                    if existing == "resume":
                        args.append("--resume")
                    if role == "client" and client_threads:
                        args += ["--threads", str(client_threads)]
                    procs.append(start(cfg_path, role, wid, log_dir, child_env, args))
                _wait(procs, timeout_s, t0, run_dir, on_poll)
            finally:
                with _signals_held():
                    stop_all(procs, grace_s=5.0)
    except KeyboardInterrupt:
        recs = progress_records(run_dir)
        done, rounds = len(recs), (recs[-1].get("rounds") if recs else None)
        mark_run(run_dir, complete=False, round=done, rounds=rounds)
        raise RunInterrupted(run_dir, done, rounds) from None
    codes = {p.name: p.popen.returncode for p in procs}
    return LaunchResult(run_dir, codes, time.monotonic() - t0, summarize_run(run_dir),
                        {p.name: p.log_path for p in procs})


def _wait(procs: list[Proc], timeout_s: float | None, t0: float, run_dir: Path,
          on_poll: Callable[[Path, list[Proc]], None] | None) -> None:
    """Until every non-broker process has exited 0 (the broker serves until told to stop)."""
    workers = [p for p in procs if p.role != "broker"]
    while True:
        for p in procs:
            code = p.popen.poll()
            if code not in (None, 0):
                raise LaunchError(f"{p.name} exited with status {code}; end of {p.log_path}:\n{p.tail()}")
            if code is None and p.role == "broker":
                continue
        if all(p.popen.poll() == 0 for p in workers):
            return
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            stuck = [p.name for p in workers if p.popen.poll() is None]
            raise LaunchError(f"run did not finish within {timeout_s:.0f}s (still running: {', '.join(stuck)}); "
                              f"logs in {run_dir / 'logs'}")
        if on_poll:
            on_poll(run_dir, procs)
        time.sleep(0.2)


def server_rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "server-0.jsonl"
    return [r for r in read_jsonl(path) if r.get("event") == "round"] if path.is_file() else []
