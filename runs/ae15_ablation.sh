#!/usr/bin/env bash
# DC-AE 1.5 Figure 3 in miniature: two toy f32c16 AEs (models/dcae.py "toy-f32c16"), trained on procedural shapes at
# 128 px with the same steps, seed and data; one with channel-prefix masking (DC-AE 1.5, K = 2 prefixes per step, one
# of them c' = C), one without (--mask none, DC-AE 1.0-style). MSE loss instead of L1 (ae15.py NOTE(deviation): L1
# alone stalls on a blank canvas for these sparse scenes). Then PSNR / SSIM / scorer accuracy of the reconstructions
# at c' = C/8, C/4, C/2, C on 128 held-out scenes at 128 and 256 px, the comparison strip (assets/ae15_ablation.png)
# and the tiled-decode check. Each training run holds the shared CPU lock (on a 2-core CPU about 0.3 s/step masked,
# 0.22 s/step unmasked when nothing else runs: 12.5 and 9 min).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/ae15_ablation}
TRAIN="--model toy-f32c16 --data shapes --size_px 128 --batch_size 16 --steps ${STEPS:-2500} --lr 3e-4 --warmup 100
       --l1_weight 0 --l2_weight 1 --seed 0 --device cpu --log_every 50 --sample_every 500 --save_every 500"
for MASK in prefix none; do
  flock /tmp/heavy.lock /usr/bin/time -f "$MASK: wall %e s, peak RSS %M KB" \
    python ae15.py $TRAIN --mask $MASK --out_dir $OUT/$MASK
done
for MASK in prefix none; do
  for PX in 128 256; do
    flock /tmp/heavy.lock python ae15.py --eval --init $OUT/$MASK/ae --data shapes --size_px $PX --eval_n 128 \
      --batch_size 16 --device cpu --out_dir $OUT/$MASK/eval$PX
  done
done
# the tiled-decode check uses the toy zoo's f32 AE (trained on zoomed crops): bash runs/ae15_toy.sh f32c16
flock /tmp/heavy.lock python runs/ae15_report.py --out $OUT --strip assets/ae15_ablation.png \
  --tiling_ae ${TILING_AE:-out/toy_ae/f32c16/ae}
