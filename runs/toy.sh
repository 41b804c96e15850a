#!/usr/bin/env bash
# The toy zoo (docs/toy-zoo.md): DC-Gen in miniature, from nothing, with the project's own scripts, on a 2-core CPU
# in about 7 h. Deterministic for a given SEED on one machine (another CPU rounds floats differently, and the
# weights drift: docs/toy-zoo.md); every step is skipped when its output exists and a training step resumes
# from its newest checkpoint (exactly: the same draws), so a crashed run continues where it stopped (delete a step's
# folder to redo it). At the end, runs/export_zoo.py writes $ZOO (zoo/).
#
#   text          CLIP + T5 in miniature over the captions' words, frozen; T5 pretrained for a minute to say where
#                 each object goes (with a random T5 the DiT read captions as bags of words)        (toy/text.py)
#   ae/*          toy AEs: vae-f8c4 (the FLUX VAE's role), DC-AE 1.5 f32c16 (1K role), f64c32 (4K role)   (ae15.py)
#   base          CFG MMDiT from scratch on vae-f8c4 latents at 256 px, 16x16 tokens; lr decays over the last half
#   base-2        base trained 3000 steps more at lr 3e-4 decayed to 0, fresh draws (seed + 1): held-out accuracy 0.300
#                 -> 0.420, krea's 0.270 -> 0.365, DC-Gen 1K's 0.260 -> 0.330, DC-Gen 4K's 0.375 -> 0.438 (48 prompts)
#   krea          base-2 distilled to embedded guidance: the toy FLUX.1-Krea                      (distill.py)
#   dcgen-1k      krea -> f32c16 at 256 px, 8x8 tokens (4x fewer): align embed -> head -> LoRA (3000) -> merge; LoRA
#                 lr 1e-3 (at 3e-4 the LoRA drew the layout but blobs for shapes: accuracy 0.04 against 0.26)
#   dcgen-4k      krea -> f64c32 at 4096 px on the base's own 16x16 grid (as DC-Gen-FLUX 4K is on FLUX's 1K grid):
#                 4x4 patches of the first 4 channels (DC-AE 1.5's structured prefix: 512-dim tokens of all 32 do not
#                 fit the width-128 toy, whose loss then stalled), aligned to the teacher's copy of each image at 256
#                 px; LoRA 3000 steps at lr 1e-3 like 1K (1000 at 3e-4 drew blobs: shapes 0.33 / 0.17 against 0.50 /
#                 0.21; on the 7000-step base), then more LoRAs of 3000 on the merged model, fresh draws
#   dcgen-4k-2..5 one more LoRA on each merged model (seed + 1, ...): on 24 held-out prompts 0.375 after the third,
#                 0.458 after the fourth (0.438 on 48, 0.375 on 96; krea 0.417 on 48); the fifth 0.448 on 96 and the
#                 demo prompt in 4 of 8 images (the fourth: 2); dcgen-4k-5 is the zoo's dcgen-4k. (On the 7000-step
#                 base a fifth had lost: 0.29 against 0.375 on 48.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/toy}
ZOO=${ZOO:-zoo}  # where the models are exported: another folder keeps the committed zoo as it is
SEED=${SEED:-0}
mkdir -p "$OUT"
step() {  # name, output that marks it done, command...
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $name: $done exists, skipped"; return; fi
  echo "== $name"
  /usr/bin/time -f "$name: wall %e s, peak RSS %M KB" "$@" 2>&1 | tee -a "$OUT/toy.log"
}
LOG="--device cpu --seed $SEED --log_every 50 --resume"

step text "$OUT/text/tokenizer" python -c "from toy.shapes import all_specs, caption_roles; \
from toy.text import build_toy_text_encoder as b; c = [s.caption for s in all_specs('train')]; \
b('$OUT/text', c, seed=$SEED, roles=[caption_roles(x) for x in c])"
env OUT="$OUT/ae" bash runs/ae15_toy.sh 2>&1 | tee -a "$OUT/toy.log"  # skips the AEs that exist

