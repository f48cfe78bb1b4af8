"""Importing deltadist is cheap and side-effect free: no optional engine, no GPU."""

import subprocess
import sys


def test_import_loads_no_optional_engine_and_touches_no_gpu() -> None:
    code = (
        "import sys, torch, deltadist\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised'\n"
        "loaded = [m for m in ('deepspeed', 'bmtrain', 'accelerate', 'transformers') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
