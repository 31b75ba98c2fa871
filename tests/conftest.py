"""Shared fixtures: tiny model presets (as arch sources and as saved HF folders), the
local tokenizer, and small helpers to build padded batches.

Everything here is offline and tiny (4 layers, hidden 64): never the embedded model.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_ARCHS = ("tiny-qwen2", "tiny-llama", "tiny-mistral")


RUN_SLOW = "LESFT_RUN_SLOW"


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    """``slow`` cases (long multi-process runs: kill -9 variants, CURVE over the emulated
    link, the 32-client load test) skip unless ``LESFT_RUN_SLOW=1``, so ``make test`` stays
    within its budget; ``make test-slow`` runs exactly them."""
    if os.environ.get(RUN_SLOW) == "1":
        return
    skip = pytest.mark.skip(reason=f"long case: run it with {RUN_SLOW}=1 (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core runner the threads
    contend and the suite ran about 3x slower. Restored after the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    from lesft.models import local_tokenizer

    return local_tokenizer()


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    """Each tiny preset saved once per session as a normal HF folder (weights + tokenizer)."""
    from lesft.models import save_preset

    root = tmp_path_factory.mktemp("tiny-models")
    return {name: save_preset(name, root / name) for name in TINY_ARCHS}


@pytest.fixture(scope="session")
def hf_reference():
    """``hf_reference(folder)``: a plain ``AutoModelForCausalLM`` from a saved folder, eval mode
    (cached per folder; callers must not modify it)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, torch.nn.Module] = {}

    def load(folder: Path) -> torch.nn.Module:
        key = str(folder)
        if key not in cache:
            cache[key] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return cache[key]

    return load


def fresh_hf_model(folder: Path) -> torch.nn.Module:
    """A new ``AutoModelForCausalLM`` from a saved folder (for PEFT, which wraps it in place)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def padded_batch(lengths: list[int], vocab: int = 500, side: str = "right", seed: int = 0,
                 pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[B, max(lengths)]`` and the attention mask, padded on ``side``."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(2, vocab, (n,), generator=g)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        ids[b, sl] = row
        mask[b, sl] = 1
    return ids, mask


def random_adapters(adapters: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Random values (B non-zero) with the names and shapes of ``adapters``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in adapters.items()}


# ----------------------------------------------------------------------------- multi-process runs
# Fixtures of the end-to-end reliability, fuzz and load tests: the tiny run they share, the
# in-process reference adapters it must reproduce, and a harness that starts the roles as
# real processes and lets a test kill, restart or pause them while the run trains.

import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402


def e2e_config(tmp_path: Path, **over):
    """The tiny two-client run of the end-to-end tests (12 rounds, aggregation every 4),
    with short network timeouts so a dead peer is noticed within seconds. ``over`` sets
    any other field (``straggler_timeout_s=3``, ``run_id="x"``, ...)."""
    from lesft.config import build_config

    cli = dict(model="arch:tiny-qwen2", runs_dir=str(tmp_path / "runs"), run_id="e2e", rounds=12, clients=2,
               samples_per_client=4, max_length=64, lr=1e-3, microbatch_wait_ms=60000,
               request_timeout_s=8, retries=20, heartbeat_s=1, max_message_mb=1)
    cli.update(over)
    return build_config(cli=cli, env={})


@pytest.fixture(scope="session")
def e2e_cfg():
    """``e2e_cfg(tmp_path, **over)``: see :func:`e2e_config`."""
    return e2e_config


@pytest.fixture(scope="session")
def reference_adapters(tmp_path_factory):
    """``reference_adapters(cfg)``: ``{"server": ..., "client": ...}``, the final adapters of
    the in-process trainer for ``cfg`` (cached per training settings). An undisturbed
    launched run reproduces them bit for bit (pinned by ``test_pipeline_e2e.py``), so they
    are the "run without faults" of the reliability and fuzz tests."""
    from lesft.trainer import train_inprocess

    cache: dict[str, dict] = {}

    def get(cfg) -> dict[str, dict[str, torch.Tensor]]:
        settings = {g: v for g, v in cfg.to_dict().items() if g not in ("net", "run")}
        key = repr(sorted(settings.items()))
        if key not in cache:
            folder = tmp_path_factory.mktemp("reference")
            ref_cfg = cfg.replace(runs_dir=str(folder), run_id="reference")
            res = train_inprocess(ref_cfg)
            cache[key] = {"server": res.server, "client": res.clients[-1]}
        return cache[key]

    return get


def final_adapters(run_dir: Path, clients: int) -> dict[str, dict[str, torch.Tensor]]:
    """What a finished launched run holds: the server's adapters, the aggregator's last
    global client adapters, and each client's own adapters (from its state file)."""
    from safetensors.torch import load_file

    out = {"server": load_file(run_dir / "server-adapters.safetensors"),
           "client": load_file(run_dir / "client-adapters.safetensors")}
    for i in range(clients):
        state = torch.load(run_dir / f"client-{i}-state.pt", map_location="cpu", weights_only=True)
        out[f"client-{i}"] = state["party"]["adapters"]
    return out


