"""The combined adapter names a base model that loads offline, and ``lesft eval --adapter``
finds it without --model (issue 13, item 9)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from lesft import lora
from lesft.cli import app
from lesft.config import build_config
from lesft.methods import get_method
from lesft.models import resolve
from lesft.split import load_split
from lesft.export import base_model_path, final_outputs
from conftest import random_adapters


@pytest.fixture()
def folder_run(tmp_path, tiny_folders, monkeypatch):
    """A finished run folder of a tiny model loaded from a local HF folder given by a
    relative path (as a user types it), with trained-looking adapters."""
    monkeypatch.chdir(tiny_folders["tiny-qwen2"].parent)
    spec = tiny_folders["tiny-qwen2"].name  # relative
    cfg = build_config(cli=dict(model=spec, runs_dir=str(tmp_path), run_id="r", clients=2), env={})
    source = resolve(spec)
    client, server = load_split(source, cfg.model.split_ratio)
    lora.add_lora(client, cfg.lora)
    lora.add_lora(server, cfg.lora)
    lora.set_adapters(client, random_adapters(lora.get_adapters(client), seed=1, scale=0.3))
    lora.set_adapters(server, random_adapters(lora.get_adapters(server), seed=2, scale=0.3))
    run = tmp_path / "r"
    run.mkdir()
    cfg.save(run / "config.json")
    final_outputs(run, cfg, source, get_method("lesft"), lora.get_adapters(server), {-1: lora.get_adapters(client)})
    return run


def test_combined_adapter_loads_with_auto_peft_offline(folder_run, tiny_folders, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    config = json.loads((folder_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_folders["tiny-qwen2"].resolve())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # from anywhere, not only where the run was started
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder_run / "adapter"))
    ids = torch.tensor([[5, 17, 42]])
    assert model(input_ids=ids).logits.shape[-1] == 512


def test_eval_takes_the_model_from_the_adapter(folder_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["eval", "--adapter", str(folder_run / "adapter"), "--limit", "2",
                                   "--max-new-tokens", "2", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "model from the adapter's metadata" in res.output
    summary = json.loads((folder_run / "eval-synthetic-test.json").read_text())
    assert summary["model"].endswith("tiny-qwen2")


def test_embedded_model_adapter_names_the_prepared_folder():
    from lesft.models import EMBEDDED, default_cache_dir, embedded_folder

    if not (default_cache_dir() / "models" / EMBEDDED / "config.json").is_file():
        pytest.skip("the embedded model is not prepared here (run `lesft prepare`)")
    folder = embedded_folder(None)
    assert base_model_path(resolve(EMBEDDED)) == str(folder.resolve())
    assert os.path.isfile(os.path.join(base_model_path(resolve(EMBEDDED)), "config.json"))
