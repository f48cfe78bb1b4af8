"""The README's example job runs as written: the chat fine-tune of "Train on your model and data"
(its rows' spelling, its job.yaml, then its Python block using the trained delta).

The "Must try" walkthrough moved to docs/walkthrough.md; it and every other ```python block of
the README and docs/ are executed by tests/docs/test_snippets.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_chat_fine_tune_runs_end_to_end(tmp_path: Path) -> None:
    """The rows, job.yaml and Python block of "Train on your model and data", pointed at a tiny chat
    checkpoint on disk and its rows: the job trains, and the block answers with the trained delta."""
    import contextlib
    import io
    import json

    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltadist.cli.main import main
    from deltadist.training.config import load_config
    from deltadist.training.loop import train
    from tests.task_jobs import make_job

    section = README.read_text().split("## Train on your model and data", 1)[1]
    row = json.loads(re.search(r"cat > data/train.jsonl <<'JSONL'\n(.*?)\nJSONL\n", section, re.S).group(1))
    assert [turn["role"] for turn in row["messages"]] == ["user", "assistant"]
    config = yaml.safe_load(re.search(r"cat > job.yaml <<'YAML'\n(.*?)\nYAML\n", section, re.S).group(1))
    assert config["task"] == "causal_lm" and config["delta"]["modified_modules"] == ["all-linear"]
    job = make_job(tmp_path, "causal_lm", chat=True)
    assert "messages" in json.loads(job.train.read_text().splitlines()[1])  # the README's spelling
    config["model"].update(name_or_path=str(job.model), max_length=32)
    config["data"] = {"train": str(job.train), "eval": str(job.eval)}
    config["training"].update(epochs=2, batch_size=8, micro_batch_size=4, lr=0.01, warmup_steps=2,
                              save_every=4)
    config["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    result = train(load_config(path))
    assert result.metrics.eval_loss < result.metrics.eval_loss_before
    assert (tmp_path / "run" / "checkpoints" / "step-00000016" / "run_state.json").is_file()

    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    prompt = json.loads(job.eval.read_text().splitlines()[1])["messages"][0]["content"]
    code = (block.replace("/models/my-llama", str(job.model))
            .replace("runs/my_job/delta", str(tmp_path / "run" / "delta"))
            .replace("Reverse: one two three", prompt))
    printed, namespace = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)

    # The block's model is the trained one (the job's own, with its delta attached): same logits,
    # not the backbone's, and the same greedy answer.
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    model, loaded = result.model.eval(), namespace["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
        base = AutoModelForCausalLM.from_pretrained(job.model).eval()
        assert not torch.allclose(base(**inputs).logits, model(**inputs).logits, atol=1e-3)
        answer = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = tokenizer.decode(answer[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert printed.getvalue() == expected + "\n"

    # The command-line block after it, as written, on this run (paths swapped for the test's).
    commands = re.search(r"or from the command line.*?```bash\n(.*?)```", section, re.S).group(1)
    swaps = {"runs/my_job/delta": str(tmp_path / "run" / "delta"), "runs/my_job": str(tmp_path / "run"),
             "/models/my-llama": str(job.model), "data/questions.jsonl": str(job.eval),
             "data/test.jsonl": str(job.eval), "job.yaml": str(path), "merged": str(tmp_path / "merged"),
             "--out adapter": f"--out {tmp_path / 'adapter'}"}
    ran = []
    for line in commands.splitlines():
        line = line.split("  #")[0].split(" > ")[0]
        for old, new in swaps.items():
            line = line.replace(old, new)
        argv = shlex.split(line)
        assert argv[0] == "deltadist"
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(argv[1:]) == 0, line
        ran.append((argv[1], out.getvalue()))
    assert [name for name, _ in ran] == ["predict", "eval", "merge", "export", "inspect"]
    assert len(ran[0][1].splitlines()) == len(job.eval.read_text().splitlines())
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
