#!/usr/bin/env bash
# DC-Gen's data recipe in miniature, from prompts only (docs/data.md): the toy FLUX.1-Krea (zoo/krea, 256 px on the
# f8c4 VAE) generates an image per toy prompt at a 256 px base in three aspect-ratio buckets (192x320, 256x256,
# 320x192: the official 0.6, 1.0 and 1.67 ratios), cached as paired latents (its latent as sampled, the student
# f32c16 AE's of its image) -> align embed -> head -> LoRA -> merge, on a 2-core CPU (docs/data.md: 14.3 min quiet;
# beside other jobs libgomp's spinning threads made the cache 20-30x slower: OMP_WAIT_POLICY=PASSIVE). Then the
# toy scorer on held-out prompts at the square size and both non-square buckets, next to zoo/dcgen-1k (trained on
# rendered square images for 3000 LoRA steps). Every step is skipped when its output exists; training resumes.
#
#   N=768 LORA_STEPS=3000 COUNT=48 bash runs/prompts_toy.sh     # the defaults: 14.3 min on a quiet 2-core CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/prompts-toy}
N=${N:-768}                    # prompts (training captions of the toy grammar), one generated image each
LORA_STEPS=${LORA_STEPS:-3000}
COUNT=${COUNT:-48}             # held-out prompts per size in the evaluation
SEED=${SEED:-0}
mkdir -p "$OUT"
step() {  # name, output that marks it done, command...
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $name: $done exists, skipped"; return; fi
  echo "== $name"
  /usr/bin/time -f "$name: wall %e s, peak RSS %M KB" "$@" 2>&1 | tee -a "$OUT/log.txt"
}
LOG="--device cpu --seed $SEED --log_every 50 --resume"
C=$OUT/cache

step prompts "$OUT/prompts.txt" python -c "from toy.shapes import ShapesDataset; d = ShapesDataset(seed=$SEED); \
open('$OUT/prompts.txt', 'w').write(''.join(d.scene(i).spec.caption + '\n' for i in range($N)))"
step cache "$C/meta.json" python align.py --stage cache --prompts "$OUT/prompts.txt" --teacher zoo/krea \
  --student_ae zoo/ae/f32c16 --resolution 256 --buckets 0.6,1,1.67 --bucket_multiple 32 --sample_steps 20 \
  --guidance 3.5 --shard_size 32 --batch_size 16 --save_images --device cpu --seed $SEED --out_dir "$C"
step embed "$OUT/embed/model" python align.py --stage embed --base zoo/krea --cache "$C" --steps 200 --batch_size 32 \
  --lr 1e-3 $LOG --out_dir "$OUT/embed"
step head "$OUT/head/model" python align.py --stage head --init "$OUT/embed/model" --cache "$C" --steps 150 \
  --batch_size 16 --lr 1e-3 --warmup 20 $LOG --out_dir "$OUT/head"
step lora "$OUT/lora/model" sh -c "python lora.py --init $OUT/head/model --cache $C --rank 32 --alpha 32 \
  --steps $LORA_STEPS --batch_size 16 --lr 1e-3 --warmup 50 --decay $((LORA_STEPS / 3)) --clip_grad 1 --ema 0.99 \
  --sample_every 0 --save_every 250 $LOG --out_dir $OUT/lora && \
  python lora.py --merge $OUT/lora/ckpt_$(printf %07d "$LORA_STEPS").pt --out_dir $OUT/lora/model"
step eval "$OUT/eval/eval.json" python runs/prompts_toy_eval.py --model "$OUT/lora/model" --model zoo/dcgen-1k \
  --size 256x256 --size 192x320 --size 320x192 --count "$COUNT" --out "$OUT/eval"
grep -h "wall" "$OUT/log.txt"
