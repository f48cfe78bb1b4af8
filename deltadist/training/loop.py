"""The training job: load, attach the delta, train with AdamW under the engine, checkpoint, save.

Everything that can be wrong with the config, the data or the model is found before the first
step. Under a distributed engine every rank runs :func:`train`: each takes its share of every
global batch and of the evaluation set, and every rank takes part in saving; only the main rank
shows progress and writes ``metrics.jsonl``, ``metrics.json`` and the checkpoint's run state.

This module holds the job's sequence; an optimizer step is :mod:`~deltadist.training.steps`',
evaluating :mod:`~deltadist.training.evaluation`'s, checkpoints and resuming
:mod:`~deltadist.training.checkpointing`'s, the metrics files :mod:`~deltadist.training.metrics`'.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from deltadist.api.auto import AutoDeltaConfig, AutoDeltaModel
from deltadist.api.delta_base import DeltaBase
from deltadist.api.ownership import default_unfrozen
from deltadist.engines import ENGINES, engine_class, setup_engine
from deltadist.engines.batch_split import split_batch
from deltadist.engines.runtime import EngineSetup
from deltadist.errors import ConfigError
from deltadist.training.batching import Collator, StepPlan, batches_after, plan_steps
from deltadist.training.best import BEST_DIRNAME, BestTracker
from deltadist.training.checkpointing import checkpoint_to_resume, restore_checkpoint, save_checkpoint
from deltadist.training.checks import check_engine_limits, check_writable, warn_if_warmup_outlasts
from deltadist.training.config import TrainConfig, from_dict, to_dict
from deltadist.training.config_files import write_run_config
from deltadist.training.data_identity import check_same_data, job_data_identity
from deltadist.training.evaluation import Evaluation, evaluate
from deltadist.training.generation_eval import check_generation_rows, generation_score
from deltadist.training.job_data import JobData, load_rows, tokenize
from deltadist.training.metrics import (
    LOG_NAME,
    METRICS_NAME,
    Metrics,
    MetricsLog,
    peak_memory_bytes,
    run_info,
)
from deltadist.training.model import LoadedModel, load_model, resolve_dtype
from deltadist.training.packing import check_isolation, uses_varlen
from deltadist.training.reporters import Reporters
from deltadist.training.steps import NonFiniteSteps, prepare_steps
from deltadist.training.streaming import RowStream, streamed_examples

DELTA_DIRNAME = "delta"


@dataclass
class TrainResult:
    """The trained model, its delta, and the job's metrics."""

    model: nn.Module
    delta: DeltaBase
    metrics: Metrics | None
    """``None`` on ranks other than the main one."""
    metrics_path: Path | None


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Run the job ``cfg`` describes; write ``output_dir/delta/``, ``metrics.json(l)`` and, every
    ``training.save_every`` steps, ``output_dir/checkpoints/step-N/``.

    ``resume`` continues from the newest complete checkpoint in ``output_dir`` (a fresh start,
    said on stderr, when there is none); the run then ends as the uninterrupted one would.
    """
    job_start = time.perf_counter()
    engine = setup_engine(cfg.engine, **engine_options(cfg))
    try:
        return _Job(cfg, engine, resume).run(job_start)
    finally:
        engine.close()


def evaluate_run(cfg: TrainConfig, delta_dir: str | os.PathLike, rows: str) -> Evaluation:
    """The metrics the job ``cfg`` reports (``training.eval_generation``'s too) on the rows at
    ``rows``, for its trained delta in ``delta_dir``: one process, nothing written."""
    raw = to_dict(cfg)
    raw["data"].update(train=rows, eval=rows, streaming=False, shuffle_buffer=0, packing=False,
                       sort_by_length=False)
    engine = setup_engine(next(iter(ENGINES)))  # one process
    # An empty output_dir: the run's own holds its checkpoints, which a fresh job would refuse.
    with tempfile.TemporaryDirectory() as scratch:
        raw.update(engine=engine.name, output_dir=scratch)
        try:
            return _Job(from_dict(raw), engine, False, trained=Path(delta_dir)).evaluate_now()
        finally:
            engine.close()


def engine_options(cfg: TrainConfig) -> dict[str, Any]:
    """The job's settings an engine's :meth:`~deltadist.engines.Engine.launch` takes."""
    t = cfg.training
    return {"deepspeed_config": cfg.deepspeed_config, "batch_size": t.batch_size,
            "micro_batch_size": t.micro_batch_size, "accumulation": t.gradient_accumulation_steps,
            "max_grad_norm": t.max_grad_norm}


class _Job:
    """One run of :func:`train`: set up in ``__init__`` (every check), then :meth:`run`."""

    def __init__(self, cfg: TrainConfig, engine: EngineSetup, resume: bool,
                 trained: Path | None = None) -> None:
        self.cfg, self.engine = cfg, engine
        t = cfg.training
        # The cheap checks first: nothing is loaded for a batch that does not split over the ranks.
        split_batch(t.batch_size, t.micro_batch_size, t.gradient_accumulation_steps, engine.world_size)
        check_engine_limits(engine.name, engine.accumulates, engine.steps_in_backward, t.skip_nonfinite_steps)
        self.dtype = job_dtype(cfg, engine.name, engine.device)
        self.resume_from = checkpoint_to_resume(cfg, engine, resume)
        check_writable(cfg.output_dir)
        rows = load_rows(cfg)  # every row checked: before the weights load
        if t.eval_generation is not None:
            for part in rows.eval or ():
                check_generation_rows(part.dataset, part.chat is not None, part.shown)
        self.stream = None  # data.streaming: this rank's rows are read as the run goes
        if cfg.data.streaming:
            self.stream = RowStream.of_job(cfg, engine.rank, engine.world_size)
            self.stream.check_first(cfg.task, rows.labels)  # the first step's rows, as far as can be
        loaded = load_model(cfg.model, cfg.task, rows.labels, t.seed, self.dtype, engine.is_main)
        self.data: JobData = tokenize(rows, cfg, loaded.tokenizer)
        if self.resume_from is not None:  # the steps after the checkpoint are drawn from the same data
            check_same_data(self.resume_from.saved.get("data"), self.data_id, self.resume_from.directory)
        self.plan: StepPlan = plan_steps(t.batch_size, t.micro_batch_size, t.gradient_accumulation_steps,
                                         engine.world_size, streamed_examples(cfg) or len(self.data.train),
                                         t.epochs, t.max_steps)
        check_engine_limits(engine.name, engine.accumulates, engine.steps_in_backward, t.skip_nonfinite_steps,
                            self.plan.accumulation)
        if engine.is_main:
            warn_if_warmup_outlasts(t.warmup_steps, self.plan.total_steps)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        # ``trained``: the delta a run saved, loaded to evaluate it (:func:`evaluate_run`)
        self.delta = self._attach(loaded) if trained is None else \
            AutoDeltaModel.from_finetuned(trained, backbone_model=loaded.model)
        # (the built-in MiniLM classifier has no transformers config: it is never packed)
        varlen = uses_varlen(getattr(getattr(self.model, "config", None), "_attn_implementation", None))
        self.collate = Collator(cfg.task, loaded.tokenizer.pad_token_id,
                                getattr(self.model.config, "decoder_start_token_id", None)
                                if cfg.task == "seq2seq" else None, None if varlen else self.dtype)
        self.lengths = [len(e.input_ids) for e in self.data.train]

    @functools.cached_property
    def data_id(self) -> dict[str, Any]:
        """The training data's identity, which checkpoints record and ``--resume`` compares (hashed
        only by a job that resumes or saves checkpoints)."""
        return job_data_identity(self.cfg, self.data.train)

    def _attach(self, loaded: LoadedModel) -> DeltaBase:
        """The delta on the backbone, frozen; by default (as the library's) with the task head,
        and always with the modules the checkpoint lacked. Copies of kept modules train in fp32,
        like the delta."""
        settings = dict(self.cfg.delta)
        unfrozen = list(settings.get("unfrozen_modules") or default_unfrozen(loaded.model))
        settings["unfrozen_modules"] = unfrozen + [m for m in loaded.new_modules if m not in unfrozen]
        delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(settings), backbone_model=loaded.model)
        for att in delta.record.trained_copies():
            att.delta.float()
        delta.freeze_module()
        if self.engine.is_main:
            delta.log(visualization=False)
        return delta

    def evaluate_now(self) -> Evaluation:
        """The evaluation rows' metrics for the delta as it is (no training step, nothing written)."""
        self.steps = prepare_steps(self.engine, self.model, self.delta, self.cfg.training, self.plan,
                                   self.cfg.task, self.dtype, self.collate)
        return self._evaluate("eval")

    def run(self, job_start: float) -> TrainResult:
        """The job, step by step: wrap and set up the optimizer, resume or evaluate first, train,
        evaluate again, save the delta, write the metrics."""
        cfg, engine, t = self.cfg, self.engine, self.cfg.training
        # Counted before wrapping: sharding engines leave only a piece of each parameter on a rank.
        trainable = sum(p.numel() for p in self.delta.parameters())
        total_params = sum(p.numel() for p in self.model.parameters())
        if engine.world_size > 1:
            # Every rank built the same model and delta from training.seed; from here on (dropout)
            # each rank draws its own random numbers, as different rows deserve different masks.
            torch.manual_seed(t.seed + engine.rank)
        self.steps = prepare_steps(engine, self.model, self.delta, t, self.plan, cfg.task, self.dtype,
                                   self.collate, own_rows=self.stream is not None)
        if cfg.data.packing:  # examples must not see each other: a model that lets them is an error
            check_isolation(self.steps.logits, self.collate.pad_token_id, self.collate.mask_dtype,
                            tolerance=1e-4 if self.dtype == torch.float32 else 2e-2)

        output_dir = Path(cfg.output_dir)
        resolved = to_dict(cfg)
        if self.data.labels is not None:  # the class names, also where the training rows gave them
            resolved["data"]["labels"] = list(self.data.labels)
        if engine.is_main:  # what deltadist predict / eval --run read
            write_run_config(resolved, output_dir)
        info = run_info(resolved)
        reporters, point = None, self.resume_from
        if engine.is_main:  # a resumed job continues the checkpoint's runs
            reporters = Reporters(t.report_to, output_dir, info, point.saved.get("report_runs") if point
                                  else None, point.step if point else None, hold=bool(t.save_every))
        finished = False
        try:
            result = self._logged(job_start, MetricsLog(output_dir / LOG_NAME, engine.is_main, reporters),
                                  trainable, total_params, info)
            finished = True
            return result
        finally:
            if reporters is not None:
                reporters.close(finished)

    def _logged(self, job_start: float, log: MetricsLog, trainable: int, total_params: int,
                info: dict[str, Any]) -> TrainResult:
        """:meth:`run` from the first evaluation on, writing ``log``."""
        cfg, engine = self.cfg, self.engine
        output_dir = Path(cfg.output_dir)
        step, tokens, before = self._start(log)
        train_start = time.perf_counter()
        tokens_at_start = tokens
        step, tokens = self._train(step, tokens, before, log)
        train_seconds = time.perf_counter() - train_start

        after, stopped_early = None, self.best.stopped  # (the final evaluation cannot stop the job)
        if self.data.eval is not None and stopped_early:
            # The evaluation of this step stopped the job and is logged; after a resume from this
            # step's checkpoint it is computed again (the same delta) but not logged twice.
            after = self.last_eval or self._evaluate("eval (after)")
        elif self.data.eval is not None:
            after = self._evaluate("eval (after)")
            if cfg.training.eval_every:
                self._observe(step, after)
            log.write({"step": step, **after.log_row(), **self._best_fields()})
        if engine.is_main:  # a run killed while saving its delta left a temporary file there
            for stale in (output_dir / DELTA_DIRNAME).glob(".*.tmp"):
                stale.unlink(missing_ok=True)
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
            eval_metrics=after.metrics() if after else None,
            confusion_matrix=after.confusion if after else None,
            class_names=self.data.labels if after and after.confusion else None,
            best=self._best_summary(output_dir), stopped_early=stopped_early,
            delta_bytes=sum(f.stat().st_size for f in delta_dir.iterdir() if f.is_file()),
            delta_path=str(delta_dir), trainable_params=trainable, total_params=total_params,
            device=str(engine.device), engine=engine.name, world_size=engine.world_size,
            resumed_from=self.resume_from.step if self.resume_from else None, run_info=info,
        )
        metrics_path = output_dir / METRICS_NAME
        metrics_path.write_text(json.dumps(asdict(metrics), indent=2) + "\n")
        return TrainResult(self.model, self.delta, metrics, metrics_path)

    def _start(self, log: MetricsLog) -> tuple[int, int, Evaluation | None]:
        """Steps done, tokens trained on and the evaluation before training: from the checkpoint
        resumed from, or none yet (evaluating first)."""
        t = self.cfg.training
        saved = self.resume_from.saved.get("best") if self.resume_from is not None else None
        self.best = BestTracker.resumed(t.best_metric, t.patience, saved)
        self.last_eval: Evaluation | None = None
        if self.resume_from is not None:
            step, tokens, before = restore_checkpoint(self.steps, self.delta, self.resume_from,
                                                      self.plan.total_steps)
            log.truncate_after(step, self.resume_from.saved.get("log_rows"))
            return step, tokens, before
        log.truncate_after(-1)  # the log of an earlier run (that left no checkpoint) goes
        before = None
        if self.data.eval is not None:
            before = self._evaluate("eval (before)")
            log.write({"step": 0, **before.log_row()})
        return 0, 0, before

    def _train(self, step: int, tokens: int, before: Evaluation | None, log: MetricsLog) -> tuple[int, int]:
        """The optimizer steps after ``step`` (``tokens`` trained on so far) to the plan's total,
        logging, evaluating and saving checkpoints as configured; returns the final step and tokens."""
        t = self.cfg.training
        with tqdm(total=self.plan.total_steps, initial=step, desc="train", unit="step",
                  disable=not self.engine.is_main) as bar:
            since, tokens_since = time.perf_counter(), 0
            nonfinite = NonFiniteSteps(t.skip_nonfinite_steps, self.cfg.output_dir, self.engine.is_main)
            batches = batches_after(self.data.train, self.lengths, self.plan, t.seed,
                                    self.cfg.data.sort_by_length, step, self.data.mixture)
            if self.stream is not None:
                batches = self.stream.examples_after(step, self.plan.total_steps, self.cfg.task,
                                                     self.tokenizer, self.cfg.model.max_length,
                                                     self.data.labels)
            for batch in batches:
                if self.best.stopped:  # resumed from the checkpoint of the step that stopped early
                    break
                outcome = self.steps.train_step(batch)
                step += 1
                skipped = nonfinite.check(step, outcome)  # raises when the job must stop
                if not skipped:
                    tokens += outcome.tokens
                    tokens_since += outcome.tokens
                elapsed = time.perf_counter() - since
                bar.update()
                bar.set_postfix(loss=f"{outcome.loss:.4f}", tok_s=f"{tokens_since / max(elapsed, 1e-9):,.0f}")
                if step % t.log_every == 0 or step == self.plan.total_steps:
                    log.write({"step": step, "epoch": round(step / self.plan.steps_per_epoch, 4),
                               "loss": None if skipped else outcome.loss,
                               "lr": self.steps.scheduler.get_last_lr()[0], "tokens": tokens,
                               "tokens_per_s": round(tokens_since / max(elapsed, 1e-9), 1),
                               "grad_norm": None if skipped else outcome.grad_norm,
                               "peak_memory_bytes": peak_memory_bytes(self.engine.device),
                               **({"skipped": True} if skipped else {})})
                    since, tokens_since = time.perf_counter(), 0
                evaluating = t.eval_every and step % t.eval_every == 0 and step < self.plan.total_steps
                if evaluating and self.data.eval is not None:
                    self.last_eval = self._evaluate(f"eval (step {step})")
                    self._observe(step, self.last_eval)
                    stopped = {"stopped_early": True} if self.best.stopped else {}
                    log.write({"step": step, **self.last_eval.log_row(), **self._best_fields(), **stopped})
                if t.save_every and step % t.save_every == 0:
                    save_checkpoint(self.cfg, self.steps, self.delta, step, tokens, before, log.rows,
                                    self.best.state(), log.reporters.runs if log.reporters else None,
                                    self.data_id)
                    if log.reporters:  # the rows up to here are kept on resume: report them
                        log.reporters.checkpointed()
                if self.best.stopped:
                    break
        return step, tokens

    def _observe(self, step: int, evaluation: Evaluation) -> None:
        """Track the best evaluation; every rank saves (gathers) the delta of a new best into
        ``output_dir/best/``."""
        if self.best.observe(step, evaluation):
            best_dir = Path(self.cfg.output_dir) / BEST_DIRNAME
            if self.engine.is_main:  # a run killed while saving it left a temporary file there
                for stale in best_dir.glob(".*.tmp"):
                    stale.unlink(missing_ok=True)
            self.delta.save_finetuned(best_dir)

    def _best_fields(self) -> dict[str, Any]:
        """The best evaluation's step and value for a ``metrics.jsonl`` row (with eval_every)."""
        return self.best.log_fields() if self.cfg.training.eval_every else {}

    def _best_summary(self, output_dir: Path) -> dict[str, Any] | None:
        """``metrics.json``'s ``best``: the metric, its best value, that step, and where its delta is."""
        if not self.cfg.training.eval_every or self.best.step is None:
            return None
        return {"metric": self.best.metric, "value": self.best.value, "step": self.best.step,
                "path": str(output_dir / BEST_DIRNAME)}

    def _evaluate(self, desc: str) -> Evaluation:
        """The evaluation rows' metrics now (generating, with eval_generation); ``desc`` labels its
        progress bars."""
        t = self.cfg.training
        classes = len(self.data.labels) if self.cfg.task == "sequence_classification" else None
        evaluation = evaluate(self.steps, self.data.eval, t.eval_batch_size, desc, classes)
        if t.eval_generation is None:
            return evaluation
        synced = engine_class(self.engine.name).forwards_together and self.engine.world_size > 1
        score = generation_score(self.steps, self.model, self.data.eval, self.tokenizer, t.eval_generation,
                                 t.eval_max_new_tokens, t.eval_batch_size, synced, f"{desc} generate")
        return replace(evaluation, generation=score)


def job_dtype(cfg: TrainConfig, engine: str, device: torch.device) -> torch.dtype:
    """The backbone's dtype for ``model.dtype`` on ``device`` under ``engine`` (float32 where the
    engine cannot train a half-precision backbone here: ``auto`` gives float32 there).

    Raises:
        ConfigError: the engine cannot train this dtype, or cannot hold ``model.quantize``'s weights.
    """
    quantized_problem = engine_class(engine).quantized_weights_problem
    if cfg.model.quantize is not None and quantized_problem is not None:
        raise ConfigError(f"model.quantize: {cfg.model.quantize} does not work with engine {engine} "
                          f"({quantized_problem}); set model.quantize: null or engine: fsdp2.")
    problem = engine_class(engine).half_precision_problem
    if problem is not None:
        if cfg.model.dtype not in ("auto", "fp32"):
            raise ConfigError(f"model.dtype: {cfg.model.dtype} does not work with engine {engine} "
                              f"({problem}); set model.dtype: fp32 (or auto).")
        return torch.float32
    return resolve_dtype(cfg.model.dtype, device)
