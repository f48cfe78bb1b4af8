"""Reading back what ``training.report_to``'s backends wrote, with each backend's own reader: TensorBoard's
event accumulator, W&B's protobuf records from its offline run directory, MLflow's client."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from deltadist.training.reporters import TENSORBOARD_DIRNAME, scalars, tracking_uri

_BLOCK = 32768
"""W&B's transaction log (``run-<id>.wandb``) is LevelDB's log format: 32 KiB blocks of records, each
with a 7-byte header (CRC, length, kind: 1 whole, 2 first, 3 middle, 4 last piece)."""


def jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.jsonl``'s numbers as ``{key: [(step, value), ...]}``."""
    found: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in scalars(row).items():
            found.setdefault(key, []).append((row["step"], value))
    return found


def tensorboard_scalars(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """The event files' scalars as ``{tag: [(step, value), ...]}``, and the run-info text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TENSORBOARD_DIRNAME))
    events.Reload()
    tags = events.Tags()
    found = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    text = events.Tensors("run_info/text_summary")[0].tensor_proto.string_val[0].decode()
    return found, text


def wandb_runs(run_dir: Path) -> list[tuple[str, dict[str, Any], dict[str, list[tuple[int, float]]]]]:
    """Each offline run directory under ``run_dir/wandb/``, oldest first: its run id, config and
    history (``{key: [(step, value), ...]}``, W&B's own ``_step``, ``_runtime`` ... left out)."""
    runs = []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        run_id, config, history = "", {}, {}
        for record in _wandb_records(next(directory.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                for key, value in items.items():
                    if key != "step" and not key.startswith("_"):
                        history.setdefault(key, []).append((items["step"], value))
        runs.append((run_id, config, history))
    return runs


def _wandb_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, records, pieces = 7, [], b""
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zeros: the rest of the block is empty
            position += left
            continue
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def mlflow_runs(run_dir: Path) -> list[tuple[Any, dict[str, list[tuple[int, float]]]]]:
    """Each MLflow run in ``run_dir``'s store: the run, and its metric histories."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(run_dir))
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = []
    for run in client.search_runs(experiments):
        histories = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                     for key in run.data.metrics}
        found.append((run, histories))
    return found
