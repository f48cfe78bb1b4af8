"""The README's example job runs as written.

The "Must try" walkthrough moved to docs/walkthrough.md; it and every other ```python block of
the README and docs/ are executed by tests/docs/test_snippets.py.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_causal_lm_example_job_runs(tmp_path: Path) -> None:
    """The job.yaml of "Train on your model and data", pointed at a tiny checkpoint and rows."""
    import yaml

    from deltadist.cli.main import main
    from tests.task_jobs import make_job

    section = README.read_text().split("## Train on your model and data", 1)[1]
    job_yaml = re.search(r"cat > job.yaml <<'YAML'\n(.*?)\nYAML\n", section, re.S).group(1)
    config = yaml.safe_load(job_yaml)
    assert config["task"] == "causal_lm" and config["delta"]["modified_modules"] == ["all-linear"]
    job = make_job(tmp_path, "causal_lm")
    config["model"].update(name_or_path=str(job.model), max_length=32)
    config["data"] = {"train": str(job.train), "eval": str(job.eval)}
    config["training"].update(epochs=1, batch_size=8, micro_batch_size=4, lr=0.01, warmup_steps=2,
                              save_every=4)
    config["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-00000008" / "run_state.json").is_file()
