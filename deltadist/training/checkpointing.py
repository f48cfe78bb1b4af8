"""The job's resumable checkpoints: which one ``--resume`` continues from, writing one every
``training.save_every`` steps (every rank takes part), and restoring one into the delta, optimizer,
scheduler, gradient scaler and RNG. The files themselves are :mod:`deltadist.training.run_state`'s.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deltadist.api.delta_base import DeltaBase
from deltadist.engines.optimizer_state import local_piece, rewrap_pieces
from deltadist.engines.runtime import EngineSetup
from deltadist.errors import CheckpointError, ConfigError
from deltadist.training import run_state
from deltadist.training.config import TrainConfig, to_dict
from deltadist.training.evaluation import Evaluation
from deltadist.training.steps import StepRunner


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a ``--resume`` run continues from."""

    step: int
    directory: Path
    saved: dict[str, Any]
    """Its run state (``run_state.json``), read once."""
    state: run_state.RankState
    """This rank's optimizer, scheduler, scaler and RNG state, read (and checked) once."""


def checkpoint_to_resume(cfg: TrainConfig, engine: EngineSetup, resume: bool) -> ResumePoint | None:
    """The newest intact checkpoint in ``output_dir`` when ``resume``, checked to be this job's.

    Every file of a checkpoint is read and checked (the run state, the delta against its SHA-256,
    this rank's state against its own); a damaged checkpoint is said on stderr and the one before
    it is tried. Every rank checks its own files, and all agree on the checkpoint.

    Raises:
        ConfigError: checkpoints there without ``resume``, or of another job, engine or world size.
        CheckpointError: no checkpoint there is intact (naming the damaged files).
    """
    found = run_state.checkpoints(cfg.output_dir)
    if not resume:
        if found:
            raise ConfigError(
                f"output_dir {cfg.output_dir} holds checkpoints of an earlier run (the newest "
                f"after step {found[-1][0]}): pass --resume to continue it, or choose a new output_dir.")
        return None
    if not found:
        if engine.is_main:
            print(f"deltadist train: --resume: no checkpoint in {cfg.output_dir}; starting from "
                  "step 0.", file=sys.stderr)
        return None
    problems = []
    for step, directory in reversed(found):
        point, problem = _intact(cfg, engine, step, directory)
        if point is not None:
            return point
        problems.append(problem)
        if engine.is_main or problem != _ANOTHER_RANK:
            older = "trying the one before it" if step != found[0][0] else "it was the oldest"
            print(f"deltadist train{_rank_tag(engine)}: warning: --resume: the checkpoint of step {step} "
                  f"is damaged: {problem}; {older}.", file=sys.stderr)
    listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    raise CheckpointError(f"--resume: no intact checkpoint in {cfg.output_dir}: {listed}; restore the "
                          "files, or move the checkpoints away and train from step 0.")


_ANOTHER_RANK = "another rank found one of its files damaged (see its message)"


def _intact(cfg: TrainConfig, engine: EngineSetup, step: int, directory: Path
            ) -> tuple[ResumePoint | None, str]:
    """The resume point at ``directory`` if every rank found its files intact, else what is wrong."""
    problem = ""
    try:
        saved = run_state.read_run_state(directory)
        run_state.check_same_job(saved["config"], to_dict(cfg), directory)
        if (saved["engine"], saved["world_size"]) != (engine.name, engine.world_size):
            raise ConfigError(
                f"--resume: {directory} was written by engine {saved['engine']} on {saved['world_size']} "
                f"rank(s); this run is {engine.name} on {engine.world_size}. Each rank's "
                "optimizer state is its own shard: resume with the same engine and number of ranks.")
        state = run_state.read_rank_state(directory, engine.rank, engine.world_size)
        run_state.check_delta(directory)
    except run_state.DamagedCheckpoint as err:
        problem = str(err)
    damaged = engine.sum_over_ranks(torch.tensor(float(bool(problem)), device=engine.device))
    if float(damaged) == 0:
        return ResumePoint(step, directory, saved, state), ""
    return None, problem or _ANOTHER_RANK


def _rank_tag(engine: EngineSetup) -> str:
    return f" (rank {engine.rank})" if engine.world_size > 1 else ""


def save_checkpoint(cfg: TrainConfig, steps: StepRunner, delta: DeltaBase, step: int, tokens: int,
                    before: Evaluation | None, log_rows: int, best: dict[str, Any] | None = None,
                    report_runs: dict[str, str] | None = None, data: dict[str, Any] | None = None) -> None:
    """Every rank: the delta (gathered) and this rank's state into the partial directory; then
    the main rank commits it, with the number of ``metrics.jsonl`` rows written so far
    (``log_rows``: a resumed run keeps those and no more), the best evaluation's tracking
    (``best``: :meth:`~deltadist.training.best.BestTracker.state`) and the ``training.report_to``
    backends' run ids (``report_runs``: a resumed run continues those runs) and the training data's
    identity (``data``: :mod:`deltadist.training.data_identity`; a resumed run must have the same)."""
    engine, output_dir = steps.engine, cfg.output_dir
    if engine.is_main:
        run_state.begin(output_dir, step)
    engine.barrier()
    partial = run_state.partial_dir(output_dir, step)
    delta.save_finetuned(partial / run_state.DELTA_DIRNAME)
    state = run_state.RankState(
        optimizer=steps.stepper.state_dict(), scheduler=steps.scheduler.state_dict(),
        scaler=steps.scaler.state_dict() if steps.scaler else None,
        rng=run_state.capture_rng(engine.device))
    run_state.write_rank_state(partial, engine.rank, engine.world_size, state, local_piece)
    engine.barrier()
    if engine.is_main:
        run_state.commit(partial, {
            "format_version": run_state.FORMAT_VERSION, "step": step, "tokens": tokens,
            "engine": engine.name, "world_size": engine.world_size, "config": to_dict(cfg),
            "eval_before": asdict(before) if before else None, "log_rows": log_rows, "best": best,
            "report_runs": report_runs or {}, "data": data,
        }, cfg.training.keep_last)
    engine.barrier()


def restore_checkpoint(steps: StepRunner, delta: DeltaBase, point: ResumePoint, total_steps: int
                       ) -> tuple[int, int, Evaluation | None]:
    """Load the checkpoint at ``point`` into the delta, optimizer, scheduler and RNG; returns its
    step, its tokens trained on, and the evaluation before training."""
    engine, directory = steps.engine, point.directory
    delta.load_finetuned(directory / run_state.DELTA_DIRNAME)
    state = point.state
    optimizer_state = state.optimizer
    if isinstance(steps.stepper, torch.optim.Optimizer):
        optimizer_state = rewrap_pieces(steps.stepper, optimizer_state)
    steps.stepper.load_state_dict(optimizer_state)
    steps.scheduler.load_state_dict(state.scheduler)
    if steps.scaler is not None and state.scaler is not None:
        steps.scaler.load_state_dict(state.scaler)
    run_state.restore_rng(state.rng, engine.device)
    before = point.saved.get("eval_before")
    if engine.is_main:
        print(f"deltadist train: resumed from {directory} (step {point.step} of {total_steps}).",
              file=sys.stderr)
    return point.step, point.saved["tokens"], Evaluation(**before) if before else None
