"""Tiny tokenizers and data files for the ``deltadist train`` text tasks, built without downloads.

:func:`word_tokenizer` gives every word of a corpus its own id, in order of first appearance
after the special tokens, so tests can write expected ids by hand: for ``word_tokenizer(["a b"])``,
``[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, a=4, b=5``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = 0, 1, 2, 3
"""Ids of ``[PAD]``, ``[UNK]``, ``[BOS]``, ``[EOS]`` in every :func:`word_tokenizer`."""
CLS, SEP = 2, 3
"""Ids of ``[CLS]`` and ``[SEP]`` in a :func:`bert_style_tokenizer` (it has no BOS or EOS)."""


def _word_level(corpus: Iterable[str], specials: tuple[str, ...], template: str) -> Tokenizer:
    """A whitespace word-level tokenizer: ``specials`` take ids 0.., then words by first appearance."""
    split = pre_tokenizers.Whitespace()
    vocab = {token: i for i, token in enumerate(specials)}
    for text in corpus:
        for word, _ in split.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = split
    # TemplateProcessing adds the special tokens that add_special_tokens=True asks for.
    used = [token for token in specials if token in template.split()]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, vocab[token]) for token in used]
    )
    return tokenizer


def word_tokenizer(corpus: Iterable[str], template: str = "[BOS] $A") -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer over the words of ``corpus`` (unknown words map to ``[UNK]``).

    ``template`` is what encoding with special tokens wraps a text in (tokenizers'
    ``TemplateProcessing`` syntax): ``"[BOS] $A"`` like Llama (the default), ``"$A [EOS]"`` like T5,
    ``"$A"`` like GPT-2. The tokenizer has ``[PAD]``, ``[UNK]``, ``[BOS]`` and ``[EOS]`` tokens in all.
    """
    backend = _word_level(corpus, ("[PAD]", "[UNK]", "[BOS]", "[EOS]"), template)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
"""The ChatML template (Qwen's, without its default system prompt), as tokenizers ship it."""
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
"""Llama 3's template (without its date and tool preamble)."""
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def chat_tokenizer(corpus: Iterable[str], template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A :func:`word_tokenizer` (no special tokens added to texts: a chat template writes them) over
    ``corpus`` and the role names, with ChatML's and Llama 3's markers as special tokens (ids after
    the words) and ``template`` as its chat template (``None``: none)."""
    tokenizer = word_tokenizer(["system user assistant", *corpus], template="$A")
    tokenizer.add_tokens(list(CHAT_SPECIALS), special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


def byte_level_chat_tokenizer(corpus: Iterable[str], template: str = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's and Qwen's kind: spaces and newlines are parts of tokens, a
    word may be several tokens) trained on ``corpus`` and the role names, with the chat markers as
    special tokens and ``template`` as its chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", *CHAT_SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["system user assistant", *corpus], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = template
    return tokenizer


def bert_style_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """Like :func:`word_tokenizer`, but wrapping texts in ``[CLS] ... [SEP]`` and with no BOS or EOS."""
    backend = _word_level(corpus, ("[PAD]", "[UNK]", "[CLS]", "[SEP]"), "[CLS] $A [SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` to ``path`` as JSON Lines: one object a line."""
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


def cache_dataset(cache_dir: str | os.PathLike, name: str,
                  splits: Mapping[str, list[dict[str, Any]]]) -> None:
    """Put ``splits`` into the datasets cache at ``cache_dir`` as ``load_dataset(name)`` (``user/name``)
    leaves a hub dataset there once it has loaded it online: ``user___name/default/0.0.0/<hash>/``
    with ``name-<split>.arrow`` files and ``dataset_info.json``, which an offline ``load_dataset(name)``
    reads back. datasets' own JSON builder writes the files (a builder with a ``repo_id`` insists on
    hub files, so it writes under ``name/`` and the folder is renamed to the namespaced one)."""
    from datasets.packaged_modules.json.json import Json

    user, short = name.split("/")
    staging = os.path.join(cache_dir, "staging")
    os.makedirs(staging, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = os.path.join(staging, f"{split}.jsonl")
        write_jsonl(files[split], rows)
    import inspect

    # datasets 2.x's builders take no config_id (the folder is the config name there as well)
    extra = {"config_id": "default"} if "config_id" in inspect.signature(Json.__init__).parameters else {}
    Json(cache_dir=str(cache_dir), dataset_name=short, config_name="default", data_files=files,
         hash="0" * 16, **extra).download_and_prepare()
    target = os.path.join(cache_dir, f"{user}___{short}")
    os.rename(os.path.join(cache_dir, short), target)
    for folder in os.listdir(target):  # datasets 2.x names the config folder default-<data files' hash>
        if folder.startswith("default-"):
            os.rename(os.path.join(target, folder), os.path.join(target, "default"))
