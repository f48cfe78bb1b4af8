"""``deltadist train --dry-run``: what a run would train, on what, in how many steps -- without
loading a weight, starting a process group or writing a file.

The config is checked as a real run checks it; the model is built from its transformers config on
``meta`` and the delta attached there (shapes from meta tensors); the data is read and tokenized
(the tokenizer loads from disk); the step plan is the one the run would take on ``world_size``
ranks of the config's engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltadist.api.auto import AutoDeltaConfig, AutoDeltaModel
from deltadist.api.ownership import default_unfrozen
from deltadist.core.quantized import quantizable_linears
from deltadist.engines import ENGINES, engine_class
from deltadist.engines.batch_split import split_batch
from deltadist.engines.runtime import EngineSetup
from deltadist.errors import ConfigError
from deltadist.training.batching import StepPlan, plan_steps
from deltadist.training.checkpointing import ResumePoint, checkpoint_to_resume
from deltadist.training.checks import check_could_write, check_engine_limits, warn_if_warmup_outlasts
from deltadist.training.config import TrainConfig
from deltadist.training.data_identity import check_same_data, job_data_identity
from deltadist.training.job_data import JobData, Rows, load_rows, tokenize
from deltadist.training.loop import engine_options, job_dtype
from deltadist.training.model import plan_model
from deltadist.training.streaming import RowStream, streamed_examples
from deltadist.training.text_data import TokenizedExample


@dataclass
class Site:
    """One module the delta modifies, and the delta's parameters there."""

    name: str
    parameters: dict[str, tuple[int, ...]]
    """Parameter name (``<kind>.<param>``) -> shape."""
    shared: bool = False
    """Not a module of the backbone: parameters the delta's sites share (a compacter's PHM rule,
    a prefix's reparametrisation), under the first part of their keys."""


@dataclass
class DryRun:
    """What :func:`dry_run` found."""

    cfg: TrainConfig
    engine: str
    world_size: int
    dtype: torch.dtype
    sites: list[Site]
    kept: dict[str, tuple[int, ...]]
    """Backbone parameters the delta trains (copies of a task head), by checkpoint key -> shape."""
    trainable_params: int
    total_params: int
    quantized: list[str]
    """Linear layers whose weights ``model.quantize`` stores in 4 bits (empty without it)."""
    rows: tuple[int, int | None]
    """Training and evaluation rows as read."""
    sources: list[tuple[str, int, int]]
    """Each training source (several only): how errors name it, its rows, and its examples an epoch."""
    examples: int
    """Training examples after tokenizing (with packing: the packed rows)."""
    tokens: tuple[int, int | None]
    """Training and evaluation tokens after tokenizing (and packing)."""
    plan: StepPlan
    resumed_from: int | None = None
    """The step of the checkpoint ``--resume`` would continue from (``None``: step 0)."""


