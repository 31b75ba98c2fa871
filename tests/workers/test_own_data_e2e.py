"""Every client trains on its own private file (issue 12), through the real pipeline.

Two clients with different files of different sizes, one TRL prompt-completion JSONL
(3 records) and one chat-messages JSONL (5 records), train LESFT as real processes. The
server and the aggregator get no data path at all (each client is given its own file
with ``--data``), the clients' every sent frame is captured, and:

- the aggregator's FedAvg weights are the files' sizes, the rounds follow from the
  registered sizes (epochs x the longest client epoch), and each party records every
  client's ``n_samples`` and epochs;
- the same files through the in-process trainer (``--client-data 'client{id}.jsonl'``)
  give bit-identical adapters;
- no captured frame holds any text of the client's file, nor the bytes of any of its
  prompt or reference token-id runs; the target label ids are there (the server needs
  them to compute the loss: the documented exception, docs/security.md).

Also here: bad data ends ``lesft train`` with one line before anything runs, and
``lesft eval --data`` / ``lesft summary --eval-data`` on a file of known answers.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from capture_frames import read_frames
from conftest import final_adapters
from lesft.batching import encode
from lesft.cli import app
from lesft.metrics import read_jsonl
from lesft.trainer import train_inprocess
from workers.launch import Proc

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

PROMPT_COMPLETION = [
    {"prompt": "Maya has 14 marbles and wins 9 more at recess.", "completion": " Adding them, 14+9=23. The answer is 23."},
    {"prompt": "A baker fills 6 trays holding 12 rolls each.", "completion": " Multiplying, 6*12=72. The answer is 72.",
     "reference": "six trays times twelve rolls"},
    {"prompt": "Tom reads 30 pages daily for a week.", "completion": " Over seven days, 30*7=210. The answer is 210."},
]
CHAT = [
    {"messages": [{"role": "user", "content": f"Quiz item {i}: which planet is number {i + 1} from the sun?"},
                  {"role": "assistant", "content": f"Counting outward, planet {i + 1} is {p}. The answer is {p}."}]}
    for i, p in enumerate(["Mercury", "Venus", "Earth", "Mars", "Jupiter"])
]
CHAT[2]["messages"][:0] = [{"role": "system", "content": "You are a careful astronomy tutor."},
                           {"role": "user", "content": "Warm-up: is the moon a planet?"},
                           {"role": "assistant", "content": "No, the moon orbits the earth."}]
MAX_LENGTH = 192  # the tiny tokenizer spends about one token per character
SIZES = {0: len(PROMPT_COMPLETION), 1: len(CHAT)}


def write_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rows in enumerate((PROMPT_COMPLETION, CHAT)):
        path = folder / f"client{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def file_texts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        for key, value in r.items():
            if key == "messages":
                out += [m["content"] for m in value]
            else:
                out.append(value)
    return out


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory, e2e_cfg):
    """The launched run (clients under frame capture) and the in-process run of the same files."""
    from conftest import LiveRun

    root = tmp_path_factory.mktemp("own")
    files = write_files(root / "data")
    # rounds 0: derived from the registered sizes; no data path in the shared config
    cfg = e2e_cfg(root, rounds=0, grad_accum=2, aggregate_every=2, done_linger_s=0.5, max_length=MAX_LENGTH)
    run = LiveRun(cfg)
    try:
        for role, wid in (("broker", 0), ("server", 0), ("aggregator", 0)):
            run.start(role, wid)
        for i, path in enumerate(files):
            log = run.log_dir / f"client-{i}.log"
            cmd = [sys.executable, str(ROOT / "tests" / "workers" / "capture_frames.py"), str(root / f"frames-{i}.bin"), "--",
                   "--role", "client", "--id", str(i), "--config", str(run.cfg_path), "--threads", "1",
                   "--data", str(path)]
            with open(log, "ab") as fh:
                popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=run.env, cwd=ROOT,
                                         start_new_session=True)
            run.procs[f"client-{i}"] = Proc("client", i, popen, log)
        codes = run.wait_done(timeout=420)
    finally:
        run.stop()
    assert all(c == 0 for n, c in codes.items() if n != "broker-0"), codes
    ref_cfg = cfg.replace(client_data=str(root / "data" / "client{id}.jsonl"), run_id="inprocess")
    ref = train_inprocess(ref_cfg)
    return {"root": root, "run": run, "files": files, "inprocess": ref, "cfg": ref_cfg}


def test_shared_config_holds_no_data_path(own_runs):
    text = (own_runs["run"].cfg_path).read_text()
    assert 'data = ""' in text and 'client_data = ""' in text
    for f in own_runs["files"]:
        assert str(f) not in text and f.name not in text


def test_sizes_are_the_fedavg_weights_and_decide_the_rounds(own_runs):
    run = own_runs["run"]
    want = {str(c): n for c, n in SIZES.items()}
    rounds = max(SIZES.values())  # epochs 1 x ceil(5 / batch 1)
    aggs = run.records("aggregator-0", "aggregation")
    assert aggs and all(a["weights"] == want for a in aggs)
    assert [a["round"] for a in aggs] == [1, 3, 4]
    epochs = {str(c): rounds / n for c, n in SIZES.items()}
    for name in ("aggregator-0", "server-0"):
        clients = run.records(name, "clients")[-1]
        assert clients["n_samples"] == want and clients["rounds"] == rounds
        assert clients["epochs"] == pytest.approx(epochs)
    for c, n in SIZES.items():
        reg = run.records(f"client-{c}", "registered")[-1]
        assert (reg["n_samples"], reg["rounds"], reg["epochs"]) == (n, rounds, pytest.approx(rounds / n))
        assert run.final(f"client-{c}")["n_samples"] == n
        assert "own data" in run.log(f"client-{c}") and ("prompt-completion" if c == 0 else "chat messages") \
            in run.log(f"client-{c}")
    assert len(run.server_rounds()) == rounds
    trainer = read_jsonl(own_runs["inprocess"].run_dir / "trainer-0.jsonl")[-1]
    assert trainer["event"] == "final" and trainer["n_samples"] == want
    assert trainer["epochs"] == pytest.approx(epochs)


def test_pipeline_equals_inprocess_bit_for_bit(own_runs):
    got = final_adapters(own_runs["run"].run_dir, 2)
    ref = own_runs["inprocess"]
    want = {"server": ref.server, "client": ref.clients[-1]}
    for name, tensors in got.items():
        other = want["server" if name == "server" else "client"]
        assert tensors.keys() == other.keys()
        assert all(torch.equal(tensors[k], other[k]) for k in other), name


def _id_bytes(ids) -> list[bytes]:
    t = torch.tensor(list(ids))
    return [t.to(torch.int32).numpy().tobytes(), t.to(torch.int64).numpy().tobytes()]


def test_no_frame_holds_the_clients_texts_or_prompt_ids(own_runs):
    from lesft.data.files import load_data_file
    from lesft.models import local_tokenizer

    tok = local_tokenizer()
    for i, (path, rows) in enumerate(zip(own_runs["files"], (PROMPT_COMPLETION, CHAT))):
        frames = read_frames(own_runs["root"] / f"frames-{i}.bin")
        blob = b"\x00".join(frames)
        assert len(frames) > 20  # HELLO, FORWARDs, UPLOADs, heartbeats, BYE
        examples = load_data_file(path, tok).examples
        texts = file_texts(rows) + [t for ex in examples for t in (ex.x, ex.y, ex.x_ref)]
        for text in texts:
            assert text.encode() not in blob, f"client {i} sent its text {text!r}"
        found_targets = 0
        for ex in examples:
            enc = encode(tok, ex, MAX_LENGTH)
            for run_ids in (enc.base_ids[:enc.base_start], enc.ref_ids[:enc.ref_start], enc.base_ids, enc.ref_ids):
                for raw in _id_bytes(run_ids):
                    assert raw not in blob, f"client {i} sent a token-id run of {ex.uid}"
            # the documented exception: the target label ids, as int32 in FORWARD
            found_targets += _id_bytes(enc.target)[0] in blob
        assert found_targets == len(examples)  # every example was trained on, and the capture sees it


# --------------------------------------------------------------------------- CLI


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code not in (0, None) and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


@pytest.mark.parametrize("inprocess", [True, False], ids=["inprocess", "pipeline"])
def test_bad_data_stops_train_before_anything_runs(tmp_path, inprocess):
    write_files(tmp_path / "data")
    (tmp_path / "data" / "client1.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                                                     '{"prompt": "x", \n')
    args = ["train", "--model", "arch:tiny-qwen2", "--clients", "2", "--runs-dir", str(tmp_path / "runs"),
            "--run-id", "bad", "--client-data", str(tmp_path / "data" / "client{id}.jsonl")]
    line = one_error_line(CliRunner().invoke(app, args + (["--inprocess"] if inprocess else [])))
    assert "client1.jsonl line 1" in line and "last message" in line
    run_dir = tmp_path / "runs" / "bad"
    assert not run_dir.exists() or not any(p.suffix == ".safetensors" or p.name.startswith("adapter")
                                           for p in run_dir.rglob("*"))
    assert not (run_dir / "logs").exists()  # no process was started


def test_eval_data_known_answers(tmp_path, monkeypatch):
    """``lesft eval --data``: the CLI path with generation replaced by known outputs (3 of 5
    right), then on the tiny random model end to end (its accuracy is whatever it says,
    but it must be the scorer's verdict on the outputs it wrote)."""
    from lesft import evaluate as ev
    from lesft.data.files import Scorer, load_data_file
    from lesft.models import local_tokenizer

    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i}+{i}?",
                                        "completion": f" {i}+{i}={2 * i}. The answer is {2 * i}."}) + "\n"
                            for i in range(5)))
    outputs = [" The answer is 0.", " so 2. The answer is 2.", " The answer is 5.", " #### 6", " unsure"]
    real = ev.generate

    def fake(model, tok, prompts, **kw):
        for i, text in enumerate(outputs):
            kw["on_output"](i, text)
        return outputs

    base = ["eval", "--model", "arch:tiny-qwen2", "--data", str(path), "--runs-dir", str(tmp_path)]
    monkeypatch.setattr(ev, "generate", fake)
    res = CliRunner().invoke(app, base + ["--out", str(tmp_path / "fake.jsonl")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "fake.json").read_text())
    assert (summary["n"], summary["correct"], summary["accuracy"]) == (5, 3, 0.6)
    monkeypatch.setattr(ev, "generate", real)
    res = CliRunner().invoke(app, base + ["--max-new-tokens", "3", "--out", str(tmp_path / "real.jsonl")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "real.json").read_text())
    records = read_jsonl(tmp_path / "real.jsonl")
    exs = load_data_file(path, local_tokenizer()).examples
    assert summary["n"] == 5 and summary["correct"] == sum(Scorer()(r["output"], e)[1] for r, e in zip(records, exs))
    line = one_error_line(CliRunner().invoke(app, base + ["--extract", "letters"]))
    assert "--extract" in line


