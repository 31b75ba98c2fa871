"""Tests for lesft.split and the model errors of lesft.models.

The split must be exact: ``server(client(x))`` reproduces a plain Hugging Face model
loaded from the same folder, for every supported layout, split ratio and padding side;
each side must hold (and load) only its own tensors.
"""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from torch.testing import assert_close

from conftest import TINY_ARCHS, padded_batch
from lesft.models import ModelError, resolve
from lesft.split import ClientModel, FullModel, ServerModel, fingerprint, load_split, position_ids, split_point

RATIOS = (0.25, 0.5, 0.75)
LENGTHS = [9, 5, 7]  # three rows, two of them padded


@pytest.fixture(params=["folder", "preset"])
def source_of(request, tiny_folders):
    """``source_of(arch)`` -> ModelSource, from the saved folder or from ``arch:<name>``."""

    def make(arch: str):
        return resolve(str(tiny_folders[arch])) if request.param == "folder" else resolve(f"arch:{arch}")

    return make


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens (what a left-padded HF generate passes)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_split_logits_equal_full_model(arch, side, source_of, tiny_folders, hf_reference):
    # Prepare
    source = source_of(arch)
    reference = hf_reference(tiny_folders[arch])
    ids, mask = padded_batch(LENGTHS, side=side)
    real = mask.bool()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
        full = FullModel(source).eval()(ids, mask)
    for ratio in RATIOS:
        client, server = load_split(source, ratio)
        client.eval(), server.eval()

        # Execute
        with torch.no_grad():
            got = server(client(ids, mask), mask)

        # Assert
        assert got.shape == expected.shape
        assert_close(got[real], expected[real], atol=1e-5, rtol=0, msg=f"{arch} {side} ratio={ratio}")
        assert_close(got, full, atol=1e-5, rtol=0)  # the same computation, padding included


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_and_right_padding_give_the_same_real_logits(arch):
    # Prepare
    client, server = load_split(resolve(f"arch:{arch}"), 0.5)
    client.eval(), server.eval()
    right_ids, right_mask = padded_batch(LENGTHS, side="right")
    left_ids, left_mask = padded_batch(LENGTHS, side="left")

    # Execute
    with torch.no_grad():
        right = server(client(right_ids, right_mask), right_mask)
        left = server(client(left_ids, left_mask), left_mask)

    # Assert
    assert_close(left[left_mask.bool()], right[right_mask.bool()], atol=1e-5, rtol=0)


def test_position_ids_count_real_tokens_only():
    # RoPE hides a constant offset in the logits, so pin the numbers themselves
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# --------------------------------------------------------------------------- split point


@pytest.mark.parametrize("n_layers, ratio, k", [
    (4, 0.25, 1), (4, 0.5, 2), (4, 0.75, 3), (24, 0.25, 6), (28, 0.25, 7), (30, 1 / 3, 10),
    (12, 0.4, 5),  # round(4.8)
    (12, 0.3, 4),  # round(3.6)
    (10, 0.22, 2),  # round(2.2)
])
def test_split_point_rounds(n_layers, ratio, k):
    assert split_point(n_layers, ratio) == k


@pytest.mark.parametrize("n_layers, ratio, k", [(4, 0.01, 1), (4, 0.99, 3), (2, 0.5, 1), (2, 0.1, 1), (2, 0.9, 1),
                                                (30, 0.999, 29)])
def test_split_point_keeps_a_layer_on_each_side(n_layers, ratio, k):
    assert split_point(n_layers, ratio) == k


@pytest.mark.parametrize("n_layers, ratio", [(4, 0.0), (4, 1.0), (4, -0.25), (4, 1.5), (1, 0.5), (0, 0.5)])
def test_split_point_rejects(n_layers, ratio):
    with pytest.raises(ModelError) as info:
        split_point(n_layers, ratio)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- own weights only


def layer_param_count(config) -> int:
    """Parameters of one decoder layer, from the config alone."""
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    attn = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if qkv_bias else 0)
    mlp = 3 * h * inter
    return attn + mlp + 2 * h  # + input and post-attention RMSNorm


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_indices(names) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)\.", n))}


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_each_side_holds_only_its_own_parameters(arch, ratio):
    # Prepare
    source = resolve(f"arch:{arch}")
    cfg = source.config
    L, h, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    k = split_point(L, ratio)

    # Execute
    client, server = load_split(source, ratio)

    # Assert
    assert numel(client) == vocab * h + k * layer_param_count(cfg)
    assert numel(server) == (L - k) * layer_param_count(cfg) + h + vocab * h  # layers, norm, head
    c_names = [n for n, _ in client.named_parameters()]
    s_names = [n for n, _ in server.named_parameters()]
    assert layer_indices(c_names) == set(range(k))
    assert layer_indices(s_names) == set(range(L - k))  # local indices of global k..L-1
    assert not [n for n in c_names if "lm_head" in n or n.endswith("body.norm.weight")]
    assert not [n for n in s_names if "embed_tokens" in n]
    assert all(not p.requires_grad for p in list(client.parameters()) + list(server.parameters()))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_server_layers_are_the_full_models_later_layers(arch):
    # Prepare
    source = resolve(f"arch:{arch}")
    full = FullModel(source).state_dict()
    k = split_point(source.n_layers, 0.5)

    # Execute
    client, server = load_split(source, 0.5)

    # Assert
    for name, p in client.named_parameters():
        torch.testing.assert_close(p, full[name.replace("body.", "lm.model.", 1)], atol=0, rtol=0)
    for name, p in server.named_parameters():
        m = re.match(r"lm\.model\.layers\.(\d+)\.(.*)$", name)
        full_name = f"lm.model.layers.{int(m.group(1)) + k}.{m.group(2)}" if m else name
        torch.testing.assert_close(p, full[full_name], atol=0, rtol=0)