def dry_run(cfg: TrainConfig, world_size: int = 1, resume: bool = False) -> DryRun:
    """Check ``cfg`` as :func:`~deltadist.training.loop.train` does and describe the run on
    ``world_size`` ranks of ``cfg.engine``, from the model on ``meta``.

    Raises:
        ConfigError: what a real run would refuse before its first step.
    """
    t = cfg.training
    dtype, point = _check(cfg, world_size, resume)
    rows = load_rows(cfg)
    if cfg.data.streaming:  # the first global batch's rows, as the run checks them before its weights
        RowStream.of_job(cfg, 0, 1).check_first(cfg.task, rows.labels)
    loaded = plan_model(cfg.model, cfg.task, rows.labels, dtype)
    data = tokenize(rows, cfg, loaded.tokenizer)
    if point is not None:  # as the run refuses to resume on other data
        check_same_data(point.saved.get("data"), job_data_identity(cfg, data.train), point.directory)
    plan = plan_steps(t.batch_size, t.micro_batch_size, t.gradient_accumulation_steps, world_size,
                      streamed_examples(cfg) or len(data.train), t.epochs, t.max_steps)
    engine = engine_class(cfg.engine)
    check_engine_limits(cfg.engine, engine.accumulates, engine.steps_in_backward, t.skip_nonfinite_steps,
                        plan.accumulation)
    warn_if_warmup_outlasts(t.warmup_steps, plan.total_steps)
    model = loaded.model
    quantized = [] if cfg.model.quantize is None else list(
        quantizable_linears(model, skip=[model.get_submodule(m) for m in loaded.new_modules]))
    settings = dict(cfg.delta)  # as the job attaches it (loop._Job._attach)
    unfrozen = list(settings.get("unfrozen_modules") or default_unfrozen(model))
    settings["unfrozen_modules"] = unfrozen + [m for m in loaded.new_modules if m not in unfrozen]
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(settings), backbone_model=model)
    return DryRun(
        cfg=cfg, engine=cfg.engine, world_size=world_size, dtype=dtype,
        sites=_sites(delta.record.site_names, delta.delta_parameters()),
        kept={key: tuple(p.shape) for key, p in delta.unfrozen_backbone_parameters().items()},
        trainable_params=sum(p.numel() for p in delta.parameters()),
        total_params=sum(p.numel() for p in model.parameters()), quantized=quantized,
        rows=rows.counts(), examples=len(data.train), sources=_sources(rows, data),
        tokens=(_tokens(data.train), _tokens(data.eval)), plan=plan,
        resumed_from=None if point is None else point.step)


def _check(cfg: TrainConfig, world_size: int, resume: bool) -> tuple[torch.dtype, ResumePoint | None]:
    """The checks a run makes before it reads the data; the backbone's dtype and the checkpoint
    ``resume`` continues from (``None``: a fresh start)."""
    t = cfg.training
    if world_size > 1 and cfg.engine == next(iter(ENGINES)):  # the first engine runs in one process
        raise ConfigError(f"engine: {cfg.engine} runs in one process, but the dry run is for a world of "
                          f"{world_size} ranks; choose a distributed engine (--set engine=ddp, fsdp2 or "
                          "fsdp1), or --world-size 1.")
    engine = engine_class(cfg.engine)
    engine.check_options(world_size, **engine_options(cfg))
    split_batch(t.batch_size, t.micro_batch_size, t.gradient_accumulation_steps, world_size)
    check_engine_limits(cfg.engine, engine.accumulates, engine.steps_in_backward, t.skip_nonfinite_steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = job_dtype(cfg, cfg.engine, device)
    # Rank 0's view of output_dir (with --resume: the checkpoint it would continue, its files checked)
    rank0 = EngineSetup(name=cfg.engine, device=device, wrap=lambda model: model, world_size=world_size)
    point = checkpoint_to_resume(cfg, rank0, resume)
    check_could_write(cfg.output_dir)
    return dtype, point


def _sources(rows: Rows, data: JobData) -> list[tuple[str, int, int]]:
    if data.mixture is None:
        return []
    return [(part.shown, part.dataset.num_rows, count)
            for part, count in zip(rows.train, data.mixture.counts())]


def _tokens(examples: list[TokenizedExample] | None) -> int | None:
    return None if examples is None else sum(len(e.input_ids) for e in examples)


def _sites(names: list[str], parameters: dict[str, torch.nn.Parameter]) -> list[Site]:
    """The sites in model order, each with its delta parameters (keys ``<site>.<kind>.<param>``),
    then the shared parameters (keys ``<name>.<param>`` under no site)."""
    sites = [Site(name, {}) for name in names]
    shared: dict[str, Site] = {}
    for key, param in parameters.items():
        owners = [s for s in sites if key.startswith(s.name + ".")]
        site = max(owners, key=lambda s: len(s.name)) if owners else None
        if site is None:
            group = key.partition(".")[0]
            site = shared.setdefault(group, Site(group, {}, shared=True))
        site.parameters[key[len(site.name) + 1:]] = tuple(param.shape)
    return sites + list(shared.values())
