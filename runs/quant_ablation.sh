#!/usr/bin/env bash
# Quantisation ablation on a FLUX-shaped random stack: width 3072, 24 heads, 1 double + 1 single block, random init,
# 16 outlier channels (x20) injected into every quantised layer's input (runs/quant_ablation.py: inject_outliers).
# Prints the relative output error vs fp32 of {RTN, SVDQuant r=32} x {NVFP4, INT4} and writes ablation.json.
# num_grids 10 is DeepCompressor's fast.yaml grid (19 (alpha, beta) candidates); its default is 20.
# CPU (2 cores): ~20 min; one GPU: ~1 min (add --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
python runs/quant_ablation.py --preset flux-dev --latent_hw 32 --txt_len 64 --calib_batches 4 --num_grids 10 \
    --out_dir out/quant-ablation "$@"
