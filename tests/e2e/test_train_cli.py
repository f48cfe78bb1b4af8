"""``deltadist train`` end to end: on a reduced job accuracy rises and the delta is small and reloads;
on bad input the command prints one line and exits with status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from deltadist import AutoDeltaModel
from deltadist.cli import main as cli_main
from deltadist.training import loop
from deltadist.training.data import LABELS, load_topics
from deltadist.training.model import build_model

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = {
    "training.epochs": 1, "training.batch_size": 16, "training.lr": 0.003,
    "data.train_size": 160, "data.test_size": 80,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, loop.TrainResult]:
    """Run the CLI once; keep the output directory and the trained model (via a spy on train)."""
    output_dir = tmp_path_factory.mktemp("run")
    results: list[loop.TrainResult] = []
    train = loop.train

    def spy(cfg, resume=False):
        results.append(train(cfg, resume))
        return results[-1]

    argv = ["train", "--set", f"output_dir={output_dir}"]
    for key, value in OVERRIDES.items():
        argv += ["--set", f"{key}={value}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train", spy)
        assert cli_main.main(argv) == 0
    return output_dir, results[0]


def test_accuracy_rises(run: tuple[Path, loop.TrainResult]) -> None:
    output_dir, _ = run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["accuracy_before"] < 0.5
    assert metrics["accuracy_after"] > metrics["accuracy_before"] + 0.2
    assert metrics["delta_path"] == str(output_dir / "delta")
    assert 0 < metrics["trainable_params"] < 0.01 * metrics["total_params"]


def test_checkpoint_holds_only_delta_and_classifier(run: tuple[Path, loop.TrainResult]) -> None:
    output_dir, _ = run
    weights = output_dir / "delta" / "delta.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
    allowed = ("lora_A", "lora_B", "classifier")
    assert all(any(kind in key for kind in allowed) for key in keys), keys
    assert all(any(kind in key for key in keys) for kind in allowed), keys
    assert len(keys) == 6 * 2 * 2 + 2  # 6 layers x (query, value) x (A, B) + classifier weight, bias
    assert json.loads((output_dir / "metrics.json").read_text())["delta_bytes"] < 1024 ** 2


def test_reloaded_delta_reproduces_logits(run: tuple[Path, loop.TrainResult]) -> None:
    output_dir, result = run
    fresh, tokenizer = build_model("builtin:minilm", len(LABELS), seed=1234)
    fresh.eval()
    _, test = load_topics(OVERRIDES["data.train_size"], OVERRIDES["data.test_size"])
    batch = tokenizer([e.text for e in test[:8]], padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        untrained = fresh(*inputs)
        AutoDeltaModel.from_finetuned(output_dir / "delta", backbone_model=fresh)
        reloaded = fresh(*inputs)
        expected = result.model.cpu().eval()(*inputs)
    assert not torch.allclose(untrained, expected, atol=1e-3)
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argv", [
    ["--config", "{tmp}/bad.yaml"],  # YAML syntax error: fails while reading the config
    ["--set", "delta.modified_modules=[quer]", "--set", "output_dir={tmp}/out"],  # fails attaching
], ids=["yaml_syntax", "modified_modules_typo"])
def test_bad_input_is_one_line_and_exit_status_2(argv: list[str], tmp_path: Path) -> None:
    """The installed command's contract: ``deltadist train`` on bad input prints one line, no traceback."""
    (tmp_path / "bad.yaml").write_text("training:\n  epochs: [1\n")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # HF_HUB_DISABLE_PROGRESS_BARS: transformers' weight-loading bars would precede the error line
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "deltadist.cli", "train", *(a.format(tmp=tmp_path) for a in argv)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltadist train: error: "), proc.stderr


@pytest.mark.parametrize(
    "method", ["bitfit", "adapter", "low_rank_adapter", "compacter", "parallel_adapter", "prefix",
               "soft_prompt"])
def test_each_method_trains_from_its_shipped_config(method: str, tmp_path: Path) -> None:
    """``configs/minilm_<method>.yaml``: the main job with another delta (its section replaces LoRA's)."""
    argv = ["train", "--config", str(REPO / "configs" / f"minilm_{method}.yaml"),
            "--set", f"output_dir={tmp_path}", "--set", "training.lr=0.005"]
    for key, value in OVERRIDES.items():
        if key != "training.lr":
            argv += ["--set", f"{key}={value}"]
    assert cli_main.main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["accuracy_after"] > metrics["accuracy_before"] + 0.2, metrics
    config = json.loads((tmp_path / "delta" / "delta_config.json").read_text())
    assert config["delta_type"] == method and "lora_r" not in config
