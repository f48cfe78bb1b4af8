"""The training job: build, evaluate, train the delta with AdamW, evaluate again, save."""

from __future__ import annotations

import json
import time
from typing import Any
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from deltadist.api.auto import AutoDeltaConfig, AutoDeltaModel
from deltadist.api.delta_base import DeltaBase
from deltadist.training.config import TrainConfig
from deltadist.training.data import LABELS, Batches, check_batch_size, load_topics
from deltadist.engines.runtime import EngineSetup, setup_engine
from deltadist.training.model import TextClassifier, build_model

METRICS_NAME = "metrics.json"
DELTA_DIRNAME = "delta"


@dataclass(frozen=True)
class Metrics:
    """What ``metrics.json`` holds."""

    accuracy_before: float
    accuracy_after: float
    train_seconds: float
    total_seconds: float
    delta_bytes: int
    """Size of the saved checkpoint directory (weights and config)."""
    delta_path: str
    trainable_params: int
    total_params: int
    device: str
    """This rank's device (rank 0's in a distributed run)."""
    engine: str = "plain"
    world_size: int = 1


@dataclass
class TrainResult:
    """The trained model, its delta, and the job's metrics."""

    model: TextClassifier
    delta: DeltaBase
    metrics: Metrics | None
    """``None`` on ranks other than the main one."""
    metrics_path: Path | None


def train(cfg: TrainConfig) -> TrainResult:
    """Run the job ``cfg`` describes; write ``output_dir/delta/`` and ``output_dir/metrics.json``.

    Under a distributed engine call it on every rank (``torchrun``): each rank trains on its share
    of every global batch, evaluates on the whole test set, and takes part in saving the delta;
    only the main rank shows progress and writes ``metrics.json`` (elsewhere ``metrics`` is ``None``).
    """
    job_start = time.perf_counter()
    engine = setup_engine(cfg.engine, deepspeed_config=cfg.deepspeed_config,
                          batch_size=cfg.training.batch_size)
    try:
        return _run(cfg, engine, job_start)
    finally:
        engine.close()


def _run(cfg: TrainConfig, engine: EngineSetup, job_start: float) -> TrainResult:
    check_batch_size(cfg.training.batch_size, engine.world_size)
    train_set, test_set = load_topics(cfg.data.train_size, cfg.data.test_size, cfg.data.seed)
    model, tokenizer = build_model(cfg.model.name_or_path, len(LABELS), cfg.training.seed,
                                   dropout=cfg.model.dropout, show_progress=engine.is_main)
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(cfg.delta), backbone_model=model)
    delta.freeze_module()
    if engine.is_main:
        delta.log(visualization=False)
    # Counted before wrapping: sharding engines leave only a piece of each parameter on a rank.
    trainable_params = sum(p.numel() for p in delta.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    if engine.world_size > 1:
        # Every rank built the same model and delta from training.seed; from here on (dropout)
        # each rank draws its own random numbers, as different rows deserve different masks.
        torch.manual_seed(cfg.training.seed + engine.rank)
    model.to(engine.device)
    runner = engine.wrap(model)
    # The optimizer takes the parameters right after wrapping, before any forward: FSDP2 leaves
    # the root module's parameters unsharded after a forward, and they would be listed instead.
    optimizer = torch.optim.AdamW(delta.parameters(), lr=cfg.training.lr)
    runner, optimizer = engine.prepare(runner, optimizer)  # DeepSpeed: deepspeed.initialize

    show = engine.is_main
    test_batches = Batches(test_set, tokenizer, cfg.training.eval_batch_size, cfg.model.max_length)
    train_batches = Batches(train_set, tokenizer, cfg.training.batch_size, cfg.model.max_length,
                            generator=torch.Generator().manual_seed(cfg.training.seed),
                            rank=engine.rank, world_size=engine.world_size)
    accuracy_before = accuracy(runner, test_batches, engine.device, "eval (before)", show)
    train_start = time.perf_counter()
    for epoch in range(1, cfg.training.epochs + 1):
        train_epoch(runner, optimizer, train_batches, engine.device,
                    f"epoch {epoch}/{cfg.training.epochs}", show)
    train_seconds = time.perf_counter() - train_start
    accuracy_after = accuracy(runner, test_batches, engine.device, "eval (after)", show)

    output_dir = Path(cfg.output_dir)
    delta_dir = Path(delta.save_finetuned(output_dir / DELTA_DIRNAME))  # every rank: it gathers
    if not engine.is_main:
        return TrainResult(model=model, delta=delta, metrics=None, metrics_path=None)
    metrics = Metrics(
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        train_seconds=round(train_seconds, 3),
        total_seconds=round(time.perf_counter() - job_start, 3),
        delta_bytes=sum(f.stat().st_size for f in delta_dir.iterdir() if f.is_file()),
        delta_path=str(delta_dir),
        trainable_params=trainable_params,
        total_params=total_params,
        device=str(engine.device),
        engine=engine.name,
        world_size=engine.world_size,
    )
    metrics_path = output_dir / METRICS_NAME
    metrics_path.write_text(json.dumps(asdict(metrics), indent=2) + "\n")
    return TrainResult(model=model, delta=delta, metrics=metrics, metrics_path=metrics_path)


def train_epoch(model: nn.Module, optimizer: Any, batches: Batches,
                device: torch.device, desc: str, show: bool = True) -> None:
    """One pass over ``batches`` with cross-entropy loss (the global batch's mean, see ``loss_scale``)."""
    model.train()
    with tqdm(batches, desc=desc, unit="batch", disable=not show) as bar:
        for batch in bar:
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            loss = nn.functional.cross_entropy(logits, batch["labels"].to(device), reduction="sum")
            loss = loss * batch["loss_scale"].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def accuracy(model: nn.Module, batches: Batches, device: torch.device, desc: str,
             show: bool = True) -> float:
    """Fraction of the examples in ``batches`` whose arg-max logit is the label."""
    model.eval()
    correct = 0
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not show):
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        correct += int((logits.argmax(dim=-1).cpu() == batch["labels"]).sum())
    return correct / len(batches.examples)
