"""The frame of every process of a run (the broker and the three roles): logging, clean
shutdown on SIGTERM, the run folder, the meter and the metrics file."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import zmq

from lesft.config import Config
from lesft.metrics import JsonlWriter, Meter


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(level=os.environ.get("LESFT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    return logging.getLogger(name)


def stop_event() -> threading.Event:
    """Set on SIGTERM/SIGINT: loops finish their step, write their files and exit 0."""
    ev = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        ev.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return ev


def die_with_parent() -> None:
    """A worker started by the launcher (``LESFT_PARENT_PID``) stops when the launcher dies,
    even by SIGKILL: Linux sends it SIGTERM (PR_SET_PDEATHSIG); elsewhere a thread notices
    the new parent. SIGTERM then ends it cleanly (see :func:`stop_event`)."""
    parent = os.environ.get("LESFT_PARENT_PID")
    if not parent or not parent.isdigit():
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
                if os.getppid() != int(parent):  # died before prctl took effect
                    os.kill(os.getpid(), signal.SIGTERM)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_dir_for(cfg: Config, existing: str = "any") -> Path:
    """Workers must agree on the folder: the run id defaults to "default" (not a timestamp).

    The worker entry point (``workers.main``) checks it first with ``existing="join"``: a
    worker refuses a finished run's folder unless told ``--resume`` or ``--overwrite``.
    """
    from lesft.runs import open_run_dir

    return open_run_dir(cfg, existing, default_id="default")


def set_threads(cfg: Config) -> None:
    from lesft.engine import set_threads as set_torch_threads  # torch: the broker never loads it

    set_torch_threads(cfg)


class Process:
    """The common frame of a process: config, run folder, meter, metrics file, stop flag."""

    role = "process"

    def __init__(self, cfg: Config, worker_id: int) -> None:
        self.cfg, self.id = cfg, worker_id
        self.log = setup_logging(f"{self.role}-{worker_id}" if worker_id >= 0 else self.role)
        self.stop = stop_event()
        self.run_dir = run_dir_for(cfg)
        self.run_id = cfg.run.run_id or "default"
        self.meter = Meter(self.role, max(worker_id, 0), cfg.train.device if self.role == "server" else "cpu")
        self.meter.spans = []  # each record carries the phases since the last one (benchmark timelines)
        self.metrics = JsonlWriter(self.run_dir / f"{self.role}-{max(worker_id, 0)}.jsonl")
        if self.role == "server" or not (self.run_dir / "config.json").exists():
            cfg.save(self.run_dir / "config.json")
        self.ctx = zmq.Context.instance()
        set_threads(cfg)

    def record(self, event: str, **fields) -> None:
        """One metrics line, with the running totals a benchmark needs to cut out one epoch
        (and the resident memory now, to see whether a long run grows)."""
        self.meter.sample_memory()
        m = self.meter
        totals = {"total_sent": sum(m.bytes_sent.values()), "total_received": sum(m.bytes_received.values()),
                  "sent_by_type": dict(m.bytes_sent), "received_by_type": dict(m.bytes_received),
                  "compute_total_s": sum(v for k, v in m.compute_s.items() if k != "checkpoint"), "t": m.wall_s(),
                  "rss_mb": round(m.current_rss_mb(), 1), "clock": round(time.perf_counter(), 6)}
        spans = m.take_spans()
        if spans:
            totals["spans"] = spans
        self.metrics.write({"event": event, **totals, **fields})

    def finish(self, **fields) -> None:
        self.metrics.write({"event": "final", **self.meter.snapshot(), **fields})
        self.metrics.close()
