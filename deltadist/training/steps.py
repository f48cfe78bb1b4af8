"""One optimizer step of ``deltadist train``: the model wrapped under the engine, AdamW over the
delta's parameters, the learning-rate schedule and (fp16) the gradient scaler; a step's forwards
and backwards over its micro-batches (gradient accumulation), clipping and the update."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltadist.api.delta_base import DeltaBase
from deltadist.engines.runtime import EngineSetup
from deltadist.errors import TrainingError
from deltadist.training import run_state
from deltadist.training.batching import Collator, MicroBatch, StepPlan, loss_units, micro_batches
from deltadist.training.config import MAX_NONFINITE_SKIPS, TrainingConfig
from deltadist.training.objectives import summed_loss
from deltadist.training.schedule import lr_schedule
from deltadist.training.text_data import TokenizedExample


def autocast_for(dtype: torch.dtype, device_type: str) -> contextlib.AbstractContextManager[None]:
    """Half-precision backbones compute under autocast, so the float32 delta and head mix in; an
    fp32 one runs as it is."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


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
    own_rows: bool = False
    """Each rank's batch is its own rows of the global batch, not all of it (``data.streaming``)."""

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """See :func:`autocast_for`."""
        return autocast_for(self.dtype, self.engine.device.type)

    def forward(self, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss and the predicted classes (classification) of one micro-batch."""
        inputs = {k: v.to(self.engine.device) for k, v in micro.inputs.items()}
        with self.autocast():
            return summed_loss(self.task, self.runner, inputs)

    @torch.no_grad()
    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's float32 logits ``[rows, seq, vocab]`` for ``inputs``, in eval mode."""
        self.runner.eval()
        with self.autocast():
            output = self.runner(**{k: v.to(self.engine.device) for k, v in inputs.items()})
        return getattr(output, "logits", output).float()

    def train_step(self, batch: list[TokenizedExample]) -> StepOutcome:
        """One optimizer step on the global ``batch`` (with :attr:`own_rows`: this rank's rows of
        it): its mean loss and real tokens (all ranks).

        A step whose loss or gradient norm is not finite is not taken (unless the engine steps
        inside its backward): the gradients are dropped, the optimizer and the scheduler keep their
        state, and the outcome says so (``finite``); every rank sees the same sums, so all agree.
        """
        engine = self.engine
        self.runner.train()
        self.stepper.zero_grad(set_to_none=True)
        units = None
        if self.own_rows:  # the global batch's loss units: what the mean loss averages over
            own = float(sum(loss_units(self.task, example) for example in batch))
            units = int(engine.sum_over_ranks(torch.tensor(own, device=engine.device)))
        micros = micro_batches(batch, self.task, self.collate, engine.rank, engine.world_size,
                               self.accumulation, units)
        summed = torch.zeros((), device=engine.device)
        for index, micro in enumerate(micros):
            with engine.gradient_sync(self.runner, index == len(micros) - 1):
                loss_sum, _ = self.forward(micro)
                loss = loss_sum * micro.loss_scale
                engine.backward(self.scaler.scale(loss) if self.scaler else loss, self.stepper)
            summed += loss.detach()
        tokens = torch.tensor(float(sum(m.tokens for m in micros)), device=engine.device)
        totals = engine.sum_over_ranks(torch.stack([summed, tokens]))
        mean_loss, real_tokens = float(totals[0]) / engine.world_size, int(totals[1])
        grad_norm = self._grad_norm()
        finite = math.isfinite(mean_loss) and (grad_norm is None or math.isfinite(grad_norm))
        if not finite and not engine.steps_in_backward:
            self.stepper.zero_grad(set_to_none=True)
            return StepOutcome(mean_loss, real_tokens, grad_norm, finite=False)
        if self.scaler:
            self.scaler.step(self.stepper)
            self.scaler.update()
        else:
            self.stepper.step()
        self.scheduler.step()
        return StepOutcome(mean_loss, real_tokens, grad_norm, finite)

    def _grad_norm(self) -> float | None:
        """The gradients' global norm, clipped to ``max_grad_norm`` when it is set; ``None`` where
        it is not this loop's to check: under a gradient scaler (fp16), which skips steps that
        overflow itself, and under an engine that steps inside its backward (DeepSpeed).

        Without clipping the norm is the engine's clipping to infinity: every gradient is
        multiplied by exactly 1, so the step is the unclipped one bit for bit.
        """
        if self.engine.steps_in_backward or (self.scaler and self.max_grad_norm is None):
            return None
        if self.scaler:
            self.scaler.unscale_(self.stepper)
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else math.inf
        norm = self.engine.clip_grad_norm(self.runner, self.params, max_norm)
        if self.scaler:
            return None
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)