def adapter_diff(got: dict[str, dict[str, torch.Tensor]], ref: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Largest absolute difference per adapter set of ``got`` against the reference
    (``client-<i>`` sets compare with the reference's global client adapters); inf when
    the names or shapes differ, 0.0 only when bit for bit equal."""
    out = {}
    for name, tensors in got.items():
        want = ref["server" if name == "server" else "client"]
        if tensors.keys() != want.keys() or any(tensors[k].shape != want[k].shape for k in want):
            out[name] = float("inf")
        elif all(torch.equal(tensors[k], want[k]) for k in want):
            out[name] = 0.0
        else:
            out[name] = max(max(float((tensors[k].float() - want[k].float()).abs().max()) for k in want), 1e-45)
    return out


def assert_same_adapters(run_dir: Path, clients: int, ref: dict, atol: float = 0.0) -> None:
    """Every adapter set of the run equals the reference: bit for bit when ``atol`` is 0."""
    diff = adapter_diff(final_adapters(run_dir, clients), ref)
    assert all(d <= atol for d in diff.values()), f"adapters differ from the undisturbed reference: {diff}"


class LiveRun:
    """The roles of one run as real processes that a test drives while it trains: kill
    (SIGKILL), restart with the same command, pause (SIGSTOP) and resume (SIGCONT).

    Set up like :func:`workers.launch.launch` (fresh loopback addresses, ``config.toml``
    in the run folder, one torch thread per client); every process, including the ones a
    test starts beside the run, is stopped by :meth:`stop` (the fixture calls it).
    """

    def __init__(self, cfg, env: dict[str, str] | None = None) -> None:
        import dataclasses

        from workers.launch import local_addresses, worker_env

        self.run_dir = Path(cfg.run.runs_dir) / cfg.run.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, **local_addresses()))
        self.cfg_path = self.run_dir / "config.toml"
        self.cfg_path.write_text(self.cfg.to_toml())
        self.cfg.save(self.run_dir / "config.json")
        self.log_dir = self.run_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.env = worker_env(env)
        self.procs: dict = {}  # name -> Proc of the run's roles (the latest process of each)
        self.others: list = []  # processes started beside the run
        self.paused: set[str] = set()
        self.t0 = time.monotonic()

    # -- processes

    def start(self, role: str, wid: int = 0, args=()) -> None:
        from workers.launch import start

        args = list(args) + (["--threads", "1"] if role == "client" else [])
        proc = start(self.cfg_path, role, wid, self.log_dir, self.env, args)
        self.procs[proc.name] = proc

    def start_all(self) -> "LiveRun":
        from workers.launch import roles_for

        for role, wid in roles_for(self.cfg):
            self.start(role, wid)
        return self

    def start_other(self, name: str, role: str, wid: int, args=()):
        """A process beside the run (same config file), logging to ``logs/<name>/``."""
        from workers.launch import start

        folder = self.log_dir / name
        folder.mkdir(exist_ok=True)
        proc = start(self.cfg_path, role, wid, folder, self.env, list(args))
        self.others.append(proc)
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        os.kill(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(timeout=30)
        self.paused.discard(name)

    def restart(self, name: str, args=()) -> None:
        """Start ``name`` again with its original command (+ ``args``), killing it first if alive."""
        proc = self.procs[name]
        if proc.popen.poll() is None:
            self.kill(name)
        self.start(proc.role, proc.id, args)

    def pause(self, name: str) -> None:
        os.kill(self.procs[name].popen.pid, signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        os.kill(self.procs[name].popen.pid, signal.SIGCONT)
        self.paused.discard(name)

    def freeze(self) -> None:
        """Pause every live client: with no straggler timeout the run holds where it is (its
        results do not change), so a test can place a fault at a round of its choice."""
        for name, proc in self.procs.items():
            if proc.role == "client" and proc.popen.poll() is None and name not in self.paused:
                self.pause(name)

    def thaw(self) -> None:
        for name in list(self.paused):
            self.resume(name)

    def stop(self) -> None:
        from workers.launch import stop_all

        for name in list(self.paused):
            self.resume(name)
        stop_all(list(self.procs.values()) + self.others, grace_s=5)

    # -- observation

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def records(self, name: str, event: str | None = None) -> list[dict]:
        from lesft.metrics import read_jsonl

        path = self.run_dir / f"{name}.jsonl"
        recs = read_jsonl(path) if path.is_file() else []
        return [r for r in recs if event is None or r.get("event") == event]

    def server_rounds(self) -> list[dict]:
        return self.records("server-0", "round")

    def final(self, name: str) -> dict:
        """The last ``final`` record of a worker (the one of its latest process)."""
        recs = self.records(name, "final")
        assert recs, f"{name} wrote no final record"
        return recs[-1]

    def _check_alive(self) -> None:
        for proc in self.procs.values():
            code = proc.popen.poll()
            if code not in (None, 0):
                raise AssertionError(f"{proc.name} exited with status {code}:\n{proc.tail(25)}")

    def wait_for(self, condition, timeout: float, what: str) -> None:
        """Poll ``condition()`` until true; fail if a worker dies or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not condition():
            self._check_alive()
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.tail(8)}" for p in self.procs.values())
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
            time.sleep(0.1)

    def wait_rounds(self, n: int, timeout: float = 240) -> None:
        """Until the server has closed ``n`` rounds."""
        self.wait_for(lambda: len(self.server_rounds()) >= n, timeout, f"{n} server rounds")

    def wait_done(self, timeout: float = 300) -> dict[str, int]:
        """Until every role but the broker has exited 0; returns every exit status."""
        workers = [p for p in self.procs.values() if p.role != "broker"]
        self.wait_for(lambda: all(p.popen.poll() == 0 for p in workers), timeout, "the end of the run")
        return {name: p.popen.poll() for name, p in self.procs.items()}


@pytest.fixture()
def live_run():
    """``live_run(cfg)``: a :class:`LiveRun` with its roles started; all stopped at teardown."""
    runs: list[LiveRun] = []

    def make(cfg, start: bool = True) -> LiveRun:
        run = LiveRun(cfg)
        runs.append(run)
        return run.start_all() if start else run

    yield make
    for run in runs:
        run.stop()
