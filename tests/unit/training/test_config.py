"""The training job's config: default file, key and type checks, --set overrides, engine choice."""

import re
from pathlib import Path

import pytest
import torch

from deltadist.cli.main import main
from deltadist.errors import ConfigError
from deltadist.training.config import DEFAULT_CONFIG_PATH, TrainConfig, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[3]


def test_packaged_default_is_the_documented_config() -> None:
    assert DEFAULT_CONFIG_PATH.read_bytes() == (REPO / "configs" / "minilm_lora.yaml").read_bytes()


def test_default_file_matches_dataclass_defaults() -> None:
    assert load_config() == TrainConfig()


def test_unknown_key_lists_valid_keys() -> None:
    expected = r"in training: epoch \(did you mean epochs\?\)\. Valid keys: epochs, max_steps, batch_size"
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=["training.epoch=1"])
    valid = "task, model, delta, data, training, engine, deepspeed_config, output_dir"
    with pytest.raises(ConfigError, match=f"Valid keys: {valid}"):
        from_dict({"modle": {}})


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(overrides=[
        "training.epochs=3", "training.lr=1e-3", "output_dir=/tmp/x",
        "delta.modified_modules=[query]", "delta.lora_r=4",
    ])
    assert cfg.training.epochs == 3
    assert cfg.training.lr == pytest.approx(1e-3)
    assert cfg.output_dir == "/tmp/x"
    assert cfg.delta["modified_modules"] == ["query"] and cfg.delta["lora_r"] == 4
    assert cfg.model == TrainConfig().model


@pytest.mark.parametrize(("item", "message"), [
    ("training.epochs=two", "training.epochs must be of type int"),
    ("training.epochs=0", "training.epochs must be positive"),
    ("training.epochs", "--set needs KEY=VALUE"),
    ("engine.name=plain", "'engine' is not a section"),
    ("delta.lora_rank=4", "lora_rank"),
    ("data.train=builtin:imdb", "available: builtin:topics, or a path"),
    ("task=translation", "task: 'translation' is not one of causal_lm, seq2seq, sequence_classification"),
    ("task=causal_lm", "task: causal_lm needs your own rows: set data.train"),
    ("model.dtype=half", "model.dtype: 'half' is not one of auto, bf16, fp16, fp32"),
    ("training.scheduler=step", "training.scheduler: 'step' is not one of constant, cosine, linear"),
    ("training.max_steps=0", "training.max_steps must be positive"),
    ("training.warmup_steps=-1", "must not be negative"),
    ("data.packing=true", "data.packing applies to task causal_lm only"),
    ("data.labels=[1, 2]", "data.labels must be a list of names"),
])
def test_bad_values_are_errors(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[item])


def test_unknown_engine_names_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="unknown engine 'fsdp'; available engines: plain"):
        load_config(overrides=["engine=fsdp"])


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "engine=megatron"]) == 2
    assert "available engines: plain" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_cli_engine_bmtrain_without_cuda_is_one_line_naming_the_alternatives(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "engine=bmtrain"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bmtrain needs CUDA GPUs" in err and "fsdp2" in err


@pytest.mark.parametrize(("content", "message"), [
    (b"training:\n  epochs: 1\n  lr: [0.1\n", r":4:1: invalid YAML: expected ',' or '\]', but got "
     r"'<stream end>' \(while parsing a flow sequence started at line 3, column 7\); fix the YAML there\.$"),
    (b"training:\n  epochs: 1\n bad: 2\n", r":3:2: invalid YAML: expected <block end>"),
    (b"output_dir: a\x01b\n", r":1:14: invalid YAML: unacceptable character #x0001: special characters"),
    (b"output_dir: \xff\n", r": not UTF-8 text \(byte 12: invalid start byte\); save the config as UTF-8\.$"),
], ids=["unclosed_list", "indentation", "control_character", "not_utf8"])
def test_bad_yaml_file_names_file_line_and_column(content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + message):
        load_config(path)


def test_bad_yaml_in_an_override_names_the_override() -> None:
    expected = (r"^--set 'delta.modified_modules=\[quer': the value is not valid YAML at column 6: "
                r"expected ',' or '\]'.* \(while parsing a flow sequence started at column 1\); fix it")
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=["delta.modified_modules=[quer"])


def test_config_file_round_trips(tmp_path: Path) -> None:
    import yaml

    cfg = load_config(overrides=["training.epochs=5"])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg
