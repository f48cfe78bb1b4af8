"""The training job: load, attach the delta, train with AdamW under the engine, checkpoint, save.

Everything that can be wrong with the config, the data or the model is found before the first
step. Under a distributed engine every rank runs :func:`train`: each takes its share of every
global batch and of the evaluation set, and every rank takes part in saving; only the main rank
shows progress and writes ``metrics.jsonl``, ``metrics.json`` and the checkpoint's run state.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from deltadist.api.auto import AutoDeltaConfig, AutoDeltaModel
from deltadist.api.delta_base import DeltaBase
from deltadist.engines import engine_class, setup_engine
from deltadist.engines.batch_split import split_batch
from deltadist.engines.optimizer_state import local_piece, rewrap_pieces
from deltadist.engines.runtime import EngineSetup
from deltadist.errors import ConfigError
from deltadist.training import run_state
from deltadist.training.batching import (
    Collator, MicroBatch, StepPlan, epoch_order, global_batches, loss_units, micro_batches, plan_steps,
)
from deltadist.training.config import TrainConfig, to_dict
from deltadist.training.job_data import JobData, load_rows, tokenize
from deltadist.training.model import LoadedModel, load_model, resolve_dtype
from deltadist.training.objectives import summed_loss
from deltadist.training.schedule import lr_schedule
from deltadist.training.text_data import TokenizedExample

METRICS_NAME = "metrics.json"
LOG_NAME = "metrics.jsonl"
DELTA_DIRNAME = "delta"


@dataclass(frozen=True)
class Metrics:
    """What ``metrics.json`` holds: the run's summary."""

    task: str
    steps: int
    tokens: int
    """Real (unpadded) input tokens trained on, over all ranks."""
    train_seconds: float
    """Time in training steps in this process (since the resume, after one)."""
    total_seconds: float
    tokens_per_second: float
    eval_loss_before: float | None
    eval_loss: float | None
    """Mean loss per target token (per row for classification) on the evaluation rows."""
    accuracy_before: float | None
    accuracy_after: float | None
    """sequence_classification only."""
    delta_bytes: int
    """Size of the saved delta directory (weights and config)."""
    delta_path: str
    trainable_params: int
    total_params: int
    device: str
    """This rank's device (rank 0's in a distributed run)."""
    engine: str = "plain"
    world_size: int = 1
    resumed_from: int | None = None
    """The checkpoint step this run resumed from."""


