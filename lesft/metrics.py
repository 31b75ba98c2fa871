"""Per-worker accounting (bytes, messages, compute time, memory) and its JSONL files.

Every worker owns one `Meter`, feeds it as it sends, receives and computes, and writes
`Meter.snapshot()` records through a `JsonlWriter` to `runs/<run-id>/<role>-<id>.jsonl`;
the last record of a worker carries ``"event": "final"``. `summarize_run` reads those
files back into per-worker and per-role totals for the benchmark tables. No sockets here.
"""

from __future__ import annotations

import json
import logging
import math
import re
import resource
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil

log = logging.getLogger(__name__)

MAX_MEMORY_SAMPLES = 10_000
_WORKER_FILE = re.compile(r"(?P<role>.+)-(?P<id>\d+)\.jsonl")


MAX_SPANS = 4096  # phases kept between two records: a bound, not a budget (a round has a handful)


class Meter:
    """Counts per party: bytes sent/received per message type, message counts, compute
    seconds per phase (forward, backward, loss, optimizer, ...), wall seconds since
    creation, peak memory."""

    def __init__(self, role: str, worker_id: int, device: str = "cpu"):
        self.role = role
        self.worker_id = int(worker_id)
        self.device = str(device)
        self._t0 = time.perf_counter()
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.bytes_received: dict[str, int] = defaultdict(int)
        self.msgs_sent: dict[str, int] = defaultdict(int)
        self.msgs_received: dict[str, int] = defaultdict(int)
        self.compute_s: dict[str, float] = defaultdict(float)
        self.compute_n: dict[str, int] = defaultdict(int)
        self.counters: dict[str, int] = defaultdict(int)
        self._process = psutil.Process()
        self._rss_max_mb = 0.0
        self._samples: list[tuple[float, float]] = []
        self._sample_stride = 1  # keep every stride-th sample once the list has been thinned
        self._samples_seen = 0
        self.spans: list[tuple[str, float, float]] | None = None  # kept phases (see take_spans); None: off

    @property
    def name(self) -> str:
        """The worker's file stem, e.g. "client-3"."""
        return f"{self.role}-{self.worker_id}"

    def wall_s(self) -> float:
        """Seconds since this meter was created."""
        return time.perf_counter() - self._t0

    def sent(self, msg_type: str, nbytes: int) -> None:
        """Count one sent message of ``msg_type`` carrying ``nbytes`` bytes (all frames)."""
        _check_nbytes(nbytes)
        self.bytes_sent[msg_type] += int(nbytes)
        self.msgs_sent[msg_type] += 1

    def received(self, msg_type: str, nbytes: int) -> None:
        """Count one received message of ``msg_type`` carrying ``nbytes`` bytes."""
        _check_nbytes(nbytes)
        self.bytes_received[msg_type] += int(nbytes)
        self.msgs_received[msg_type] += 1

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to a free counter, e.g. "rejected.BAD_SHAPE" or "rounds"."""
        self.counters[name] += n

    @contextmanager
    def phase(self, name: str, sync_cuda: bool = False) -> Iterator[None]:
        """Add the elapsed seconds of the ``with`` body to ``compute_s[name]``.

        CUDA kernels run asynchronously, so with ``sync_cuda`` the device is synchronised
        before reading the clock at both ends; otherwise the time of queued kernels would
        land in whichever phase next waits on the device. The time is counted even if the
        body raises.
        """
        sync = sync_cuda and _cuda_available()
        if sync:
            _cuda_synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                _cuda_synchronize()
            end = time.perf_counter()
            self.compute_s[name] += end - start
            self.compute_n[name] += 1
            if self.spans is not None and len(self.spans) < MAX_SPANS:
                self.spans.append((name, start, end))

    def take_spans(self) -> list[list]:
        """The phases timed since the last call, as ``[name, start, end]`` in
        ``time.perf_counter()`` seconds (the machine's monotonic clock, shared by every process
        on it, so a benchmark can lay the roles of a run on one timeline); then forgets them.
        Kept only once ``spans`` is a list (the workers set it; :class:`Process` drains it into
        each metrics record)."""
        if not self.spans:
            return []
        out, self.spans = [[n, round(a, 6), round(b, 6)] for n, a, b in self.spans], []
        return out

    def current_rss_mb(self) -> float:
        """Resident set size of this process now, in MiB (psutil)."""
        return self._process.memory_info().rss / 2**20

    def sample_memory(self) -> None:
        """Record the current RSS into a running max and a list of (t, rss_mb) samples.

        The list stays under MAX_MEMORY_SAMPLES: when it fills, every other sample is
        dropped and later samples are kept at half the rate, so a long run keeps an even
        picture of its whole length instead of only its end.
        """
        rss = self.current_rss_mb()
        self._rss_max_mb = max(self._rss_max_mb, rss)
        self._samples_seen += 1
        if (self._samples_seen - 1) % self._sample_stride == 0:
            self._samples.append((round(self.wall_s(), 6), round(rss, 3)))
            if len(self._samples) >= MAX_MEMORY_SAMPLES:
                self._samples = self._samples[::2]
                self._sample_stride *= 2

    @property
    def memory_samples(self) -> list[tuple[float, float]]:
        """The kept (seconds since creation, rss_mb) samples, oldest first."""
        return list(self._samples)

    def peak_rss_mb(self) -> float:
        """Peak resident set of this process in MiB (getrusage, at least the sampled max)."""
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        mb = maxrss / 2**20 if sys.platform == "darwin" else maxrss / 2**10
        return max(mb, self._rss_max_mb)

    def cuda_peak_mb(self) -> float | None:
        """Peak CUDA memory allocated by torch in MiB, or None when not on a CUDA device."""
        if not self.device.startswith("cuda") or not _cuda_available():
            return None
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def snapshot(self) -> dict:
        """A JSON-safe dict of everything counted so far (see the module docstring)."""
        current = self.current_rss_mb()
        self._rss_max_mb = max(self._rss_max_mb, current)
        return {
            "role": self.role,
            "id": self.worker_id,
            "device": self.device,
            "wall_s": self.wall_s(),
            "bytes_sent": dict(self.bytes_sent),
            "bytes_received": dict(self.bytes_received),
            "msgs_sent": dict(self.msgs_sent),
            "msgs_received": dict(self.msgs_received),
            "total_sent": sum(self.bytes_sent.values()),
            "total_received": sum(self.bytes_received.values()),
            "compute_s": dict(self.compute_s),
            "compute_n": dict(self.compute_n),
            "counters": dict(self.counters),
            "peak_rss_mb": self.peak_rss_mb(),
            "current_rss_mb": current,
            "cuda_peak_mb": self.cuda_peak_mb(),
        }


def merge_token_means(into: dict, stats: dict) -> None:
    """Add one microbatch's statistics to ``into``: ``tokens`` add up, every other value is a
    per-token mean and is averaged weighted by tokens."""
    n, total = stats.get("tokens", 0), into.get("tokens", 0)
    for k, v in stats.items():
        if k != "tokens":
            into[k] = (into.get(k, 0.0) * total + v * n) / max(total + n, 1)
    into["tokens"] = total + n


def mean_loss(loss_sum: float, rows: int) -> float:
    """The mean per-row loss of ``rows`` rows whose losses add up to ``loss_sum``: the one
    division of a reported loss (0.0 when no row had target tokens)."""
    return loss_sum / rows if rows else 0.0


class RoundTally:
    """The server's sums over one round's microbatches, divided once when the round closes
    (:func:`mean_loss`): the loss sum and the valid rows, microbatches, padded tokens per
    path (the paper's communication accounting) and the per-token statistics, weighted by
    tokens."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {"loss_sum": 0.0, "rows": 0, "microbatches": 0, "act_tokens": 0,
                                       "ref_tokens": 0}
        self.stats: dict[str, float] = {}

    def add(self, parts: list, res: Any) -> None:
        """One microbatch: its ``parts`` (``Rows``, act ``[rows, seq, hidden]``) and what the
        server computed of them (``ServerResult``)."""
        s = self.sums
        s["loss_sum"] += sum(res.loss_sums)
        s["rows"] += sum(res.valid_rows)
        s["microbatches"] += 1
        s["act_tokens"] += sum(p.act.shape[0] * p.act.shape[1] for p in parts)
        s["ref_tokens"] += sum(p.ref_act.shape[0] * p.ref_act.shape[1] for p in parts if p.ref_act is not None)
        merge_token_means(self.stats, {k: v for k, v in res.stats.items() if k != "rows"})

    def close(self) -> dict:
        """The round's record fields (loss: the mean over its valid rows); the next round
        starts from zero."""
        s, stats = self.sums, self.stats
        self._reset()
        return {"loss": mean_loss(s["loss_sum"], s["rows"]), "rows": s["rows"], "tokens": stats.pop("tokens", 0),
                "microbatches": s["microbatches"], "act_tokens": s["act_tokens"], "ref_tokens": s["ref_tokens"],
                **stats}