# --- latent caches: both latents + text, once (train captions; val: held-out captions)
cache() {  # name, resolution, count, split, teacher AE (or ""), student AE, batch size (16), more flags
  step "cache $1" "$OUT/cache/$1/meta.json" python align.py --stage cache --data shapes --resolution "$2" --count "$3" \
    --split "$4" --teacher_ae "$5" --student_ae "$6" --text "$OUT/text" --batch_size "${7:-16}" --shard_size 512 \
    --seed $SEED --device cpu ${8:-} --out_dir "$OUT/cache/$1"
}
AE=$OUT/ae
cache 256 256 2048 train "$AE/vae-f8c4/ae" "$AE/f32c16/ae"
cache val256 256 256 test "$AE/vae-f8c4/ae" "$AE/f32c16/ae"
cache 4096c4 4096 256 train "$AE/vae-f8c4/ae" "$AE/f64c32/ae" 1 "--teacher_resolution 256 --student_channels 4"

# --- the toy base models: a CFG model from scratch, then its guidance-distilled twin (the toy FLUX.1-Krea)
C=$OUT/cache
step base "$OUT/base/model" sh -c "python lora.py --preset toy --rank 0 --latent teacher --loss fm --cache $C/256 \
  --val_cache $C/val256 --val_every 500 --steps 7000 --decay 3500 --batch_size 16 --lr 1e-3 --warmup 200 --clip_grad 1 \
  --ema 0.998 --sample_every 500 --save_every 250 $LOG --out_dir $OUT/base && \
  python lora.py --merge $OUT/base/ckpt_0007000.pt --out_dir $OUT/base/model"
step base-2 "$OUT/base-2/model" sh -c "python lora.py --init $OUT/base/model --rank 0 --latent teacher --loss fm \
  --cache $C/256 --steps 3000 --decay 3000 --batch_size 16 --lr 3e-4 --warmup 100 --clip_grad 1 --ema 0.998 \
  --save_every 250 $LOG --seed $((SEED + 1)) --out_dir $OUT/base-2 && \
  python lora.py --merge $OUT/base-2/ckpt_0003000.pt --out_dir $OUT/base-2/model"
step krea "$OUT/krea/model" python distill.py --init "$OUT/base-2/model" --cache "$C/256" --latent teacher --steps 600 \
  --batch_size 16 --lr 2e-4 --warmup 20 --clip_grad 1 --ema 0.99 --sample_every 300 --save_every 100 $LOG \
  --out_dir "$OUT/krea"

# --- DC-Gen: embed -> head -> LoRA (-> merge), on a student latent; then LoRA rungs at larger sizes
lora() {  # name, init, cache, steps, batch, lr, more flags
  step "$1" "$OUT/$1/model" sh -c "python lora.py --init $2 --cache $3 --rank 32 --alpha 32 --steps $4 \
    --batch_size $5 --lr $6 --warmup 50 --clip_grad 1 --ema 0.99 --sample_every $4 --save_every 100 $LOG ${7:-} \
    --out_dir $OUT/$1 && python lora.py --merge $OUT/$1/ckpt_$(printf %07d "$4").pt --out_dir $OUT/$1/model"
}
dcgen() {  # name, cache (both latents), embed steps, head steps, student patch size (1)
  step "$1 embed" "$OUT/$1-embed/model" python align.py --stage embed --base "$OUT/krea/model" --cache "$2" \
    --patch_size "${5:-1}" --steps "$3" --batch_size 32 --lr 1e-3 $LOG --out_dir "$OUT/$1-embed"
  step "$1 head" "$OUT/$1-head/model" python align.py --stage head --init "$OUT/$1-embed/model" --cache "$2" \
    --steps "$4" --batch_size 16 --lr 1e-3 --warmup 20 $LOG --out_dir "$OUT/$1-head"
}
dcgen dcgen-1k "$C/256" 200 150
lora dcgen-1k "$OUT/dcgen-1k-head/model" "$C/256" 3000 16 1e-3 "--val_cache $C/val256 --val_every 500 --decay 1000"
dcgen dcgen-4k "$C/4096c4" 200 150 4
lora dcgen-4k "$OUT/dcgen-4k-head/model" "$C/4096c4" 3000 16 1e-3 "--decay 1000"
prev=$OUT/dcgen-4k
for i in 2 3 4 5; do  # more LoRAs of the same recipe, each on the merged model before it, with fresh draws
  lora "dcgen-4k-$i" "$prev/model" "$C/4096c4" 3000 16 1e-3 "--decay 1000 --seed $((SEED + i - 1))"
  prev=$OUT/dcgen-4k-$i
done

# always exported (10 s): zoo/ is committed, so its files cannot mark this step done
echo "== export"; python runs/export_zoo.py --runs "$OUT" --out "$ZOO" 2>&1 | tee -a "$OUT/toy.log"
echo "toy zoo done: $OUT -> $ZOO/; the log and each step's wall time and peak memory: $OUT/toy.log"
