"""``DeltaTrainer`` in one process: checkpoints hold the delta only, reload and resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltadist import AutoDeltaModel, ConfigError, LoraModel
from tests.tiny import build_tiny, logits_of, tiny_inputs

pytest.importorskip("accelerate")  # transformers.Trainer needs it

FAMILY = "llama"
EXAMPLES = 8
BATCH = 4
MAX_STEPS = 4
SAVE_STEPS = 2
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json", "adapter_model.safetensors"}


def dataset() -> list[dict[str, torch.Tensor]]:
    inputs = tiny_inputs(FAMILY, batch=EXAMPLES, seq=8, seed=3)
    labels = torch.arange(EXAMPLES) % 3
    return [{"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i],
             "labels": labels[i]} for i in range(EXAMPLES)]


def build() -> tuple[torch.nn.Module, LoraModel]:
    model = build_tiny(FAMILY, "cls", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        delta = LoraModel(backbone_model=model, lora_r=4)
    delta.freeze_module()
    return model, delta


def make_trainer(output_dir: Path, model: torch.nn.Module, delta: LoraModel, **kwargs):
    """A ``DeltaTrainer`` of the fixed recipe; ``kwargs`` go to it (e.g. ``optimizers=``)."""
    from transformers import TrainingArguments

    from deltadist.trainer import DeltaTrainer

    args = TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, per_device_train_batch_size=BATCH,
        max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS, learning_rate=0.05,
        logging_strategy="no", report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    return DeltaTrainer(model=model, args=args, train_dataset=dataset(), delta=delta, **kwargs)


def eval_logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return logits_of(model, tiny_inputs(FAMILY, batch=4, seq=8, seed=5))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    output_dir = tmp_path_factory.mktemp("trainer")
    model, delta = build()
    initial = {k: v.clone() for k, v in delta.state_dict().items()}
    trainer = make_trainer(output_dir, model, delta)
    trainer.train()
    final = tmp_path_factory.mktemp("final")
    trainer.save_model(str(final))
    return {"dir": output_dir, "final": final, "initial": initial, "state": delta.state_dict(),
            "logits": eval_logits(model)}


def test_checkpoints_hold_the_delta_and_no_model_weights(trained) -> None:
    checkpoints = sorted(p.name for p in trained["dir"].glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{s}" for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)]
    for directory in [trained["dir"] / name for name in checkpoints] + [trained["final"]]:
        files = {p.name for p in directory.iterdir()}
        assert {"delta.safetensors", "delta_config.json"} <= files, files
        assert not files & FULL_MODEL_FILES, files
        tensors = load_file(str(directory / "delta.safetensors"))
        # The LoRA and the task head (trained and saved with the delta by default), nothing else.
        assert tensors and all(".lora." in k or k.startswith("score.") for k in tensors), sorted(tensors)
        assert "score.weight" in tensors
    last = load_file(str(trained["dir"] / checkpoints[-1] / "delta.safetensors"))
    assert all(torch.equal(last[k], v) for k, v in trained["state"].items())
    assert any(not torch.equal(trained["initial"][k], v) for k, v in last.items()), "nothing trained"


def test_a_checkpoint_reloads_onto_a_fresh_backbone(trained) -> None:
    fresh = build_tiny(FAMILY, "cls", seed=0)
    AutoDeltaModel.from_finetuned(trained["dir"] / f"checkpoint-{MAX_STEPS}", backbone_model=fresh)
    torch.testing.assert_close(eval_logits(fresh), trained["logits"], rtol=1e-5, atol=1e-6)
    fresh = build_tiny(FAMILY, "cls", seed=0)
    AutoDeltaModel.from_finetuned(trained["final"], backbone_model=fresh)
    torch.testing.assert_close(eval_logits(fresh), trained["logits"], rtol=1e-5, atol=1e-6)


def test_resuming_from_a_checkpoint_continues_identically(trained, tmp_path) -> None:
    model, delta = build()
    trainer = make_trainer(tmp_path, model, delta)
    trainer.train(resume_from_checkpoint=str(trained["dir"] / f"checkpoint-{SAVE_STEPS}"))
    assert trainer.state.global_step == MAX_STEPS
    for key, value in trained["state"].items():
        torch.testing.assert_close(delta.state_dict()[key], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_trainable_parameters_outside_the_delta_are_refused(tmp_path) -> None:
    model, delta = build()
    model.model.norm.weight.requires_grad_(True)  # trained, but the delta would not save it
    with pytest.raises(ConfigError, match="model.norm.weight"):
        make_trainer(tmp_path, model, delta)


def test_a_delta_on_another_model_is_refused(tmp_path) -> None:
    _, delta = build()
    other, _ = build()
    with pytest.raises(ConfigError, match="another model"):
        make_trainer(tmp_path, other, delta)