class RecordingWeights:
    """Wraps a WeightSource and records which full names each side asks for."""

    def __init__(self, inner) -> None:
        self.inner, self.names = inner, set()

    def get(self, name, shape, dtype):
        self.names.add(name)
        return self.inner.get(name, shape, dtype)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_each_side_loads_only_its_own_tensors(arch, tiny_folders):
    # Prepare
    source = resolve(str(tiny_folders[arch]))
    L = source.n_layers
    k = split_point(L, 0.25)
    client_src = dataclasses.replace(source, weights=RecordingWeights(source.weights))
    server_src = dataclasses.replace(source, weights=RecordingWeights(source.weights))

    # Execute
    ClientModel(client_src, k)
    ServerModel(server_src, k)

    # Assert
    c, s = client_src.weights.names, server_src.weights.names
    assert layer_indices(c) == set(range(k))
    assert layer_indices(s) == set(range(k, L))
    assert {n for n in c if "layers." not in n} == {"model.embed_tokens.weight"}
    assert {n for n in s if "layers." not in n} == {"model.norm.weight", "lm_head.weight"}


# --------------------------------------------------------------------------- fingerprint


LORA = {"r": 8, "alpha": 16.0, "dropout": 0.2, "targets": ["down_proj", "gate_proj", "up_proj"]}


def test_fingerprint_is_stable():
    a, b = resolve("arch:tiny-qwen2"), resolve("arch:tiny-qwen2")
    assert fingerprint(a, 1, LORA) == fingerprint(a, 1, LORA) == fingerprint(b, 1, dict(LORA))


def test_fingerprint_is_stable_for_a_folder(tiny_folders):
    a, b = resolve(str(tiny_folders["tiny-llama"])), resolve(str(tiny_folders["tiny-llama"]))
    assert fingerprint(a, 2, LORA) == fingerprint(b, 2, LORA)


def test_fingerprint_changes_with_split_lora_and_model():
    # Prepare
    source = resolve("arch:tiny-qwen2")
    wider = dataclasses.replace(source, config=source.config.__class__(**{**source.config.to_dict(),
                                                                        "intermediate_size": 256}))
    base = fingerprint(source, 1, LORA)

    # Execute / Assert
    others = {
        "split": fingerprint(source, 2, LORA),
        "rank": fingerprint(source, 1, {**LORA, "r": 4}),
        "targets": fingerprint(source, 1, {**LORA, "targets": ["up_proj"]}),
        "model": fingerprint(resolve("arch:tiny-llama"), 1, LORA),
        "config": fingerprint(wider, 1, LORA),
    }
    for what, fp in others.items():
        assert fp != base, what
    assert len(set(others.values())) == len(others)


# --------------------------------------------------------------------------- model errors


def one_line_model_error(spec: str) -> str:
    with pytest.raises(ModelError) as info:
        resolve(spec)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert "not found" in one_line_model_error(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    assert "config.json" in one_line_model_error(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "gpt2" in one_line_model_error(str(tmp_path))


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    one_line_model_error(str(tmp_path))


def test_single_layer_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    assert "2" in one_line_model_error(str(tmp_path))


def test_unknown_preset():
    assert "arch:tiny-qwen2" in one_line_model_error("arch:no-such-preset")


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    one_line_model_error(str(tmp_path))


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    one_line_model_error(str(tmp_path))


def test_folder_without_weights(tmp_path, tiny_folders):
    (tmp_path / "config.json").write_text((tiny_folders["tiny-llama"] / "config.json").read_text())
    assert "weights" in one_line_model_error(str(tmp_path))


def test_weights_that_do_not_match_the_config(tmp_path, tiny_folders):
    # Prepare: the weights of tiny-llama under a config with a wider MLP
    import shutil

    shutil.copytree(tiny_folders["tiny-llama"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    source = resolve(str(tmp_path / "m"))

    # Execute / Assert
    with pytest.raises(ModelError) as info:
        load_split(source, 0.5)
    assert "shape" in str(info.value) and "\n" not in str(info.value)


def test_folder_without_tokenizer(tmp_path, tiny_folders):
    import shutil

    shutil.copytree(tiny_folders["tiny-llama"], tmp_path / "m",
                    ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    source = resolve(str(tmp_path / "m"))
    with pytest.raises(ModelError) as info:
        source.load_tokenizer()
    assert "tokenizer" in str(info.value) and "\n" not in str(info.value)


def test_folder_tokenizer_pads_on_the_right(tiny_folders):
    tok = resolve(str(tiny_folders["tiny-qwen2"])).load_tokenizer()
    assert tok.pad_token_id is not None and tok.padding_side == "right"
