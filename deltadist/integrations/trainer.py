"""Hugging Face ``Trainer`` integration: checkpoints that hold only the delta.

    from transformers import TrainingArguments
    from deltadist import LoraModel
    from deltadist.trainer import DeltaTrainer

    delta = LoraModel(backbone_model=model, lora_r=8)
    delta.freeze_module()                       # before the Trainer (and DeepSpeed) wraps the model
    trainer = DeltaTrainer(model=model, args=TrainingArguments(...), train_dataset=..., delta=delta)
    trainer.train()                             # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model("out/delta")             # on every rank: delta.safetensors + delta_config.json
    AutoDeltaModel.from_finetuned("out/delta", backbone_model=fresh_backbone)

Everything else is the plain ``Trainer`` (``TrainingArguments(deepspeed=...)``, FSDP, DDP, logging,
evaluation). Importing this module imports ``transformers``; ``import deltadist`` does not import it.

What differs from ``transformers.Trainer`` (its source read in transformers 5.23), four overrides:

* :meth:`save_model` -- called by ``Trainer`` for every ``checkpoint-N`` and by you at the end --
  writes ``delta.save_finetuned(output_dir)`` (plus the tokenizer / processor, as ``Trainer`` does)
  and never the model's weights. It must run on every rank: only the delta tensors are gathered
  (under ZeRO-3 ``Trainer`` would gather the consolidated 16-bit model to rank 0, or with
  ``stage3_gather_16bit_weights_on_model_save: false`` write a whole engine checkpoint instead).
* :meth:`_save_optimizer_and_scheduler` -- under DeepSpeed the engine checkpoint (``global_step*/``,
  optimizer state and the fp32 master copy of the delta, needed to resume) is written with
  ``exclude_frozen_parameters=True``: by default ZeRO-2/3 also store every rank's piece of the
  frozen backbone in it. Other engines: unchanged (``optimizer.pt`` holds the delta's state only).
* :meth:`_load_from_checkpoint` -- resuming without DeepSpeed loads ``checkpoint-N/delta.safetensors``
  into the attached delta (``delta.load_finetuned``: backbone fingerprint checked, any sharding
  scattered); ``optimizer.pt`` etc. are restored by ``Trainer`` as usual. Under DeepSpeed ``Trainer``
  resumes from the engine checkpoint in ``checkpoint-N/global_step*`` instead, which restores the
  delta (strict module loading works: ``freeze_module()`` forgives exactly the frozen keys) and the
  optimizer. So keep ``save_only_model=False`` (the default) to resume under DeepSpeed.
* :meth:`_load_best_model` (``load_best_model_at_end``) loads the best checkpoint's delta. Under
  DeepSpeed this sets the model's weights; the optimizer's master copy is not rewound (training has
  ended when this runs).

Checkpoints: ``checkpoint-N/`` holds ``delta.safetensors``, ``delta_config.json``, the trainer state,
RNG state and the optimizer / scheduler state (``global_step*/`` under DeepSpeed) -- never
``model.safetensors`` or ``pytorch_model.bin``. ``checkpoint-N`` is itself a delta checkpoint for
``AutoDeltaModel.from_finetuned``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from deltadist.api.delta_base import DeltaBase
from deltadist.errors import ConfigError
from deltadist.io import checkpoint

SCHEDULER_NAME = "scheduler.pt"
"""``Trainer``'s file name for the learning-rate scheduler's state."""


class DeltaTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints and ``save_model`` hold only ``delta``.

    Args:
        model: the model to train, with ``delta`` attached to it or to a module inside it
            (default: ``delta.backbone_model``).
        *args, **kwargs: everything else ``transformers.Trainer`` takes.
        delta: the delta (``LoraModel(...)``, ``AutoDeltaModel.from_config(...)``), attached and
            frozen around (``delta.freeze_module()``) before the Trainer is built.

    Raises:
        ConfigError: ``delta`` is not attached inside ``model``, or ``model`` has trainable
            parameters that the delta does not save (they would be trained and then lost).
    """

    def __init__(self, model: nn.Module | None = None, *args: Any, delta: DeltaBase, **kwargs: Any) -> None:
        if model is None:
            model = delta.backbone_model
        if not any(m is delta.backbone_model for m in model.modules()):
            raise ConfigError(
                "DeltaTrainer: delta is attached to another model than the one to train; pass the "
                "model the delta was built on (or a model that contains it)."
            )
        saved = {id(p) for p in delta.parameters()}
        unsaved = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved]
        if unsaved:
            shown = ", ".join(unsaved[:10]) + (f", ... {len(unsaved) - 10} more" if len(unsaved) > 10 else "")
            raise ConfigError(
                f"DeltaTrainer: these parameters are trainable but not part of the delta, so they "
                f"would be trained and then missing from every checkpoint: {shown}. Call "
                "delta.freeze_module() first, or name their modules in the delta's unfrozen_modules "
                "(e.g. unfrozen_modules=['deltas', 'classifier'])."
            )
        self.delta = delta
        super().__init__(model, *args, **kwargs)

    # -- saving ----------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the delta (``delta.save_finetuned``) and the tokenizer / processor to ``output_dir``.

        Call it on every rank, like ``Trainer.save_model``: the delta's tensors are gathered from
        every rank (never the backbone) and the main rank writes.
        """
        output_dir = self.args.output_dir if output_dir is None else output_dir
        self.delta.save_finetuned(output_dir)
        if self.args.should_save:
            processor = self.processing_class
            if processor is None:
                processor = getattr(self.data_collator, "tokenizer", None)
            if processor is not None:
                processor.save_pretrained(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # As Trainer, but without the frozen backbone's pieces in the engine checkpoint.
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    # -- loading ---------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not _is_delta_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_delta(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not _is_delta_checkpoint(best):
            return super()._load_best_model()
        self._load_delta(best)

    def _load_delta(self, directory: str) -> None:
        """Load the delta saved in ``directory`` into ``self.delta`` (every rank calls this)."""
        self.delta.load_finetuned(directory)  # checks the backbone fingerprint, scatters


def _is_delta_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / checkpoint.WEIGHTS_NAME).is_file()


__all__ = ["DeltaTrainer"]
