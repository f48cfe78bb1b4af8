"""One optimizer step of ``deltadist train``: the model wrapped under the engine, AdamW over the
delta's parameters, the learning-rate schedule and (fp16) the gradient scaler; a step's forwards
and backwards over its micro-batches (gradient accumulation), clipping and the update."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltadist.api.delta_base import DeltaBase
from deltadist.engines.runtime import EngineSetup
from deltadist.training.batching import Collator, MicroBatch, StepPlan, micro_batches
from deltadist.training.config import TrainingConfig
from deltadist.training.objectives import summed_loss
from deltadist.training.schedule import lr_schedule
from deltadist.training.text_data import TokenizedExample


@dataclass
class StepRunner:
    """The wrapped model and its optimizer, ready to take steps (see :func:`prepare_steps`)."""

    engine: EngineSetup
    task: str
    dtype: torch.dtype
    """The backbone's dtype."""
    collate: Collator
    accumulation: int
    """Forwards per optimizer step on each rank."""
    max_grad_norm: float | None
    runner: nn.Module
    """The model as the engine wrapped (and prepared) it: what the forwards call."""
    stepper: Any
    """What takes the optimizer step: the optimizer, or DeepSpeed's engine."""
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    """fp16 backbones only."""
    params: list[nn.Parameter]
    """The delta's parameters, as the optimizer took them (what clipping clips)."""

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        """Half-precision backbones compute under autocast, so the float32 delta and head mix in."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.engine.device.type, dtype=self.dtype)

    def forward(self, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss and the number of correct predictions of one micro-batch."""
        inputs = {k: v.to(self.engine.device) for k, v in micro.inputs.items()}
        with self._autocast():
            return summed_loss(self.task, self.runner, inputs)

    def train_step(self, batch: list[TokenizedExample]) -> tuple[float, int]:
        """One optimizer step on the global ``batch``; returns its mean loss and real tokens (all ranks)."""
        engine = self.engine
        self.runner.train()
        self.stepper.zero_grad(set_to_none=True)
        micros = micro_batches(batch, self.task, self.collate, engine.rank, engine.world_size,
                               self.accumulation)
        summed = torch.zeros((), device=engine.device)
        for index, micro in enumerate(micros):
            with engine.gradient_sync(self.runner, index == len(micros) - 1):
                loss_sum, _ = self.forward(micro)
                loss = loss_sum * micro.loss_scale
                engine.backward(self.scaler.scale(loss) if self.scaler else loss, self.stepper)
            summed += loss.detach()
        if self.max_grad_norm is not None:
            if self.scaler:
                self.scaler.unscale_(self.stepper)
            engine.clip_grad_norm(self.runner, self.params, self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.stepper)
            self.scaler.update()
        else:
            self.stepper.step()
        self.scheduler.step()
        tokens = torch.tensor(float(sum(m.tokens for m in micros)), device=engine.device)
        totals = engine.sum_over_ranks(torch.stack([summed, tokens]))
        return float(totals[0]) / engine.world_size, int(totals[1])


def prepare_steps(engine: EngineSetup, model: nn.Module, delta: DeltaBase, training: TrainingConfig,
                  plan: StepPlan, task: str, dtype: torch.dtype, collate: Collator) -> StepRunner:
    """Move ``model`` to the engine's device and wrap it; AdamW over ``delta``'s parameters with the
    configured schedule, prepared with the engine (DeepSpeed: ``deepspeed.initialize``)."""
    model.to(engine.device)
    runner = engine.wrap(model)
    # The optimizer takes the parameters right after wrapping, before any forward: FSDP2 leaves
    # the root module's parameters unsharded after a forward, and they would be listed instead.
    params = list(delta.parameters())
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(training.scheduler, training.warmup_steps, plan.total_steps))
    runner, stepper = engine.prepare(runner, optimizer)  # DeepSpeed: deepspeed.initialize
    scaler = torch.amp.GradScaler(engine.device.type) if dtype == torch.float16 else None
    return StepRunner(engine=engine, task=task, dtype=dtype, collate=collate, accumulation=plan.accumulation,
                      max_grad_norm=training.max_grad_norm, runner=runner, stepper=stepper,
                      scheduler=scheduler, scaler=scaler, params=params)
