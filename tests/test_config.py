"""Tests for lesft.config: precedence (defaults < TOML < LESFT_* env < CLI), type parsing,
one-line ConfigErrors, saving, ``replace``; and the ``lesft config`` command."""
from __future__ import annotations

import json

import pytest

from lesft.config import Config, ConfigError, LoraSettings, build_config, leaf_fields


@pytest.fixture(autouse=True)
def _no_lesft_env(monkeypatch):
    """These tests never see the caller's LESFT_* settings."""
    import os

    for name in [k for k in os.environ if k.startswith("LESFT_")]:
        monkeypatch.delenv(name)

# --------------------------------------------------------------------------- precedence


def write_toml(tmp_path, body: str, name: str = "settings.toml"):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_defaults_are_the_papers():
    cfg = build_config(env={})
    assert cfg == Config()
    assert cfg.model.split_ratio == 0.25
    assert (cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (8, 16.0, 0.2)
    assert cfg.lora.lora_targets == ("gate_proj", "up_proj", "down_proj")
    assert (cfg.loss.p_sal, cfg.loss.gammas) == (0.95, (5.0, 0.3, 0.6))
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum) == (5e-5, 1, 4)
    assert cfg.train.method == "lesft"


def test_precedence_defaults_toml_env_cli(tmp_path):
    # Prepare
    toml = write_toml(tmp_path, 'split_ratio = 0.5\nclients = 3\n[lora]\nlora_r = 4\nlora_alpha = 8\n'
                                '[train]\nlr = 0.001\n')
    env = {"LESFT_SPLIT_RATIO": "1/3", "LESFT_LORA_R": "16", "LESFT_UNRELATED": "x", "HOME": "/nowhere"}
    cli = {"split_ratio": "0.75", "seed": None}

    # Execute
    only_toml = build_config(toml=toml, env={})
    toml_env = build_config(toml=toml, env=env)
    everything = build_config(toml=toml, env=env, cli=cli)

    # Assert
    assert (only_toml.model.split_ratio, only_toml.data.clients, only_toml.lora.lora_r) == (0.5, 3, 4)
    assert only_toml.lora.lora_alpha == 8.0 and only_toml.train.lr == 0.001
    assert toml_env.model.split_ratio == pytest.approx(1 / 3) and toml_env.lora.lora_r == 16
    assert everything.model.split_ratio == 0.75 and everything.lora.lora_r == 16
    assert everything.data.clients == 3 and everything.train.seed == 0  # None on the CLI: not given


def test_env_none_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("LESFT_CLIENTS", "7")
    assert build_config().data.clients == 7
    assert build_config(env={}).data.clients == Config().data.clients


def test_toml_accepts_hyphens_and_the_model_leaf(tmp_path):
    flat = write_toml(tmp_path, 'model = "arch:tiny-llama"\nsplit-ratio = 0.5\n[lora]\nlora-targets = ["q_proj", "v_proj"]\n',
                      "flat.toml")
    grouped = write_toml(tmp_path, '[model]\nmodel = "arch:tiny-mistral"\ndtype = "bfloat16"\n', "grouped.toml")
    cfg = build_config(toml=flat, env={})
    assert cfg.model.model == "arch:tiny-llama" and cfg.model.split_ratio == 0.5
    assert cfg.lora.lora_targets == ("q_proj", "v_proj")
    cfg = build_config(toml=grouped, env={})
    assert cfg.model.model == "arch:tiny-mistral" and cfg.model.dtype == "bfloat16"


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("name, raw, value", [
    ("split_ratio", "1/4", 0.25),
    ("split_ratio", "0.5", 0.5),
    ("lr", "1e-3", 1e-3),
    ("server_lr", "1/1000", 1e-3),
    ("server_lr", "none", None),
    ("server_lr", "", None),
    ("gamma_nonsalient", "null", None),
    ("gamma_nonsalient", "0.4", 0.4),
    ("autocast_bf16", "true", True),
    ("autocast_bf16", "Yes", True),
    ("autocast_bf16", "1", True),
    ("autocast_bf16", "off", False),
    ("autocast_bf16", "0", False),
    ("autocast_bf16", True, True),
    ("lora_targets", "q_proj, v_proj,", ("q_proj", "v_proj")),
    ("lora_targets", ["up_proj"], ("up_proj",)),
    ("clients", "3", 3),
    ("clients", 5.0, 5),
    ("model", "arch:tiny-qwen2", "arch:tiny-qwen2"),
])
def test_values_parse(name, raw, value):
    cfg = build_config(env={}, cli={name: raw})
    group = leaf_fields()[name][0]
    assert getattr(getattr(cfg, group), name) == value


