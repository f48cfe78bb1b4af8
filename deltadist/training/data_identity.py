"""Which training data a run's steps were drawn from, so that ``--resume`` continues on the same.

A checkpoint records where the run stands (the step) but the batches after it are a function of
the data too: a row added to a file, a shard dropped into the folder a glob pattern reads, or a
changed chat template would silently give the resumed run other batches than the run it
continues. The identity is the tokenized training examples (their count and the SHA-256 of their
token ids, labels and packing) or, for ``data.streaming`` (rows not read ahead), the names and
sizes of the files the stream reads.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from pathlib import Path
from typing import Any, Sequence

from deltadist.errors import ConfigError
from deltadist.training.config import TrainConfig
from deltadist.training.data_files import streamed_files
from deltadist.training.text_data import TokenizedExample


def job_data_identity(cfg: TrainConfig, examples: Sequence[TokenizedExample]) -> dict[str, Any]:
    """The identity of ``cfg``'s training data: the files it streams (``data.streaming``), else its
    tokenized training ``examples``."""
    if cfg.data.streaming:
        return files_identity(streamed_files(cfg.data.train, "data.train"))
    return examples_identity(examples)


def examples_identity(examples: Sequence[TokenizedExample]) -> dict[str, Any]:
    """``{"examples": n, "sha256": ...}`` of tokenized training examples (one pass over their ids)."""
    digest = hashlib.sha256()
    for example in examples:
        sizes = (len(example.input_ids), len(example.labels), len(example.segments))
        digest.update(array("i", sizes).tobytes())
        digest.update(array("i", example.input_ids + example.labels + example.segments).tobytes())
    return {"examples": len(examples), "sha256": digest.hexdigest()}


def files_identity(files: Sequence[str]) -> dict[str, Any]:
    """``{"files": [[name, bytes], ...]}`` of the files a stream reads, in its order (names without
    their folder: a run moved to another machine resumes)."""
    return {"files": [[os.path.basename(file), os.path.getsize(file)] for file in files]}


def check_same_data(saved: dict[str, Any] | None, current: dict[str, Any], directory: Path) -> None:
    """Refuse to resume from ``directory`` on other training data (a checkpoint written before
    identities were recorded, ``saved`` ``None``, is not checked).

    Raises:
        ConfigError: naming what differs.
    """
    if saved is None or saved == current:
        return
    if "files" in saved and "files" in current:
        then, now = dict(map(tuple, saved["files"])), dict(map(tuple, current["files"]))
        changes = [f"{name} added" for name in now if name not in then]
        changes += [f"{name} removed" for name in then if name not in now]
        changes += [f"{name} {then[name]:,} bytes then, {now[name]:,} now" for name in now
                    if name in then and then[name] != now[name]]
        what = "; ".join(changes) or "the files are read in another order"
    elif "examples" in saved and "examples" in current and saved["examples"] != current["examples"]:
        what = f"{saved['examples']:,} training examples then, {current['examples']:,} now"
    else:
        what = "as many training examples, but their token ids differ"
    raise ConfigError(f"--resume: the training data differ from when {directory} was written ({what}), so "
                      "the steps after it would not be the run's; restore the data, or train on the new "
                      "data in a new output_dir.")
