"""`lesft export --merge`: a plain HF model folder whose greedy output equals the split model's."""

import torch
from typer.testing import CliRunner
from transformers import AutoModelForCausalLM

from lesft import lora
from lesft.cli import app
from lesft.config import build_config
from lesft.models import resolve
from lesft.split import load_split, position_ids
from lesft.export import final_outputs
from lesft.methods import get_method
from conftest import random_adapters


def greedy_split(client, server, ids, steps):
    ids = ids.clone()
    for _ in range(steps):
        mask = torch.ones_like(ids)
        nxt = server(client(ids, mask), mask)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_merged_export_matches_split_model(tmp_path):
    # Prepare: a finished "run" folder with trained-looking adapters on both sides
    cfg = build_config(cli=dict(model="arch:tiny-llama", runs_dir=str(tmp_path), run_id="r", clients=2), env={})
    source = resolve("arch:tiny-llama")
    client, server = load_split(source, cfg.model.split_ratio)
    lora.add_lora(client, cfg.lora)
    lora.add_lora(server, cfg.lora)
    lora.set_adapters(client, random_adapters(lora.get_adapters(client), seed=1, scale=0.3))
    lora.set_adapters(server, random_adapters(lora.get_adapters(server), seed=2, scale=0.3))
    run = tmp_path / "r"
    run.mkdir()
    cfg.save(run / "config.json")
    final_outputs(run, cfg, source, get_method("lesft"), lora.get_adapters(server), {-1: lora.get_adapters(client)})

    # Execute
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["export", "--run", str(run), "--merge", str(out)])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(out).eval()

    # Assert: same greedy continuation as the split model with its adapters
    client.eval(), server.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        want = greedy_split(client, server, ids, 8)
        got = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        logits_split = server(client(ids, torch.ones_like(ids)), torch.ones_like(ids))
        logits_merged = merged(ids, position_ids=position_ids(torch.ones_like(ids))).logits
    assert torch.equal(got, want)
    torch.testing.assert_close(logits_merged, logits_split, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_export_refuses_unfinished_run_and_nonempty_target(tmp_path):
    cfg = build_config(cli=dict(model="arch:tiny-llama"), env={})
    run = tmp_path / "r"
    run.mkdir()
    cfg.save(run / "config.json")
    res = CliRunner().invoke(app, ["export", "--run", str(run), "--merge", str(tmp_path / "m")])
    assert res.exit_code == 2 and "adapter" in res.output
    res = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "nope"), "--merge", str(tmp_path / "m")])
    assert res.exit_code == 2 and "not found" in res.output
