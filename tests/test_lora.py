"""Tests for lesft.lora: injection, name-seeded init, canonical names, the adapter
surface (get/set, all-or-nothing), the combined PEFT export, and keyed dropout."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch.testing import assert_close

from conftest import TINY_ARCHS, fresh_hf_model, padded_batch, random_adapters
from lesft import lora
from lesft.config import LoraSettings
from lesft.lora import AdapterError
from lesft.models import resolve
from lesft.split import ClientModel, FullModel, ServerModel, load_split, split_point

SETTINGS = LoraSettings()
OTHER = LoraSettings(lora_r=4, lora_alpha=12.0, lora_dropout=0.1, lora_targets=("q_proj", "o_proj", "down_proj"))


@pytest.fixture(scope="module")
def qwen():
    return resolve("arch:tiny-qwen2")


def with_lora(part, settings=SETTINGS, seed=0):
    return lora.add_lora(part, settings, seed=seed)


def expected_names(layers, settings=SETTINGS) -> set[str]:
    paths = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
             "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return {f"layers.{i}.{paths[t]}.{t}.lora_{ab}" for i in layers for t in settings.lora_targets for ab in "AB"}


# --------------------------------------------------------------------------- injection and init


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_round_zero_equals_the_base_model(qwen, mode):
    # Prepare
    ids, mask = padded_batch([8, 5])
    base_c, base_s = load_split(qwen, 0.5)
    c, s = load_split(qwen, 0.5)
    with_lora(c), with_lora(s)
    for m in (base_c, base_s, c, s):
        m.train(mode == "train")

    # Execute
    with torch.no_grad(), lora.dropout_rows(torch.tensor([1, 2])):
        expected = base_s(base_c(ids, mask), mask)
        got = s(c(ids, mask), mask)

    # Assert
    assert torch.equal(got, expected)
    assert all(torch.count_nonzero(t) == 0 for k, t in lora.get_adapters(c).items() if k.endswith("lora_B"))


def test_lora_a_init_is_deterministic_by_canonical_name(qwen):
    # Prepare
    k = split_point(qwen.n_layers, 0.5)

    # Execute
    c1, c2 = with_lora(ClientModel(qwen, k)), with_lora(ClientModel(qwen, k))
    server = with_lora(ServerModel(qwen, k))
    full = with_lora(FullModel(qwen))
    other_seed = with_lora(ClientModel(qwen, k), seed=1)

    # Assert
    a1, a2, full_ad = lora.get_adapters(c1), lora.get_adapters(c2), lora.get_adapters(full)
    assert a1.keys() == a2.keys()
    assert all(torch.equal(a1[n], a2[n]) for n in a1)
    assert all(torch.equal(t, full_ad[n]) for n, t in a1.items())  # client layer i == full layer i
    assert all(torch.equal(t, full_ad[n]) for n, t in lora.get_adapters(server).items())
    a_names = [n for n in a1 if n.endswith("lora_A")]
    assert len({tuple(a1[n].flatten()[:4].tolist()) for n in a_names}) == len(a_names)  # each name its own draw
    assert all(not torch.equal(lora.get_adapters(other_seed)[n], a1[n]) for n in a_names)


@pytest.mark.parametrize("settings", [SETTINGS, OTHER], ids=["paper", "attention"])
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_canonical_names_use_global_layers(qwen, settings, ratio):
    # Prepare
    L = qwen.n_layers
    k = split_point(L, ratio)

    # Execute
    client = lora.adapter_params(with_lora(ClientModel(qwen, k), settings))
    server = lora.adapter_params(with_lora(ServerModel(qwen, k), settings))
    full = lora.adapter_params(with_lora(FullModel(qwen), settings))

    # Assert
    assert set(client) == expected_names(range(k), settings)
    assert set(server) == expected_names(range(k, L), settings)
    assert set(full) == expected_names(range(L), settings)
    r, h = settings.lora_r, qwen.config.hidden_size
    assert tuple(server[f"layers.{L - 1}.mlp.down_proj.lora_A"].shape) == (r, qwen.config.intermediate_size)
    assert tuple(server[f"layers.{L - 1}.mlp.down_proj.lora_B"].shape) == (h, r)


def test_only_adapters_train(qwen):
    part = with_lora(ServerModel(qwen, 1))
    trainable = {n for n, p in part.named_parameters() if p.requires_grad}
    assert len(trainable) == len(lora.adapter_params(part)) > 0
    assert all(".lora_" in n for n in trainable)


def test_unknown_target_is_rejected(qwen):
    with pytest.raises(AdapterError) as info:
        with_lora(ClientModel(qwen, 1), LoraSettings(lora_targets=("gate_proj", "nope_proj")))
    assert "nope_proj" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- get / set


def test_get_set_round_trip(qwen):
    # Prepare
    part = with_lora(ServerModel(qwen, 2))
    new = random_adapters(lora.get_adapters(part), seed=3)

    # Execute
    lora.set_adapters(part, new)
    got = lora.get_adapters(part)
    got[next(iter(got))].add_(1.0)  # a copy: editing it leaves the live tensors alone

    # Assert
    again = lora.get_adapters(part)
    assert again.keys() == new.keys()
    assert all(torch.equal(again[k], new[k]) for k in new)
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in again.values())


def _last(d):
    return list(d)[-1]


@pytest.mark.parametrize("problem", ["missing", "extra", "shape", "nan", "inf"])
def test_set_adapters_rejections_leave_the_part_untouched(qwen, problem):
    # Prepare
    part = with_lora(ServerModel(qwen, 2))
    before = lora.get_adapters(part)
    bad = random_adapters(before, seed=4)
    last = _last(bad)  # the fault sits after every good tensor: a partial copy would show
    if problem == "missing":
        del bad[last]
    elif problem == "extra":
        bad["layers.0.mlp.gate_proj.lora_A"] = torch.zeros(8, 64)
    elif problem == "shape":
        bad[last] = torch.zeros(bad[last].shape[0], bad[last].shape[1] + 1)
    else:
        bad[last] = bad[last].clone()
        bad[last][0, 0] = float("nan") if problem == "nan" else float("inf")

    # Execute
    with pytest.raises(AdapterError) as info:
        lora.set_adapters(part, bad)

    # Assert
    assert "\n" not in str(info.value)
    after = lora.get_adapters(part)
    assert all(torch.equal(after[k], before[k]) for k in before)


# --------------------------------------------------------------------------- combined PEFT adapter


def _split_with_random_adapters(source, ratio, settings, seed=0):
    client, server = load_split(source, ratio)
    with_lora(client, settings), with_lora(server, settings)
    lora.set_adapters(client, random_adapters(lora.get_adapters(client), seed=seed))
    lora.set_adapters(server, random_adapters(lora.get_adapters(server), seed=seed + 100))
    return client.eval(), server.eval()


@pytest.mark.parametrize("settings", [SETTINGS, OTHER], ids=["paper", "attention"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_combined_peft_adapter_reproduces_the_split(arch, settings, tiny_folders, tmp_path):
    from peft import PeftModel

    # Prepare
    folder = tiny_folders[arch]
    source = resolve(str(folder))
    client, server = _split_with_random_adapters(source, 0.5, settings)
    combined = {**lora.get_adapters(client), **lora.get_adapters(server)}
    ids, mask = padded_batch([9, 6, 3])
    real = mask.bool()

    # Execute
    out = lora.save_peft_adapter(combined, settings, tmp_path / "adapter", base_model=str(folder),
                                 n_layers=source.n_layers)
    peft_model = PeftModel.from_pretrained(fresh_hf_model(folder), str(out)).eval()
    with torch.no_grad():
        expected = server(client(ids, mask), mask)
        got = peft_model(input_ids=ids, attention_mask=mask).logits

    # Assert
    assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    with torch.no_grad():
        base = fresh_hf_model(folder)(input_ids=ids, attention_mask=mask).logits
    assert (base[real] - expected[real]).abs().max() > 1e-3  # the adapters really act
    config = json.loads((out / "adapter_config.json").read_text())
    assert config.get("layers_to_transform") in (None, [])
    reread = lora.load_peft_adapter(out)
    assert reread.keys() == combined.keys()
    assert all(torch.equal(reread[k], combined[k]) for k in combined)


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-llama"])
def test_server_only_adapter_loads_with_layers_to_transform(arch, tiny_folders, tmp_path):
    from peft import PeftModel

    # Prepare: splitfrozen trains the server side only
    folder = tiny_folders[arch]
    source = resolve(str(folder))
    L = source.n_layers
    client, server = load_split(source, 0.25)
    k = client.k
    with_lora(server)
    lora.set_adapters(server, random_adapters(lora.get_adapters(server), seed=7))
    client.eval(), server.eval()
    ids, mask = padded_batch([7, 4])
    real = mask.bool()

    # Execute
    out = lora.save_peft_adapter(lora.get_adapters(server), SETTINGS, tmp_path / "adapter", n_layers=L)
    peft_model = PeftModel.from_pretrained(fresh_hf_model(folder), str(out)).eval()
    with torch.no_grad():
        expected = server(client(ids, mask), mask)
        got = peft_model(input_ids=ids, attention_mask=mask).logits

    # Assert
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] == list(range(k, L))
    lora_layers = {int(re.search(r"layers\.(\d+)\.", n).group(1)) for n, _ in peft_model.named_parameters()
                   if ".lora_A." in n}
    assert lora_layers == set(range(k, L))
    assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_save_peft_adapter_refuses_nan(tmp_path):
    with pytest.raises(AdapterError):
        lora.save_peft_adapter({"layers.0.mlp.up_proj.lora_A": torch.tensor([[float("nan")]])}, SETTINGS,
                               tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_plain_adapter_file_round_trip(tmp_path):
    tensors = {"layers.1.mlp.up_proj.lora_A": torch.randn(8, 64), "layers.1.mlp.up_proj.lora_B": torch.zeros(128, 8)}
    path = lora.save_adapters(tensors, tmp_path / "a.safetensors", {"round": 3})
    back = lora.load_adapters(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(AdapterError):
        lora.load_adapters(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- keyed dropout


@pytest.fixture(scope="module")
def dropout_model(qwen):
    """A full model with heavy LoRA dropout and non-zero adapters, in train mode."""
    model = with_lora(FullModel(qwen), LoraSettings(lora_dropout=0.5))
    lora.set_adapters(model, random_adapters(lora.get_adapters(model), seed=11, scale=0.3))
    return model.train()


def rows_of(ids_list: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch from explicit rows."""
    width = max(len(r) for r in ids_list)
    ids = torch.full((len(ids_list), width), 1, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(ids_list):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    return ids, mask


def run(model, ids_list, keys):
    ids, mask = rows_of(ids_list)
    with torch.no_grad(), lora.dropout_rows(torch.tensor(keys, dtype=torch.int64)):
        return model(ids, mask)


ROW = [5, 17, 99, 3, 250, 41]
OTHER_A = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
OTHER_B = [300, 301]
KEY, KEY_A, KEY_B = 123456789, 42, 77


def test_keyed_dropout_is_on(dropout_model):
    with torch.no_grad():
        eval_out = dropout_model.eval()(*rows_of([ROW]))
    dropout_model.train()
    assert (run(dropout_model, [ROW], [KEY]) - eval_out).abs().max() > 1e-3


def test_keyed_dropout_ignores_padding_after_a_row(dropout_model):
    alone = run(dropout_model, [ROW], [KEY])[0]
    padded = run(dropout_model, [ROW, OTHER_A], [KEY, KEY_A])[0, :len(ROW)]  # ROW padded by 4
    assert_close(padded, alone, atol=1e-6, rtol=0)


def test_keyed_dropout_ignores_the_other_rows(dropout_model):
    with_a = run(dropout_model, [ROW, OTHER_A], [KEY, KEY_A])[0, :len(ROW)]
    with_b = run(dropout_model, [ROW, OTHER_B], [KEY, KEY_B])[0, :len(ROW)]
    assert_close(with_a, with_b, atol=1e-6, rtol=0)


def test_keyed_dropout_ignores_the_position_in_the_batch(dropout_model):
    first = run(dropout_model, [ROW, OTHER_B], [KEY, KEY_B])[0, :len(ROW)]
    last = run(dropout_model, [OTHER_A, OTHER_B, ROW], [KEY_A, KEY_B, KEY])[2, :len(ROW)]
    assert_close(last, first, atol=1e-6, rtol=0)


def test_keyed_dropout_depends_on_the_key(dropout_model):
    a = run(dropout_model, [ROW], [KEY])
    again = run(dropout_model, [ROW], [KEY])
    b = run(dropout_model, [ROW], [KEY + 1])
    assert torch.equal(a, again)
    assert (a - b).abs().max() > 1e-3


def test_row_keys_are_distinct_and_stable():
    keys = lora.row_keys(0, 3, 5, 4)
    assert keys.dtype == torch.int64 and keys.shape == (4,)
    assert torch.equal(keys, lora.row_keys(0, 3, 5, 4))
    assert len(set(keys.tolist()) | set(lora.row_keys(0, 3, 6, 4).tolist()) | set(lora.row_keys(0, 4, 5, 4).tolist())
               | set(lora.row_keys(1, 3, 5, 4).tolist())) == 16
    assert (keys >= 0).all()


@pytest.mark.parametrize("with_keys", [True, False])
def test_no_dropout_in_train_mode_equals_eval_mode(dropout_model, with_keys):
    # Prepare
    ids, mask = rows_of([ROW, OTHER_A])
    with torch.no_grad():
        eval_out = dropout_model.eval()(ids, mask)
    dropout_model.train()

    # Execute
    keys = lora.dropout_rows(torch.tensor([KEY, KEY_A])) if with_keys else lora.dropout_rows(None)
    with torch.no_grad(), keys, lora.no_dropout():
        train_out = dropout_model(ids, mask)

    # Assert
    assert torch.equal(train_out, eval_out)


def test_keyed_dropout_masks_are_the_same_in_the_split_and_the_full_model(qwen):
    # Prepare: the same adapters and keys, dropout on, both in train mode
    settings = LoraSettings(lora_dropout=0.5)
    full = with_lora(FullModel(qwen), settings)
    adapters = random_adapters(lora.get_adapters(full), seed=12, scale=0.3)
    lora.set_adapters(full, adapters)
    client, server = load_split(qwen, 0.5)
    with_lora(client, settings), with_lora(server, settings)
    lora.set_adapters(client, {k: v for k, v in adapters.items() if int(k.split(".")[1]) < client.k})
    lora.set_adapters(server, {k: v for k, v in adapters.items() if int(k.split(".")[1]) >= client.k})
    ids, mask = rows_of([ROW, OTHER_A])
    keys = torch.tensor([KEY, KEY_A])

    # Execute
    with torch.no_grad(), lora.dropout_rows(keys):
        expected = full.train()(ids, mask)
        got = server.train()(client.train()(ids, mask), mask)

    # Assert
    assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["tiny-qwen2", "tiny-llama", "tiny-mistral"])
def test_adapter_shapes_from_config_match_the_injected_adapters(arch):
    from lesft.config import LoraSettings
    from lesft.models import resolve
    from lesft.split import load_split

    source = resolve(f"arch:{arch}")
    settings = LoraSettings(lora_r=4, lora_targets=("q_proj", "up_proj", "down_proj"))
    client, server = load_split(source, 0.5)
    lora.add_lora(client, settings)
    lora.add_lora(server, settings)
    live = {k: tuple(p.shape) for k, p in {**lora.adapter_params(client), **lora.adapter_params(server)}.items()}
    assert lora.adapter_shapes(source.config, range(source.n_layers), settings) == live
    assert lora.adapter_shapes(source.config, range(client.k), settings) == {
        k: tuple(p.shape) for k, p in lora.adapter_params(client).items()}
