"""Repository-level pytest setup: tests import shared helpers as ``tests.<module>``."""

import os
import sys

# Never let a test reach a model hub; everything is built locally or shipped in packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# DeepSpeed picks its accelerator at import; the CPU one where no GPU is visible (as in CI).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