@dataclass
class TrainResult:
    """The trained model, its delta, and the job's metrics."""

    model: nn.Module
    delta: DeltaBase
    metrics: Metrics | None
    """``None`` on ranks other than the main one."""
    metrics_path: Path | None


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float | None


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Run the job ``cfg`` describes; write ``output_dir/delta/``, ``metrics.json(l)`` and, every
    ``training.save_every`` steps, ``output_dir/checkpoints/step-N/``.

    ``resume`` continues from the newest complete checkpoint in ``output_dir`` (a fresh start,
    said on stderr, when there is none); the run then ends as the uninterrupted one would.
    """
    job_start = time.perf_counter()
    t = cfg.training
    engine = setup_engine(cfg.engine, deepspeed_config=cfg.deepspeed_config, batch_size=t.batch_size,
                          micro_batch_size=t.micro_batch_size, accumulation=t.gradient_accumulation_steps,
                          max_grad_norm=t.max_grad_norm)
    try:
        return _Job(cfg, engine, resume).run(job_start)
    finally:
        engine.close()


class _Job:
    """One run of :func:`train`: set up in ``__init__`` (every check), then :meth:`run`."""

    def __init__(self, cfg: TrainConfig, engine: EngineSetup, resume: bool) -> None:
        self.cfg, self.engine = cfg, engine
        t = cfg.training
        # The cheap checks first: nothing is loaded for a batch that does not split over the ranks.
        split_batch(t.batch_size, t.micro_batch_size, t.gradient_accumulation_steps, engine.world_size)
        self.dtype = _job_dtype(cfg, engine)
        self.resume_from = self._checkpoint_to_resume(resume)
        rows = load_rows(cfg)
        loaded = load_model(cfg.model, cfg.task, rows.labels, t.seed, self.dtype, engine.is_main)
        self.data: JobData = tokenize(rows, cfg, loaded.tokenizer)
        self.plan: StepPlan = plan_steps(t.batch_size, t.micro_batch_size, t.gradient_accumulation_steps,
                                         engine.world_size, len(self.data.train), t.epochs, t.max_steps)
        if self.plan.accumulation > 1 and not engine.accumulates:
            raise ConfigError(f"engine: {engine.name} takes one forward per step here; set "
                              "training.gradient_accumulation_steps: 1 and micro_batch_size: null.")
        self.model = loaded.model
        self.delta = self._attach(loaded)
        self.collate = Collator(cfg.task, loaded.tokenizer.pad_token_id,
                                getattr(self.model.config, "decoder_start_token_id", None)
                                if cfg.task == "seq2seq" else None)
        self.lengths = [len(e.input_ids) for e in self.data.train]

    def _checkpoint_to_resume(self, resume: bool) -> tuple[int, Path, dict[str, Any]] | None:
        """``(step, directory, its run state)`` of the checkpoint to resume from, if any."""
        found = run_state.checkpoints(self.cfg.output_dir)
        if not resume:
            if found:
                raise ConfigError(
                    f"output_dir {self.cfg.output_dir} holds checkpoints of an earlier run (the newest "
                    f"after step {found[-1][0]}): pass --resume to continue it, or choose a new output_dir.")
            return None
        if not found:
            if self.engine.is_main:
                print(f"deltadist train: --resume: no checkpoint in {self.cfg.output_dir}; starting from "
                      "step 0.", file=sys.stderr)
            return None
        step, directory = found[-1]
        saved = run_state.read_run_state(directory)
        run_state.check_same_job(saved["config"], to_dict(self.cfg), directory)
        if (saved["engine"], saved["world_size"]) != (self.engine.name, self.engine.world_size):
            raise ConfigError(
                f"--resume: {directory} was written by engine {saved['engine']} on {saved['world_size']} "
                f"rank(s); this run is {self.engine.name} on {self.engine.world_size}. Each rank's "
                "optimizer state is its own shard: resume with the same engine and number of ranks.")
        return step, directory, saved

    def _attach(self, loaded: LoadedModel) -> DeltaBase:
        """The delta on the backbone, frozen; modules the checkpoint lacked train with it."""
        settings = dict(self.cfg.delta)
        unfrozen = list(settings.get("unfrozen_modules") or ["deltas"])
        settings["unfrozen_modules"] = unfrozen + [m for m in loaded.new_modules if m not in unfrozen]
        delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(settings), backbone_model=loaded.model)
        delta.freeze_module()
        if self.engine.is_main:
            delta.log(visualization=False)
        return delta

    # -- the run ------------------------------------------------------------------------------------

    def run(self, job_start: float) -> TrainResult:
        cfg, engine, t = self.cfg, self.engine, self.cfg.training
        # Counted before wrapping: sharding engines leave only a piece of each parameter on a rank.
        trainable = sum(p.numel() for p in self.delta.parameters())
        total_params = sum(p.numel() for p in self.model.parameters())
        if engine.world_size > 1:
            # Every rank built the same model and delta from training.seed; from here on (dropout)
            # each rank draws its own random numbers, as different rows deserve different masks.
            torch.manual_seed(t.seed + engine.rank)
        self.model.to(engine.device)
        runner = engine.wrap(self.model)
        # The optimizer takes the parameters right after wrapping, before any forward: FSDP2 leaves
        # the root module's parameters unsharded after a forward, and they would be listed instead.
        params = list(self.delta.parameters())
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_schedule(t.scheduler, t.warmup_steps, self.plan.total_steps))
        runner, stepper = engine.prepare(runner, optimizer)  # DeepSpeed: deepspeed.initialize
        scaler = torch.amp.GradScaler(engine.device.type) if self.dtype == torch.float16 else None
        self.runner, self.stepper, self.scheduler, self.scaler, self.params = (
            runner, stepper, scheduler, scaler, params)

        output_dir = Path(cfg.output_dir)
        log = _MetricsLog(output_dir / LOG_NAME, engine.is_main)
        step, tokens, before = 0, 0, None
        if self.resume_from is not None:
            step, tokens, before = self._restore(*self.resume_from)
            log.truncate_after(step)
        else:
            log.truncate_after(-1)  # the log of an earlier run (that left no checkpoint) goes
            if self.data.eval is not None:
                before = self.evaluate("eval (before)")
                log.write({"step": 0, **_eval_row(before)})

        train_start = time.perf_counter()
        tokens_at_start = tokens
        with tqdm(total=self.plan.total_steps, initial=step, desc="train", unit="step",
                  disable=not engine.is_main) as bar:
            since, tokens_since = time.perf_counter(), 0
            for batch in self._batches(step):
                loss, step_tokens = self.train_step(batch)
                step += 1
                tokens += step_tokens
                tokens_since += step_tokens
                elapsed = time.perf_counter() - since
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_since / max(elapsed, 1e-9):,.0f}")
                if step % t.log_every == 0 or step == self.plan.total_steps:
                    log.write({"step": step, "epoch": round(step / self.plan.steps_per_epoch, 4),
                               "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                               "tokens": tokens, "tokens_per_s": round(tokens_since / max(elapsed, 1e-9), 1)})
                    since, tokens_since = time.perf_counter(), 0
                evaluating = t.eval_every and step % t.eval_every == 0 and step < self.plan.total_steps
                if evaluating and self.data.eval is not None:
                    log.write({"step": step, **_eval_row(self.evaluate(f"eval (step {step})"))})
                if t.save_every and step % t.save_every == 0:
                    self._save_checkpoint(step, tokens, before)
        train_seconds = time.perf_counter() - train_start

        after = self.evaluate("eval (after)") if self.data.eval is not None else None
        if after is not None:
            log.write({"step": step, **_eval_row(after)})
        delta_dir = Path(self.delta.save_finetuned(output_dir / DELTA_DIRNAME))  # every rank: it gathers
        if not engine.is_main:
            return TrainResult(self.model, self.delta, None, None)
        metrics = Metrics(
            task=cfg.task, steps=step, tokens=tokens,
            train_seconds=round(train_seconds, 3),
            total_seconds=round(time.perf_counter() - job_start, 3),
            tokens_per_second=round((tokens - tokens_at_start) / max(train_seconds, 1e-9), 1),
            eval_loss_before=before.loss if before else None, eval_loss=after.loss if after else None,
            accuracy_before=before.accuracy if before else None,
            accuracy_after=after.accuracy if after else None,
            delta_bytes=sum(f.stat().st_size for f in delta_dir.iterdir() if f.is_file()),
            delta_path=str(delta_dir), trainable_params=trainable, total_params=total_params,
            device=str(engine.device), engine=engine.name, world_size=engine.world_size,
            resumed_from=self.resume_from[0] if self.resume_from else None,
        )
        metrics_path = output_dir / METRICS_NAME
        metrics_path.write_text(json.dumps(asdict(metrics), indent=2) + "\n")
        return TrainResult(self.model, self.delta, metrics, metrics_path)

    def _batches(self, done: int) -> Iterator[list[TokenizedExample]]:
        """The global batches of steps ``done + 1 ...`` up to the plan's total, epoch after epoch."""
        t, plan = self.cfg.training, self.plan
        step = done
        epoch, skip = divmod(done, plan.steps_per_epoch)
        while step < plan.total_steps:
            order = epoch_order(self.lengths, t.seed, epoch, plan.batch_size, self.cfg.data.sort_by_length)
            for index, batch in enumerate(global_batches(self.data.train, order, plan.batch_size)):
                if index < skip:
                    continue
                yield batch
                step += 1
                if step == plan.total_steps:
                    return
            epoch, skip = epoch + 1, 0

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        """Half-precision backbones compute under autocast, so the float32 delta and head mix in."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.engine.device.type, dtype=self.dtype)

    def _forward(self, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v.to(self.engine.device) for k, v in micro.inputs.items()}
        with self._autocast():
            return summed_loss(self.cfg.task, self.runner, inputs)

    def train_step(self, batch: list[TokenizedExample]) -> tuple[float, int]:
        """One optimizer step on the global ``batch``; returns its mean loss and real tokens (all ranks)."""
        engine, t = self.engine, self.cfg.training
        self.runner.train()
        self.stepper.zero_grad(set_to_none=True)
        micros = micro_batches(batch, self.cfg.task, self.collate, engine.rank, engine.world_size,
                               self.plan.accumulation)
        summed = torch.zeros((), device=engine.device)
        for index, micro in enumerate(micros):
            with engine.gradient_sync(self.runner, index == len(micros) - 1):
                loss_sum, _ = self._forward(micro)
                loss = loss_sum * micro.loss_scale
                engine.backward(self.scaler.scale(loss) if self.scaler else loss, self.stepper)
            summed += loss.detach()
        if t.max_grad_norm is not None:
            if self.scaler:
                self.scaler.unscale_(self.stepper)
            engine.clip_grad_norm(self.runner, self.params, t.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.stepper)
            self.scaler.update()
        else:
            self.stepper.step()
        self.scheduler.step()
        tokens = torch.tensor(float(sum(m.tokens for m in micros)), device=engine.device)
        totals = engine.sum_over_ranks(torch.stack([summed, tokens]))
        return float(totals[0]) / engine.world_size, int(totals[1])

    @torch.no_grad()
    def evaluate(self, desc: str) -> Evaluation:
        """Mean loss (and accuracy) over the evaluation rows, each rank taking its share of a batch."""
        engine, task, examples = self.engine, self.cfg.task, self.data.eval
        self.runner.eval()
        sums = torch.zeros(2, device=engine.device)
        batches = list(global_batches(examples, range(len(examples)), self.cfg.training.eval_batch_size))
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not engine.is_main):
            micro, = micro_batches(batch, task, self.collate, engine.rank, engine.world_size, 1)
            loss_sum, correct = self._forward(micro)
            sums += torch.stack([loss_sum, correct.float()]) * float(micro.loss_scale > 0)
        loss_total, correct_total = engine.sum_over_ranks(sums).tolist()
        units = sum(loss_units(task, e) for e in examples)
        if not units:
            raise ConfigError("data.eval: no evaluation row has a target token left after truncation; "
                              "raise model.max_length.")
        accuracy = correct_total / len(examples) if task == "sequence_classification" else None
        return Evaluation(loss_total / units, accuracy)

    # -- checkpoints ----------------------------------------------------------------------------------

    def _save_checkpoint(self, step: int, tokens: int, before: Evaluation | None) -> None:
        """Every rank: the delta (gathered) and this rank's state into the partial directory; then
        the main rank commits it."""
        engine, output_dir = self.engine, self.cfg.output_dir
        if engine.is_main:
            run_state.begin(output_dir, step)
        engine.barrier()
        partial = run_state.partial_dir(output_dir, step)
        self.delta.save_finetuned(partial / run_state.DELTA_DIRNAME)
        state = run_state.RankState(
            optimizer=self.stepper.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else None,
            rng=run_state.capture_rng(engine.device))
        run_state.write_rank_state(partial, engine.rank, engine.world_size, state, local_piece)
        engine.barrier()
        if engine.is_main:
            run_state.commit(partial, {
                "format_version": run_state.FORMAT_VERSION, "step": step, "tokens": tokens,
                "engine": engine.name, "world_size": engine.world_size, "config": to_dict(self.cfg),
                "eval_before": asdict(before) if before else None,
            }, self.cfg.training.keep_last)
        engine.barrier()

    def _restore(self, step: int, directory: Path, saved: dict[str, Any]
                 ) -> tuple[int, int, Evaluation | None]:
        """Load the checkpoint at ``directory`` (run state ``saved``) into the delta, optimizer,
        scheduler and RNG."""
        engine = self.engine
        self.delta.load_finetuned(directory / run_state.DELTA_DIRNAME)
        state = run_state.read_rank_state(directory, engine.rank, engine.world_size)
        optimizer_state = state.optimizer
        if isinstance(self.stepper, torch.optim.Optimizer):
            optimizer_state = rewrap_pieces(self.stepper, optimizer_state)
        self.stepper.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        run_state.restore_rng(state.rng, engine.device)
        before = saved.get("eval_before")
        if engine.is_main:
            print(f"deltadist train: resumed from {directory} (step {step} of {self.plan.total_steps}).",
                  file=sys.stderr)
        return step, saved["tokens"], Evaluation(**before) if before else None


def _job_dtype(cfg: TrainConfig, engine: EngineSetup) -> torch.dtype:
    """The backbone's dtype for ``model.dtype`` on this engine's device (float32 where the engine
    cannot train a half-precision backbone here: ``auto`` gives float32 there)."""
    problem = engine_class(engine.name).half_precision_problem
    if problem is not None:
        if cfg.model.dtype not in ("auto", "fp32"):
            raise ConfigError(f"model.dtype: {cfg.model.dtype} does not work with engine {engine.name} "
                              f"({problem}); set model.dtype: fp32 (or auto).")
        return torch.float32
    return resolve_dtype(cfg.model.dtype, engine.device)


def _eval_row(evaluation: Evaluation) -> dict[str, Any]:
    row: dict[str, Any] = {"eval_loss": evaluation.loss}
    if evaluation.accuracy is not None:
        row["eval_accuracy"] = evaluation.accuracy
    return row


class _MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed (main rank only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
