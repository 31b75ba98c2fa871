"""Shared fixtures: tiny model presets (as arch sources and as saved HF folders), the
local tokenizer, and small helpers to build padded batches.

Everything here is offline and tiny (4 layers, hidden 64): never the embedded model.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_ARCHS = ("tiny-qwen2", "tiny-llama", "tiny-mistral")


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
