#!/usr/bin/env bash
# Why align (docs/results.md, the alignment ablation): from the toy guidance-distilled base (runs/toy.sh's krea),
# move to the f32c16 latent at 256 px with the same total number of steps (3350), two ways:
#   (b) DC-Gen: align embed (200) -> align head (150) -> LoRA (3000)    = runs/toy.sh's dcgen-1k
#   (a) no alignment: a fresh embedder and head (align.py --stage embed --steps 0), then LoRA (3350), same recipe
#       (lr 1e-3, decayed to 0 over the last 1000 steps in both)
# Both log the training loss and the flow-matching loss on held-out latents (val256) every 500 (a: 50) LoRA steps; then
# runs/toy_eval.py scores both on 200 held-out prompts. Needs runs/toy.sh to have run (OUT, default out/toy).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/toy}
C=$OUT/cache
LOG="--device cpu --seed 0 --log_every 50"
python align.py --stage embed --base "$OUT/krea/model" --cache "$C/256" --steps 0 $LOG --out_dir "$OUT/noalign-init"
python lora.py --init "$OUT/noalign-init/model" --cache "$C/256" --val_cache "$C/val256" --val_every 50 --rank 32 \
  --alpha 32 --steps 3350 --decay 1000 --batch_size 16 --lr 1e-3 --warmup 50 --clip_grad 1 --ema 0.99 \
  --sample_every 3350 --save_every 100 $LOG --resume --out_dir "$OUT/noalign"
python lora.py --merge "$OUT/noalign/ckpt_0003350.pt" --out_dir "$OUT/noalign/model"
python runs/toy_eval.py --model "$OUT/noalign/model" --name no-alignment --model "$OUT/dcgen-1k/model" \
  --name dcgen-1k --size 256 --count 200 --out "$OUT/eval"