@pytest.mark.parametrize("name, raw", [
    ("split_ratio", "abc"), ("split_ratio", "1/0"), ("clients", "3.5"), ("clients", "two"), ("clients", True),
    ("clients", 2.5), ("autocast_bf16", "maybe"), ("lr", "none"),
])
def test_bad_values_are_config_errors(name, raw):
    with pytest.raises(ConfigError) as info:
        build_config(env={}, cli={name: raw})
    assert name in str(info.value) and "\n" not in str(info.value)


def test_env_values_parse_like_flags():
    cfg = build_config(env={"LESFT_SPLIT_RATIO": "3/4", "LESFT_AUTOCAST_BF16": "yes",
                            "LESFT_LORA_TARGETS": "q_proj,k_proj", "LESFT_SERVER_LR": "none"})
    assert cfg.model.split_ratio == 0.75 and cfg.train.autocast_bf16 is True
    assert cfg.lora.lora_targets == ("q_proj", "k_proj") and cfg.train.server_lr is None


# --------------------------------------------------------------------------- validation


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(**{"env": {}, **kwargs})
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("cli, word", [
    ({"method": "bogus"}, "method"),
    ({"split_ratio": "0"}, "split_ratio"),
    ({"split_ratio": "1"}, "split_ratio"),
    ({"split_ratio": "-0.5"}, "split_ratio"),
    ({"aggregate_every": "6", "grad_accum": "4"}, "aggregate_every"),
    ({"no_such_setting": "1"}, "no_such_setting"),
    ({"lora_r": "0"}, "lora_r"),
    ({"lora_dropout": "1"}, "lora_dropout"),
    ({"lora_targets": ","}, "lora_targets"),
    ({"p_sal": "1"}, "p_sal"),
    ({"sim_threshold": "1.5"}, "sim_threshold"),
    ({"sim_vectors": "pooled"}, "sim_vectors"),
    ({"lesft_norm": "rows"}, "lesft_norm"),
    ({"paths": "both"}, "paths"),
    ({"gamma_nonsalient": "-1"}, "gamma_nonsalient"),
    ({"lesft_nll_mix": "-0.1"}, "lesft_nll_mix"),
    ({"dataset": "mnist"}, "dataset"),
    ({"max_length": "4"}, "max_length"),
    ({"clients": "0"}, "clients"),
    ({"wire_dtype": "int8"}, "wire_dtype"),
    ({"dtype": "float16"}, "dtype"),
])
def test_validation_errors_are_one_line(cli, word):
    assert word in config_error(cli=cli)


@pytest.mark.parametrize("name, raw", [("lr", "nan"), ("lr", "inf"), ("server_lr", "nan"), ("weight_decay", "nan"),
                                       ("lesft_nll_mix", "nan"), ("gamma_nonsalient", "nan"),
                                       ("dirichlet_alpha", "nan")])
def test_non_finite_numbers_are_config_errors(name, raw):
    assert name in config_error(cli={name: raw})


def test_aggregate_every_multiple_of_grad_accum_is_fine():
    cfg = build_config(env={}, cli={"aggregate_every": "8", "grad_accum": "4"})
    assert (cfg.train.aggregate_every, cfg.train.grad_accum) == (8, 4)


def test_unknown_env_setting_is_ignored_but_a_bad_env_value_is_an_error():
    assert build_config(env={"LESFT_NOPE": "1"}) == Config()
    assert "split_ratio" in config_error(env={"LESFT_SPLIT_RATIO": "2"})


@pytest.mark.parametrize("body, word", [
    ("no_such_key = 1\n", "no_such_key"),
    ("[lora]\nsplit_ratio = 0.5\n", "split_ratio"),   # a real setting under the wrong group
    ("[train]\nnope = 1\n", "nope"),
    ("split_ratio = = 0.5\n", "TOML"),               # malformed
    ("[model\n", "TOML"),
    ('lora_r = "abc"\n', "lora_r"),
    ("split_ratio = 1.0\n", "split_ratio"),
])
def test_toml_errors_are_one_line(tmp_path, body, word):
    assert word in config_error(toml=write_toml(tmp_path, body))


def test_missing_toml_file(tmp_path):
    assert "not found" in config_error(toml=tmp_path / "missing.toml")


