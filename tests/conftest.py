"""Shared test setup: the repo root on sys.path, no hub access, deterministic CPU math, 2 threads (CI has 2 cores)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