def _check_nbytes(nbytes: int) -> None:
    if nbytes < 0:
        raise ValueError(f"byte count must be >= 0, got {nbytes}")


def _cuda_available() -> bool:
    # Import torch only when asked: the aggregator and tests need no torch for metering.
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _cuda_synchronize() -> None:
    import torch

    torch.cuda.synchronize()


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that json.dumps accepts in strict mode: the one JSON sanitiser of
    the project (metrics files, benchmark results).

    numpy / torch scalars and arrays become Python numbers and lists (anything with
    ``tolist``), tuples and sets become lists, Paths and other objects become strings,
    and non-finite floats (NaN, +inf, -inf) all become None (``null``): strict JSON has
    no spelling for them, and a reader must not mistake a string ``"inf"`` for a number.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        try:
            return to_jsonable(obj.tolist())
        except Exception:  # a tensor on a dead device, say: keep the record, lose the value
            return repr(obj)
    return str(obj)


class JsonlWriter:
    """Append-only JSONL metrics file; each write is one line, flushed; creates parent
    dirs; safe to call after SIGTERM handling (never raises on a closed file: logs and
    drops)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        # Re-entrant: a signal handler may write while the main thread is mid-write.
        self._lock = threading.RLock()
        self._dropped = 0

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, record: dict) -> None:
        """Append one record as one line, adding "time" (unix seconds) if absent."""
        try:
            data = to_jsonable(dict(record))
            data.setdefault("time", time.time())
            line = json.dumps(data, allow_nan=False, separators=(",", ":")) + "\n"
        except Exception as exc:  # a metrics record must never take a worker down
            log.warning("metrics record for %s dropped: %s", self.path, exc)
            return
        with self._lock:
            if self._file is None:
                self._drop("file is closed")
                return
            try:
                self._file.write(line)
                self._file.flush()
            except (OSError, ValueError) as exc:
                self._drop(str(exc))

    def _drop(self, why: str) -> None:
        self._dropped += 1
        # Log the first drop only: a closed writer in a busy loop would flood the log.
        if self._dropped == 1:
            log.warning("metrics record for %s dropped (%s)", self.path, why)

    def close(self) -> None:
        """Close the file; later writes are dropped. Safe to call more than once."""
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as exc:
                    log.warning("closing %s: %s", self.path, exc)
                self._file = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL file, oldest first.

    A line that does not parse (the tail a killed process left half written) is
    skipped with a warning rather than failing the whole summary.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                log.warning("%s:%d: skipping unreadable line (%s)", path, lineno, exc)
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _final_record(records: list[dict]) -> dict | None:
    """The last record whose "event" is "final", else the last record."""
    for rec in reversed(records):
        if rec.get("event") == "final":
            return rec
    return records[-1] if records else None


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize_run(run_dir: str | Path) -> dict:
    """Per-worker final records and per-role totals of one run directory.

    Reads every ``<role>-<id>.jsonl`` in ``run_dir`` (records carry `Meter.snapshot`
    fields at top level) and returns ``{"workers": {"client-0": record, ...},
    "by_role": {"client": {"n", "bytes_sent", "bytes_received", "peak_rss_mb_max",
    "peak_rss_mb_mean", "wall_s_max", "cuda_peak_mb_max", "compute_s": {phase: sum},
    "counters": {name: sum}}, ...}}``. A max or mean with no values is None.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    found = []
    for path in run_dir.glob("*.jsonl"):
        m = _WORKER_FILE.fullmatch(path.name)
        if m:
            found.append((m["role"], int(m["id"]), path))
    workers: dict[str, dict] = {}
    grouped: dict[str, list[dict]] = defaultdict(list)
    for role, wid, path in sorted(found):
        rec = _final_record(read_jsonl(path))
        if rec is not None:
            workers[f"{role}-{wid}"] = rec
            grouped[role].append(rec)
    by_role = {role: _role_totals(recs) for role, recs in grouped.items()}
    return {"workers": workers, "by_role": by_role}