# --------------------------------------------------------------------------- save and replace


def test_save_writes_json_that_round_trips(tmp_path):
    # Prepare
    cfg = build_config(env={}, cli={"split_ratio": "1/3", "lora_targets": "q_proj,v_proj", "server_lr": "0.01",
                                    "gamma_nonsalient": "0.5", "autocast_bf16": "true", "run_id": "x"})

    # Execute
    cfg.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())

    # Assert
    assert data == cfg.to_dict()
    assert data["lora"]["lora_targets"] == ["q_proj", "v_proj"]
    flat = {name: value for group in data.values() for name, value in group.items()}
    assert build_config(env={}, cli=flat) == cfg
    toml = write_toml(tmp_path, "".join(f"{k} = {json.dumps(v)}\n" for k, v in flat.items() if v is not None))
    assert build_config(toml=toml, env={}) == cfg


def test_replace_changes_only_what_it_names(monkeypatch):
    # Prepare
    cfg = build_config(env={"LESFT_CLIENTS": "3"}, cli={"lr": "0.01"})
    monkeypatch.setenv("LESFT_SEED", "9")  # replace() never re-reads the environment

    # Execute
    new = cfg.replace(samples_per_client=2, split_ratio="1/2")

    # Assert
    assert (new.data.samples_per_client, new.model.split_ratio) == (2, 0.5)
    assert (new.data.clients, new.train.lr, new.train.seed) == (3, 0.01, 0)
    assert (cfg.data.samples_per_client, cfg.model.split_ratio) == (10, 0.25)  # the original is untouched
    assert isinstance(new.lora, LoraSettings) and new.lora is not cfg.lora


def test_replace_validates():
    with pytest.raises(ConfigError):
        Config().replace(split_ratio=1)
    with pytest.raises(ConfigError):
        Config().replace(no_such_setting=1)


def test_replace_can_reset_an_optional_setting_to_none():
    cfg = Config().replace(gamma_nonsalient=0.5, server_lr=0.01)
    reset = cfg.replace(gamma_nonsalient=None, server_lr=None)
    assert reset.loss.gamma_nonsalient is None and reset.train.server_lr is None


# --------------------------------------------------------------------------- the CLI


def test_cli_config_json_reads_flags():
    from typer.testing import CliRunner

    from lesft.cli import app

    result = CliRunner().invoke(app, ["config", "--json", "--split-ratio", "1/3", "--no-autocast-bf16"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["split_ratio"] == pytest.approx(0.3333333333)
    assert str(data["model"]["split_ratio"]).startswith("0.333")
    assert data["train"]["autocast_bf16"] is False


def test_cli_config_reads_the_toml_and_env(tmp_path):
    from typer.testing import CliRunner

    from lesft.cli import app

    toml = write_toml(tmp_path, "clients = 6\nseed = 4\n")
    result = CliRunner().invoke(app, ["config", "--json", "--config", str(toml), "--seed", "5"],
                                env={"LESFT_CLIENTS": "2"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["data"]["clients"], data["train"]["seed"]) == (2, 5)


@pytest.mark.parametrize("args", [["--split-ratio", "2"], ["--method", "nope"], ["--config", "/no/such.toml"]])
def test_cli_user_error_is_one_line_exit_2(args):
    from typer.testing import CliRunner

    from lesft.cli import app

    result = CliRunner().invoke(app, ["config", *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("method", ["fedavg", "centralized"])
def test_label_private_is_refused_for_methods_without_a_split_in_one_line(method):
    with pytest.raises(ConfigError) as info:
        build_config(cli={"method": method, "label_private": True}, env={})
    text = str(info.value)
    assert "\n" not in text and "label_private" in text and "--label-private" in text


def test_label_private_runs_pipelined_too():
    cfg = build_config(cli={"method": "lesft", "label_private": True, "pipeline_depth": 2}, env={})
    assert cfg.model.label_private and cfg.train.pipeline_depth == 2


def test_label_private_is_in_the_fingerprint_and_absent_from_a_standard_runs_parts():
    from lesft.engine import run_fingerprint
    from lesft.models import source_for

    standard = build_config(cli={"model": "arch:tiny-qwen2"}, env={})
    private = standard.replace(label_private=True)
    fp, parts = run_fingerprint(standard, source_for(standard))
    fp_private, parts_private = run_fingerprint(private, source_for(private))
    assert "label_private" not in parts and parts_private["label_private"] is True and fp != fp_private
