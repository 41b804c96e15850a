#!/usr/bin/env bash
# The class-conditional toy (docs/c2i.md): DC-AE 1.5's convergence experiments and DC-Gen-DiT in miniature, on
# one-object images of 24 classes (colour x shape, toy/classes.py) at 128 px, with the project's own stages. Every
# arm trains the same toy DiT (models/dit.py "toy": width 128, depth 6, velocity, 24 classes) for the same steps,
# seed and data; runs/c2i_report.py samples each checkpoint (192 images, 8 per class, fixed noise, CFG 2, 20 Euler
# steps) and scores it with toy/classes.py (the toy scorer's colour blob + template shape checks), then writes the
# table and the curve $OUT/report.md, $OUT/curve.png.
#
#   a  DC-AE 1.5 Fig. 1b: unmasked f32 AEs (ae15.py --mask none), c4, c16 and c64, same architecture and steps;
#      a DiT on each latent (4x4 tokens at 128 px): does the wider latent converge slower?
#   b  DC-AE 1.5 Fig. 5b: the masked (1.5) f32c16 AE of the toy zoo; the DiT with and without augmented diffusion
#      training (lora.py --prefixes 4 8 12, K = 2 with the full latent always one of them)
#   c  DC-Gen-DiT: a DiT base on the f8c4 VAE latent (16x16, 2x2 patches: 64 tokens) moved to the f32c16 latent (4x4,
#      1x1: 16 tokens): embed -> head alignment -> LoRA (rank 16 + the new layers), against the same LoRA after a
#      fresh, unaligned embedder and head (align.py --stage embed --steps 0)
#
# Sized for a shared 2-core CPU: STEPS (DiT steps per arm), BATCH, AE_STEPS, COUNT (cached images) scale it; ARMS picks the
# experiments (default abc; two invocations with ARMS=a and ARMS=bc may run side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/c2i_toy}
STEPS=${STEPS:-1000}
AE_STEPS=${AE_STEPS:-4000}  # at 400 the unmasked AEs reconstruct too little for the scorer (docs/c2i.md)
COUNT=${COUNT:-2048}
BATCH=${BATCH:-32}
PX=128
ARMS=${ARMS:-abc}
A_CHANNELS=${A_CHANNELS:-4 16 64}  # (a): the latent channels of the unmasked AEs (toy-f32c4, -c16, -c64)
mkdir -p "$OUT"
step() {  # name, output that marks it done, command...
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "== $name: $done exists, skipped"; return; fi
  echo "== $name"
  /usr/bin/time -f "$name: wall %e s" "$@" 2>&1 | tee -a "$OUT/log.txt" | grep -v '^ \|^{\|^}' || true
  [ -e "$done" ] || { echo "$name failed: no $done"; exit 1; }
}
LOG="--device cpu --seed 0 --log_every 100"
SAVE=$((STEPS / 4))

# --- (a) the unmasked AEs, few to many channels
for c in $([[ $ARMS == *a* ]] && echo "$A_CHANNELS"); do
  step "ae f32c$c" "$OUT/ae-f32c$c/ae/config.json" python ae15.py --model toy-f32c$c --mask none --data shapes \
    --size_px $PX --zoom 1 4 --batch_size 8 --steps "$AE_STEPS" --lr 1e-3 --warmup 50 --l1_weight 0 --l2_weight 1 \
    --sample_every 0 --save_every 1000 --eval_n 16 $LOG --out_dir "$OUT/ae-f32c$c"
done

# --- latent caches of labels (train; the report draws its own held-out scenes)
cache() {  # name, teacher AE (or ""), student AE
  step "cache $1" "$OUT/cache/$1/meta.json" python align.py --stage cache --data classes --resolution $PX \
    --count "$COUNT" --teacher_ae "$2" --student_ae "$3" --batch_size 32 --shard_size 1024 --seed 0 --device cpu \
    --out_dir "$OUT/cache/$1"
}
for c in $([[ $ARMS == *a* ]] && echo "$A_CHANNELS"); do cache "a$c" "" "$OUT/ae-f32c$c/ae"; done
if [[ $ARMS == *[bc]* ]]; then cache zoo zoo/ae/vae-f8c4 zoo/ae/f32c16; fi

# --- the DiT arms: lora.py trains from scratch (--rank 0 --preset) or a LoRA on an --init folder
dit() {  # name, then lora.py flags
  local name=$1; shift
  step "$name" "$OUT/$name/ckpt_$(printf %07d "$STEPS").pt" python lora.py "$@" --steps "$STEPS" --batch_size "$BATCH" \
    --lr 1e-3 --warmup 50 --clip_grad 1 --ema 0.99 --sample_every 0 --save_every "$SAVE" $LOG --out_dir "$OUT/$name"
}
scratch="--preset dit-toy --rank 0 --latent student"
for c in $([[ $ARMS == *a* ]] && echo "$A_CHANNELS"); do dit "a-c$c" $scratch --cache "$OUT/cache/a$c"; done
if [[ $ARMS == *b* ]]; then
  dit b-plain $scratch --cache "$OUT/cache/zoo"
  dit b-aug $scratch --cache "$OUT/cache/zoo" --prefixes 4 8 12 --num_prefixes 2
fi
[[ $ARMS == *c* ]] || { python runs/c2i_report.py --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"; exit 0; }

# (c) the base on the f8 latent, merged to a folder; two students on f32c16
dit c-base --preset dit-toy --rank 0 --latent teacher --cache "$OUT/cache/zoo"
step "c-base merge" "$OUT/c-base/model" python lora.py --merge "$OUT/c-base/ckpt_$(printf %07d "$STEPS").pt" \
  --out_dir "$OUT/c-base/model"
for arm in aligned:200:150 unaligned:0:0; do
  IFS=: read -r name e h <<< "$arm"
  step "c-$name embed" "$OUT/c-$name-embed/model" python align.py --stage embed --base "$OUT/c-base/model" \
    --cache "$OUT/cache/zoo" --patch_size 1 --steps "$e" --batch_size 32 --lr 1e-3 $LOG --out_dir "$OUT/c-$name-embed"
  init=$OUT/c-$name-embed/model
  if [ "$h" -gt 0 ]; then
    step "c-$name head" "$OUT/c-$name-head/model" python align.py --stage head --init "$init" \
      --cache "$OUT/cache/zoo" --steps "$h" --batch_size 32 --lr 1e-3 --warmup 20 --sample_every 0 $LOG \
      --out_dir "$OUT/c-$name-head"
    init=$OUT/c-$name-head/model
  fi
  dit "c-$name" --init "$init" --rank 16 --alpha 16 --latent student --cache "$OUT/cache/zoo"
done

# --- accuracy against steps, the table and the curve
python runs/c2i_report.py --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
