#!/usr/bin/env bash
# The GPU check (runs/gpu.py), sized for a short GPU loan (about 4-6 min on one H100, budget 420 s): FLUX.1-dev vs
# DC-Gen-FLUX transformer seconds per step at 1K/2K/4K (eager and torch.compile), one 12B LoRA training step against
# plan.py's prediction, and the DC-AE 1.5 f64c128 decode of a 4096 px image. Writes <out>/gpu.json and <out>/gpu.md.
#   bash runs/gpu.sh --out out/gpu                  # on a GPU
#   bash runs/gpu.sh --tiny --out out/gpu-tiny      # the same code paths on a CPU, tiny sizes, in seconds
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu.py" "$@"
