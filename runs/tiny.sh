#!/usr/bin/env bash
# Every stage for 2 steps on tiny random models (CPU, about a minute): the smoke test of the whole pipeline. The
# tiny world (tests/tiny_world.py): toy text encoders, a tiny FLUX-VAE-like teacher AE (f2), a tiny DC-AE 1.5
# student (f8), a tiny guidance-distilled FLUX and a tiny CFG FLUX, random weights in the real on-disk layouts.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/tiny}
rm -rf "$OUT"
python -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from tiny_world import build_world; \
build_world(Path('$OUT/world'))"
W=$OUT/world
S="--steps 2 --batch_size 4 --log_every 1"
python ae15.py --model tiny-1.5 --size_px 32 --batch_size 2 --steps 2 --device cpu --out_dir $OUT/ae15
python align.py --stage cache --data shapes --count 8 --resolution 16 --teacher_ae $W/teacher_ae \
    --student_ae $W/student_ae --text $W/text --shard_size 4 --batch_size 4 --out_dir $OUT/cache
python align.py --stage embed --base $W/base --cache $OUT/cache $S --out_dir $OUT/embed
python align.py --stage head --init $OUT/embed/model --cache $OUT/cache $S --warmup 1 --out_dir $OUT/head
python lora.py --init $OUT/head/model --cache $OUT/cache --rank 4 $S --warmup 1 --out_dir $OUT/lora
python lora.py --merge $OUT/lora/ckpt_0000002.pt --out_dir $OUT/lora/model
python distill.py --init $W/base_cfg --cache $OUT/cache --latent teacher $S --warmup 1 --out_dir $OUT/distill
python sample.py --model $OUT/lora/model --prompt "a red circle above a blue square" --size 64 --steps 4 \
    --out $OUT/sample.png
python quantize.py --model $OUT/lora/model --calib_count 4 --calib_steps 2 --calib_size 16 --num_grids 2 \
    --lowrank_iters 2 --rank 4 --device cpu --out_dir $OUT/quant
python sample.py --model $OUT/quant --prompt "a red circle above a blue square" --size 64 --steps 4 \
    --out $OUT/sample-nvfp4.png
echo "all stages ran: $OUT"
