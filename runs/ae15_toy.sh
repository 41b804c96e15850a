#!/usr/bin/env bash
# The toy zoo's autoencoders (docs/toy-zoo.md), trained from scratch on procedural shapes, each under 30 min
# on a 2-core CPU:
#   toy-f32c16    DC-AE 1.5, f32, C = 16: DC-Gen's 1K role (patch 1: 8x8 tokens of dim 16 at 256 px)
#   toy-f64c32    DC-AE 1.5, f64, C = 32: DC-Gen's 4K role (patch 1: 8x8 tokens of dim 32 at 512 px, 64x64 at 4096)
#   toy-vae-f8c4  KL VAE, f8, C = 4: the FLUX VAE's role (the base DiT packs 2x2: 16x16 tokens of dim 16 at 256 px)
# They train on random crops of scenes rendered at up to 8x zoom (--zoom 1 8), so they also decode the large flat
# shapes of 1-4K images; MSE loss as in runs/ae15_ablation.sh. The f64 AE trains on 128 px crops of 256-1024 px
# renders (--zoom 2 8), a quarter of the cost of 256 px crops, then 500 steps on 256 px crops: a 128 px crop is a 2x2
# latent, all border, and a decoder that never saw an interior latent pixel smears 8x8 latents (at 512 px: PSNR 21.5
# dB before the second phase, 27.5 dB after). The f32 AE likewise ends with 1000 steps on whole 256 px scenes, the
# size its 1K role sees (ae15.py --eval, 200 held-out 256 px scenes: PSNR 27.9 -> 31.2 dB, and ground truth through
# it scores 0.49 -> 0.83 with toy/score.py's scorer). The f8 VAE's task is easy (800 steps). Outputs: $OUT/<name>/ae
# (diffusers layout, with the measured latent scale), which models.autoencoder.load_autoencoder reads. Pass names to
# train only some of them; the ones whose ae/ exists are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/toy_ae}
COMMON="--data shapes --lr 3e-4 --warmup 100 --l1_weight 0 --l2_weight 1 --seed 0 --device cpu
        --log_every 50 --sample_every 500 --save_every 500"
train() {  # name, then ae15.py flags
  local name=$1; shift
  if [ -f "$OUT/$name/ae/config.json" ]; then echo "$name: $OUT/$name/ae exists, skipped"; return; fi
  flock /tmp/heavy.lock /usr/bin/time -f "$name: wall %e s, peak RSS %M KB" \
    python ae15.py $COMMON "$@" --out_dir "$OUT/$name"
}
for name in ${@:-f32c16 f64c32 vae-f8c4}; do
  if [ -f "$OUT/$name/ae/config.json" ]; then echo "$name: $OUT/$name/ae exists, skipped"; continue; fi  # both phases
  case $name in
    f32c16) train f32c16-128 --model toy-f32c16 --size_px 128 --zoom 1 8 --batch_size 16 --steps ${STEPS:-2500}
        train f32c16 --init "$OUT/f32c16-128/ae" --size_px 256 --batch_size 16 --steps ${STEPS:-1000} ;;
    f64c32) train f64c32-128 --model toy-f64c32 --size_px 128 --zoom 2 8 --batch_size 16 --steps ${STEPS:-1500}
        train f64c32 --init "$OUT/f64c32-128/ae" --size_px 256 --zoom 1 4 --batch_size 8 --steps ${STEPS:-500} ;;
    vae-f8c4) train vae-f8c4 --model toy-vae-f8c4 --mask none --size_px 128 --zoom 1 8 --batch_size 16 \
        --steps ${STEPS:-800} ;;
    *) echo "unknown toy AE $name (f32c16, f64c32, vae-f8c4)"; exit 1 ;;
  esac
done
