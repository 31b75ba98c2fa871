"""A model without a usable tokenizer, or data that tokenizes to nothing, is refused before
training instead of "finishing" on no tokens (issue 13, item 3)."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lesft.data import DataError, generate_synthetic


@pytest.fixture(scope="module")
def folder_without_tokenizer(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from lesft.models import preset_config

    folder = tmp_path_factory.mktemp("notok") / "tiny-qwen2-no-tokenizer"
    AutoModelForCausalLM.from_config(preset_config("tiny-qwen2")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mode", [["--inprocess"], []], ids=["inprocess", "pipeline"])
def test_model_folder_without_tokenizer_is_refused_before_training(tmp_path, folder_without_tokenizer, mode):
    from lesft.cli import app

    res = CliRunner().invoke(app, ["train", *mode, "--model", str(folder_without_tokenizer), "--clients", "1",
                                   "--samples-per-client", "2", "--rounds", "1", "--runs-dir", str(tmp_path / "runs"),
                                   "--run-id", "x"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "has no usable tokenizer" in text and "tokenizer.save_pretrained" in text, res.output
    assert not (tmp_path / "runs" / "x").exists()  # nothing trained, nothing written


def test_tokenizer_of_another_model_is_refused(tiny_folders):
    from lesft.models import ModelError, check_tokenizer, local_tokenizer, preset_config

    config = preset_config("tiny-qwen2")
    check_tokenizer(local_tokenizer(), config, "tiny")  # the tests' own pairing is fine
    config.vocab_size = 300  # ids of the 500-token tokenizer would not fit
    with pytest.raises(ModelError, match="embedding only 300 rows"):
        check_tokenizer(local_tokenizer(), config, "tiny")


def test_targets_that_tokenize_to_nothing_are_a_data_error(tokenizer):
    from lesft.batching import encode_all

    examples = generate_synthetic(4, seed=0, split="train")
    assert encode_all(tokenizer, examples, 64)  # real data passes
    empty = [ex.__class__(**{**ex.__dict__, "y": ""}) for ex in examples]
    with pytest.raises(DataError, match="targets tokenize to 0 token"):
        encode_all(tokenizer, empty, 64)