def _role_totals(recs: list[dict]) -> dict:
    """Sums, maxima and means over the final records of one role's workers."""

    def total(rec: dict, key: str, per_type: str) -> int:
        value = _number(rec.get(key))
        if value is None:  # an older record: add up the per-type dict instead
            value = sum(v for v in (rec.get(per_type) or {}).values() if _number(v) is not None)
        return value

    def values(key: str) -> list[float]:
        return [v for v in (_number(r.get(key)) for r in recs) if v is not None]

    compute: dict[str, float] = defaultdict(float)
    counters: dict[str, float] = defaultdict(float)
    for rec in recs:
        for phase, s in (rec.get("compute_s") or {}).items():
            if _number(s) is not None:
                compute[phase] += s
        for name, n in (rec.get("counters") or {}).items():
            if _number(n) is not None:
                counters[name] += n
    peaks, walls, cuda = values("peak_rss_mb"), values("wall_s"), values("cuda_peak_mb")
    return {
        "n": len(recs),
        "bytes_sent": sum(total(r, "total_sent", "bytes_sent") for r in recs),
        "bytes_received": sum(total(r, "total_received", "bytes_received") for r in recs),
        "peak_rss_mb_max": max(peaks) if peaks else None,
        "peak_rss_mb_mean": sum(peaks) / len(peaks) if peaks else None,
        "wall_s_max": max(walls) if walls else None,
        "cuda_peak_mb_max": max(cuda) if cuda else None,
        "compute_s": dict(compute),
        "counters": dict(counters),
    }
