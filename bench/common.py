"""What every benchmark shares: the machine description, timers, and result files.

A benchmark produces ``rows`` (a list of flat dicts, one per measured case) plus a
``config`` dict (its own settings, the resolved lesft settings, targets...).
:func:`write_results` writes them as ``<name>.csv``, ``<name>.json`` (rows + config +
machine) and ``<name>.md`` (a markdown table); :func:`rich_table` prints the same
columns. Columns are given as names or :class:`Column` (key, header, format), so each
bench chooses what a reader sees while the files keep every field.

Timing follows nanoGPT's ``bench.py``: warm up, synchronise the device around the timer,
report rates and ratios against a baseline measured in the same process.

Each benchmark module owns its ``lesft bench <name>`` command: it defines it with
:func:`bench_command`, and :mod:`lesft.cli.bench` registers every one it finds in
``bench/``. A new benchmark is one module here plus a row of ``bench/README.md``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from rich.console import Console

from lesft.metrics import to_jsonable
from lesft.options import config_command, fail, guarded


class BenchError(ValueError):
    """A bench setting or environment problem, reported by the CLI as one line."""


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """A flat description of where a benchmark ran: CPU, cores, memory, GPU, library
    versions (torch, pyzmq, libzmq, transformers, peft), torch threads, date (UTC ISO)."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_logical": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import psutil

        info["cpu_physical"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # psutil is a dependency, but a description must never fail a bench
        pass
    if hasattr(os, "getloadavg"):  # a busy shared machine explains noisy numbers
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if hasattr(os, "sched_getaffinity"):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    try:
        import zmq

        info["pyzmq"] = zmq.__version__
        info["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    from importlib import metadata

    for dist in ("transformers", "peft", "msgpack", "numpy"):
        try:  # the installed version, without importing the package (transformers is slow to import)
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["gpu"] = None
    return info


def machine_line(info: Mapping[str, Any]) -> str:
    """One line for a console footer: CPU, cores, threads, GPU, versions."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    zmq_v = f", pyzmq {info['pyzmq']} / libzmq {info['libzmq']}" if "pyzmq" in info else ""
    load = f", load {info['load_avg_1m']}" if "load_avg_1m" in info else ""
    return (f"{info['cpu_model']} ({info['cpu_logical']} logical cores, torch threads {info['torch_threads']}{load})"
            f"{gpu}; torch {info['torch']}{zmq_v}; {info['date']}")


# --------------------------------------------------------------------------- timing


def sync(device: Any = None) -> None:
    """Wait for queued device work (CUDA) so a timer measures it; no-op on the CPU."""
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)


def time_calls(fn: Callable[[], Any], repeat: int, warmup: int = 1, device: Any = None) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def time_batched(fn: Callable[[], Any], repeat: int, min_seconds: float = 0.0, warmup: int = 1,
                 device: Any = None, max_inner: int = 1 << 16) -> list[float]:
    """Like :func:`time_calls`, but each of the ``repeat`` samples runs ``fn`` enough times
    (doubling, found during warm-up) to last at least ``min_seconds``, and reports the mean
    seconds per call of that sample: timer resolution stops mattering for microsecond calls."""
    return time_interleaved({"fn": fn}, repeat, min_seconds, warmup, device, max_inner)["fn"]


def _calibrate(fn: Callable[[], Any], min_seconds: float, device: Any, max_inner: int) -> int:
    inner = 1
    while min_seconds > 0 and inner < max_inner:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        if time.perf_counter() - t0 >= min_seconds:
            break
        inner *= 2
    return inner


def time_interleaved(fns: Mapping[str, Callable[[], Any]], repeat: int, min_seconds: float = 0.0,
                     warmup: int = 1, device: Any = None, max_inner: int = 1 << 16) -> dict[str, list[float]]:
    """Seconds per call of several functions, sampled in turn (``a b c a b c ...``) so that
    a change of machine load during the run hits the baseline and the candidates alike;
    ratios of their medians are then fair on a shared machine. Each sample of a function
    runs it enough times to last ``min_seconds`` (found during warm-up)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {name: _calibrate(fn, min_seconds, device, max_inner) for name, fn in fns.items()}
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            out[name].append((time.perf_counter() - t0) / inner[name])
    return out


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min and relative spread ((max - min) / median) of timing samples."""
    med = statistics.median(seconds)
    return {"median_s": med, "min_s": min(seconds),
            "spread": (max(seconds) - min(seconds)) / med if med > 0 else 0.0}


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is not positive (never a ZeroDivisionError in a table)."""
    return a / b if b > 0 else math.nan


def default_out_dir(name: str, runs_dir: str | Path = "runs") -> Path:
    """``<runs_dir>/bench/<name>-<YYYYmmdd-HHMMSS>``."""
    return Path(runs_dir) / "bench" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Column:
    """A displayed column: ``key`` of the row dict, ``header`` text, ``fmt`` (a format
    spec such as ``".3g"`` or a callable value -> str). Missing values show as ``-``."""

    key: str
    header: str | None = None
    fmt: str | Callable[[Any], str] | None = None

    @property
    def title(self) -> str:
        return self.header or self.key

    def render(self, row: Mapping[str, Any]) -> str:
        v = row.get(self.key)
        if v is None:
            return "-"
        if callable(self.fmt):
            return self.fmt(v)
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        if self.fmt:
            try:
                return format(v, self.fmt)
            except (TypeError, ValueError):
                return str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "x".join(map(str, v))
        return str(v)


ColumnSpec = Column | str


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[ColumnSpec] | None) -> list[Column]:
    if columns is None:
        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        columns = keys
    return [c if isinstance(c, Column) else Column(c) for c in columns]


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[ColumnSpec] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (all keys in first-seen order when no columns)."""
    cols = _columns(rows, columns)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(c.title) for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(c.render(r)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rich_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[ColumnSpec] | None = None,
               title: str | None = None):
    """A :class:`rich.table.Table` of ``rows`` with the same columns as the markdown.

    Every text is escaped (a label such as ``LESFT [bf16]`` is text, not rich markup) and
    headers wrap instead of being cut to ``client<->s…``.
    """
    from rich.markup import escape
    from rich.table import Column as RichColumn, Table

    cols = _columns(rows, columns)
    table = Table(*[RichColumn(escape(c.title), overflow="fold") for c in cols],
                  title=escape(title) if title else None)
    for r in rows:
        table.add_row(*[escape(c.render(r)) for c in cols])
    return table


# --------------------------------------------------------------------------- files


def _csv_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v))
    if isinstance(v, Mapping):
        return json.dumps(to_jsonable(v), sort_keys=True)
    return v


def write_results(out_dir: str | Path, name: str, rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any],
                  columns: Sequence[ColumnSpec] | None = None, *, title: str | None = None,
                  notes: Iterable[str] = (), machine: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``<name>.csv`` (every field of every row), ``<name>.json`` (``name``,
    ``machine``, ``config``, ``rows``) and ``<name>.md`` (title, machine line, the
    ``columns`` table, ``notes`` as bullets) into ``out_dir``; return the three paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = dict(machine) if machine is not None else machine_info()
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    paths = {"csv": out / f"{name}.csv", "json": out / f"{name}.json", "md": out / f"{name}.md"}
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in keys})
    doc = {"name": name, "machine": machine, "config": config, "rows": list(rows)}
    paths["json"].write_text(json.dumps(to_jsonable(doc), indent=2) + "\n", encoding="utf-8")
    md = [f"# {title or name}", "", f"Machine: {machine_line(machine)}", "", markdown_table(rows, columns)]
    notes = list(notes)
    if notes:
        md += [""] + [f"- {n}" for n in notes] + [""]
    paths["md"].write_text("\n".join(md), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- commands

console = Console()

KINDS = ("paper", "micro")  # the paper's tables and figures on real runs; micro-benchmarks


@dataclass(frozen=True)
class BenchCommand:
    """A benchmark's ``lesft bench <name>`` command: ``callback`` is the typer command
    function, ``kind`` one of :data:`KINDS`, ``order`` its place in the help screen."""

    name: str
    callback: Callable[..., None]
    kind: str
    order: int


def bench_command(name: str, *, kind: str, order: int, settings: bool = True,
                  only: Sequence[str] | None = None) -> Callable[[Callable[..., None]], BenchCommand]:
    """Make a benchmark's function its ``lesft bench <name>`` command.

    ``settings``: the function takes ``cfg: Config`` and gets every setting as a flag
    (``only``: just those it reads, as :func:`lesft.options.config_command`); without,
    it is a plain command. Either way a :class:`BenchError` or a user error ends in one
    red line.
    """
    if kind not in KINDS:
        raise ValueError(f"bench_command({name!r}): kind {kind!r} is not one of {KINDS}")

    def wrap(func: Callable[..., None]) -> BenchCommand:
        @functools.wraps(func)
        def one_line(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except BenchError as e:
                fail(str(e))

        callback = config_command(one_line, only=only) if settings else guarded(one_line)
        return BenchCommand(name, callback, kind, order)

    return wrap


def make_out_dir(out: str | None, name: str, runs_dir: str | Path) -> Path:
    """``--out``, or ``<runs_dir>/bench/<name>-<time>``, created now: an unwritable folder
    fails before the measurements, not after."""
    path = Path(out) if out else default_out_dir(name, runs_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def print_table(table) -> None:
    """Print a wide table whole when the output is a file or pipe (rich assumes 80 columns there)."""
    if console.is_terminal:
        console.print(table)
    else:
        Console(file=console.file, width=200).print(table)


def target_note(t: Mapping[str, Any]) -> str:
    """A target as a line of the results: ``<target>: <value> (met|missed)``."""
    return f"{t['target']}: {t['value']:.4g} ({'met' if t['met'] else 'missed'})"


def print_targets(targets: Iterable[Mapping[str, Any]]) -> None:
    for t in targets:
        mark = "[green]met[/]" if t["met"] else "[red]missed[/]"
        console.print(f"target: {t['target']}: {t['value']:.4g} -> {mark}", highlight=False)


def print_files(machine: Mapping[str, Any], paths: Mapping[str, Path]) -> None:
    """The footer of a micro-benchmark: where it ran and the files it wrote."""
    console.print(f"machine: {machine_line(machine)}", highlight=False)
    console.print(f"results: {paths['csv']}  {paths['json']}  {paths['md']}", highlight=False)


def parse_methods(spec: str, allowed: Sequence[str]) -> list[str]:
    """``--methods a,b``: the names, each one of ``allowed``."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in allowed]
    if bad or not names:
        raise BenchError(f"--methods {spec!r}: unknown {', '.join(bad) or '(none given)'}; "
                         f"use some of {', '.join(allowed)}.")
    return names


def random_note(cfg) -> list[str]:
    """The warning every output of a run on random weights (``--model arch:...``) carries."""
    return ["model with RANDOM WEIGHTS (architecture preset): speed and memory only"] \
        if cfg.model.model.startswith("arch:") else []


def link_note(cfg) -> list[str]:
    """The line every output of a run through the broker's edge-link emulator carries
    (nothing when the link is not shaped)."""
    net = cfg.net
    if not (net.link_up or net.link_down or net.link_latency_ms):
        return []
    return [f"emulated edge link per client (broker; client<->server traffic only): up {net.link_up or 'unshaped'}, "
            f"down {net.link_down or 'unshaped'}, {net.link_latency_ms:g} ms one way"]