@dataclass(frozen=True)
class StepOutcome:
    """What one call of :meth:`StepRunner.train_step` did."""

    loss: float
    """The global batch's mean loss."""
    tokens: int
    """Real (unpadded) input tokens of the batch, over all ranks."""
    grad_norm: float | None
    """The gradients' global norm before clipping; ``None`` where it was not checked."""
    finite: bool
    """Whether the loss and the gradient norm were finite (else the step was not taken, except
    under an engine that steps inside its backward)."""


def prepare_steps(engine: EngineSetup, model: nn.Module, delta: DeltaBase, training: TrainingConfig,
                  plan: StepPlan, task: str, dtype: torch.dtype, collate: Collator,
                  own_rows: bool = False) -> StepRunner:
    """Move ``model`` to the engine's device and wrap it; AdamW over ``delta``'s parameters with the
    configured schedule, prepared with the engine (DeepSpeed: ``deepspeed.initialize``)."""
    model.to(engine.device)
    runner = engine.wrap(model)
    # The optimizer takes the parameters right after wrapping, before any forward: FSDP2 leaves
    # the root module's parameters unsharded after a forward, and they would be listed instead.
    groups = delta.param_groups(training.lr, training.loraplus_lr_ratio)
    params = [param for group in groups for param in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=training.lr, weight_decay=training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(training.scheduler, training.warmup_steps, plan.total_steps))
    runner, stepper = engine.prepare(runner, optimizer)  # DeepSpeed: deepspeed.initialize
    scaler = torch.amp.GradScaler(engine.device.type) if dtype == torch.float16 else None
    return StepRunner(engine=engine, task=task, dtype=dtype, collate=collate, accumulation=plan.accumulation,
                      max_grad_norm=training.max_grad_norm, runner=runner, stepper=stepper,
                      scheduler=scheduler, scaler=scaler, params=params, own_rows=own_rows)


class NonFiniteSteps:
    """What the job does with a step whose loss or gradient norm is not finite: stop, or (with
    ``training.skip_nonfinite_steps``) skip it, until :data:`MAX_NONFINITE_SKIPS` come in a row."""

    def __init__(self, skip: bool, output_dir: str | Path, is_main: bool) -> None:
        self.skip, self.output_dir, self.is_main = skip, Path(output_dir), is_main
        self.in_a_row = 0

    def check(self, step: int, outcome: StepOutcome) -> bool:
        """Whether step ``step`` (1-based) was skipped; raises when the job must stop.

        Raises:
            TrainingError: naming the step, its loss and gradient norm, and the newest checkpoint.
        """
        if outcome.finite:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        what = f"step {step}: the loss is {outcome.loss}" + (
            f" and the gradient norm {outcome.grad_norm}" if outcome.grad_norm is not None else "")
        if self.skip and self.in_a_row < MAX_NONFINITE_SKIPS:
            if self.is_main:
                warnings.warn(f"training {what}; skipped it (training.skip_nonfinite_steps: the gradients "
                              "were dropped, the optimizer and the scheduler did not step).", stacklevel=2)
            return True
        found = run_state.checkpoints(self.output_dir)
        kept = (f"the newest checkpoint, {found[-1][1]}, is from before it" if found
                else "no checkpoint was written")
        if self.skip:
            what += f" ({MAX_NONFINITE_SKIPS} non-finite steps in a row)"
            fix = "lower training.lr or set training.max_grad_norm"
        else:
            fix = ("lower training.lr, set training.max_grad_norm, or set training.skip_nonfinite_steps: "
                   "true to skip such steps")
        raise TrainingError(f"training {what} (not finite): the job stops, and no final delta is written; "
                            f"{kept}. Check the data and the config: {fix}.")

