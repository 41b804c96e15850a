"""The report of runs/c2i_toy.sh: class accuracy of every arm's checkpoints against steps, as a markdown table and a
curve PNG, plus each AE's ceiling (held-out ground truth through encode -> decode, scored the same way).

Each checkpoint is merged to a model folder (lora.py --merge, its EMA weights) and sampled by models/c2i.py
(sample_classes: 8 images per class, fixed noise, CFG 2, 20 Euler steps at the folder's shift); toy/classes.py
scores each image against its class.

Run: python runs/c2i_report.py --out out/c2i_toy
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.autoencoder import load_autoencoder  # noqa: E402
from models.c2i import sample_classes  # noqa: E402
from toy.classes import CLASSES, ClassDataset, correct  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default="out/c2i_toy", help="runs/c2i_toy.sh's output folder")
parser.add_argument("--per_class", type=int, default=8, help="images sampled per class")
parser.add_argument("--cfg", type=float, default=2.0, help="CFG scale")
parser.add_argument("--steps", type=int, default=20, help="Euler steps")
parser.add_argument(
    "--target", type=float, default=0.5, help="accuracy whose first step is compared (b)"
)
args = parser.parse_args()
out = Path(args.out)
A_ARMS = sorted((p.name for p in out.glob("a-c*")), key=lambda name: int(name[3:]))
ARMS = {
    **{arm: f"(a) unmasked f32{arm[2:]}" for arm in A_ARMS},  # a-c4, a-c16, a-c64
    "b-plain": "(b) 1.5 f32c16, plain",
    "b-aug": "(b) 1.5 f32c16, augmented",
    "c-base": "(c) base on f8c4 (teacher)",
    "c-aligned": "(c) f8 -> f32c16, aligned",
    "c-unaligned": "(c) f8 -> f32c16, no alignment",
}
labels = [str(k) for k in range(len(CLASSES)) for _ in range(args.per_class)]


def accuracy(folder: Path) -> float:
    images, _, _ = sample_classes(folder, labels, args.steps, args.cfg, seed=0, size=128)
    return sum(correct(img, int(k)) for img, k in zip(images, labels)) / len(labels)


def ceiling(ae_folder: str, n: int = 192) -> float:
    """Held-out images (another seed than the caches) through the AE, scored as samples are."""
    ae = load_autoencoder(ae_folder, tile_px=None).eval()
    data = ClassDataset(128, seed=123, split="test")
    items = [data[i] for i in range(n)]
    with torch.no_grad():
        rec = ae.decode(ae.encode(torch.stack([it["image"] for it in items])))
    return sum(correct(r, it["label"]) for r, it in zip(rec, items)) / n


# --- accuracy of every checkpoint
curves = {}
for arm, name in ARMS.items():
    for ckpt in sorted((out / arm).glob("ckpt_*.pt")):
        step = int(ckpt.stem.split("_")[1])
        folder = out / arm / f"model-{step:07d}"
        if not (folder / "model_index.json").is_file():
            merge = [sys.executable, "lora.py", "--merge", str(ckpt), "--out_dir", str(folder)]
            subprocess.run(merge, check=True, capture_output=True)
        curves.setdefault(arm, {})[step] = accuracy(folder)
        print(f"{name}: step {step} accuracy {curves[arm][step]:.3f}", flush=True)
(out / "curves.json").write_text(json.dumps(curves, indent=2) + "\n")

# --- the table
steps = sorted({s for c in curves.values() for s in c})
lines = [
    f"| arm | {' | '.join(str(s) for s in steps)} | AE ceiling |",
    "|---|" + "---|" * (len(steps) + 1),
]
caches = {"c-base": "zoo", **{arm: f"a{arm[3:]}" for arm in A_ARMS}}
for arm, c in curves.items():
    meta = json.loads((out / "cache" / caches.get(arm, "zoo") / "meta.json").read_text())
    ae = meta["teacher_ae"] if arm == "c-base" else meta["student_ae"]
    row = " | ".join(f"{c[s]:.3f}" if s in c else "-" for s in steps)
    lines.append(f"| {ARMS[arm]} | {row} | {ceiling(ae):.3f} |")


def first_reaching(c: dict, target: float):
    return next((s for s in sorted(c) if c[s] >= target), None)


if {"b-plain", "b-aug"} <= curves.keys():
    s_plain, s_aug = (first_reaching(curves[k], args.target) for k in ("b-plain", "b-aug"))
    ratio = f"{s_plain / s_aug:.2f}x" if s_plain and s_aug else "n/a (a run never reached it)"
    lines.append(
        f"\n(b) steps to accuracy {args.target}: plain {s_plain}, augmented {s_aug}: ratio {ratio}"
    )
report = "\n".join(lines)
(out / "report.md").write_text(report + "\n")
print(report)

# --- the curve (PIL: no plotting package in the environment)
W, H, M = 720, 420, 50
img = Image.new("RGB", (W + 220, H), "white")
draw = ImageDraw.Draw(img)
draw.rectangle([M, 10, W - 10, H - M], outline="black")
colors = ["#1f77b4", "#ff7f0e", "#17becf", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
s_max = max(steps) if steps else 1


def xy(step, acc):
    return M + (W - 10 - M) * step / s_max, H - M - (H - M - 10) * acc


for y in (0.0, 0.25, 0.5, 0.75, 1.0):
    draw.text((5, xy(0, y)[1] - 6), f"{y:.2f}", fill="black")
for s in steps:
    draw.text((xy(s, 0)[0] - 12, H - M + 5), str(s), fill="black")
draw.text((W // 2 - 60, H - 20), "training steps", fill="black")
for (arm, c), color in zip(curves.items(), colors):
    pts = [xy(s, c[s]) for s in sorted(c)]
    if len(pts) > 1:
        draw.line(pts, fill=color, width=3)
    for x, y in pts:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    k = list(curves).index(arm)
    draw.line([W + 5, 20 + 18 * k, W + 25, 20 + 18 * k], fill=color, width=3)
    draw.text((W + 30, 14 + 18 * k), ARMS[arm], fill="black")
img.save(out / "curve.png")
print(f"wrote {out / 'report.md'} and {out / 'curve.png'}")
