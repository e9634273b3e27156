"""The model's knobs have one schema (RecommenderConfig): the run config, the command-line
options and the model read the same fields, bounds and help."""

import argparse
from dataclasses import fields

import pytest

from conftest import default_run_config
from shared_model.cli_options import add_model_options, model_config
from shared_model.recommender import ConfigError, RecommenderConfig
from shared_model.settings import RunSettings, SettingsError

OUT_OF_BOUNDS = [("lora-rank", 0), ("history", 0), ("dropout", 1.5), ("dropout", -0.1), ("heads", 0), ("dim", 0),
                 ("layers", 0), ("lora-alpha", 0.0), ("lora-layers", 7), ("lora-alpha", float("nan")), ("ffn", 0),
                 ("id-rank", -1)]


@pytest.mark.parametrize("key, value", OUT_OF_BOUNDS + [("dim", 25), ("id-rank", 24)])  # 25: not divisible by
# heads = 2; id-rank 24: not below dim (24)
def test_run_config_refuses_a_model_knob_out_of_bounds_naming_the_key(key, value):
    with pytest.raises(SettingsError, match=f"run config '{key}' must be"):
        RunSettings.from_run_config(default_run_config(**{key: value}))


@pytest.mark.parametrize("key, value", OUT_OF_BOUNDS + [("dim", 25)])
def test_the_config_itself_refuses_it_naming_the_field(key, value):
    with pytest.raises(ConfigError, match=f"^{key.replace('-', '_')} must be"):
        RecommenderConfig(**{key.replace("-", "_"): value})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test")
    add_model_options(p)
    return p


@pytest.mark.parametrize("key, value", [(k, v) for k, v in OUT_OF_BOUNDS if v == v])
def test_command_line_refuses_it_naming_the_flag(key, value, capsys):
    with pytest.raises(SystemExit) as exit:
        parser().parse_args([f"--{key}", str(value)])
    assert exit.value.code == 2 and f"argument --{key}: must be" in capsys.readouterr().err


def test_command_line_cross_field_check_names_the_flag(capsys):
    p = parser()
    args = p.parse_args(["--dim", "25", "--heads", "2"])
    with pytest.raises(SystemExit):
        model_config(p, args)
    assert "argument --dim: must be divisible by heads (2)" in capsys.readouterr().err


def test_every_field_is_a_run_config_key_and_a_flag_with_its_help():
    run_config = default_run_config()
    help_text = "".join(parser().format_help().split())  # argparse wraps lines, also at hyphens
    for f in fields(RecommenderConfig):
        key = f.name.replace("_", "-")
        assert key in run_config
        assert f"--{key}" in help_text and "".join(f.metadata["help"].split()) in help_text
    settings = RunSettings.from_run_config(default_run_config(**{"lora-rank": 3, "history": 7, "heads": 4}))
    assert (settings.model.lora_rank, settings.model.history, settings.model.heads) == (3, 7, 4)
    assert settings.to_dict() == {k: run_config[k] for k in settings.to_dict()} | {
        "lora-rank": 3, "history": 7, "heads": 4}


def test_command_line_options_build_the_config():
    p = parser()
    args = p.parse_args(["--lora-rank", "3", "--no-id-embeddings", "--dropout", "0"])
    assert model_config(p, args) == RecommenderConfig(lora_rank=3, id_embeddings=False, dropout=0.0)
    assert model_config(p, p.parse_args([])) == RecommenderConfig()