def test_summary_eval_data_before_after(own_runs, monkeypatch):
    from lesft.cli import console

    monkeypatch.setattr(console, "width", 250)  # one table row per line
    res = CliRunner().invoke(app, ["summary", "--run", str(own_runs["inprocess"].run_dir), "--eval-data",
                                   str(own_runs["files"][0]), "--eval-n", "2", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    for label in ("before", "after"):
        assert f"accuracy {label} (2 held-out client0.jsonl exact final answer" in res.output


def test_fedavg_clients_of_different_sizes_agree_on_the_rounds(tmp_path, e2e_cfg):
    """Without a server the aggregator decides the rounds from the registered sizes; the
    launcher of ``lesft train`` fills in ``{id}`` of ``--client-data`` for each process."""
    from workers.launch import launch

    write_files(tmp_path / "data")
    cfg = e2e_cfg(tmp_path, method="fedavg", rounds=0, grad_accum=2, aggregate_every=2, done_linger_s=0.5,
                  max_length=MAX_LENGTH, client_data=str(tmp_path / "data" / "client{id}.jsonl"), run_id="fedavg")
    res = launch(cfg, timeout_s=300)
    rounds = max(SIZES.values())
    for c, n in SIZES.items():
        recs = read_jsonl(res.run_dir / f"client-{c}.jsonl")
        assert [r["round"] for r in recs if r["event"] == "round"] == list(range(rounds))
        assert recs[-1]["n_samples"] == n
    aggs = [r for r in read_jsonl(res.run_dir / "aggregator-0.jsonl") if r["event"] == "aggregation"]
    assert aggs and all(a["weights"] == {str(c): n for c, n in SIZES.items()} for a in aggs)
    ref = train_inprocess(cfg.replace(run_id="fedavg-inprocess"))
    from safetensors.torch import load_file

    got = load_file(res.run_dir / "client-adapters.safetensors")
    assert all(torch.equal(got[k], ref.clients[-1][k]) for k in ref.clients[-1])
