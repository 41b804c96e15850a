"""The report of runs/ae15_ablation.sh: PSNR / SSIM table (markdown), the comparison strip, and the tiled-decode check.

Run: python runs/ae15_report.py --out out/ae15_ablation --strip assets/ae15_ablation.png
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import to_tensor  # noqa: E402
from models.autoencoder import load_autoencoder  # noqa: E402
from toy.shapes import ShapesDataset, render  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default="out/ae15_ablation", help="the ablation's output folder")
parser.add_argument(
    "--strip", default="assets/ae15_ablation.png", help="where to write the comparison strip"
)
parser.add_argument("--rows", type=int, default=3, help="held-out scenes in the strip")
parser.add_argument(
    "--tiling_ae", default="out/toy_ae/f32c16/ae", help="AE folder for the tiled-decode check"
)
args = parser.parse_args()
out = Path(args.out)
runs = {"masked (DC-AE 1.5)": out / "prefix", "unmasked (1.0-style)": out / "none"}
aes = {name: load_autoencoder(d / "ae", tile_px=None) for name, d in runs.items()}
C = next(iter(aes.values())).latent_channels

# --- the table: PSNR (dB) / SSIM / scorer accuracy of the reconstructions per prefix, from ae15.py --eval
heads = " | ".join(f"c'={c}" for c in (C // 8, C // 4, C // 2, C))
print(f"| AE | eval px | {heads} |")
print("|---|---|" + "---|" * 4)
for px in (128, 256):
    for name, d in runs.items():
        res = json.loads((d / f"eval{px}" / "eval.json").read_text())
        cells = [
            f"{res[str(c)]['psnr']:.2f} / {res[str(c)]['ssim']:.3f} / {res[str(c)]['acc']:.2f}"
            for c in (C // 8, C // 4, C // 2, C)
        ]
        print(f"| {name} | {px} | {' | '.join(cells)} |")

# --- the strip: input, then each AE at c' = C/4, C/2, C, for a few held-out scenes
prefixes = (C // 4, C // 2, C)
ds = ShapesDataset(128, seed=10_000, split="test")  # ae15.py's eval scenes
x = torch.stack([ds[i]["image"] for i in range(args.rows)])
cols = [x]
with torch.no_grad():
    for ae in aes.values():
        z = ae.encode(x)
        cols += [ae.decode(z[:, :c]).clamp(-1, 1) for c in prefixes]
grid = torch.cat([torch.cat(list(col), dim=1) for col in cols], dim=2)  # (3, rows·128, 7·128)
head = 16
img = Image.new("RGB", (grid.shape[2], grid.shape[1] + 2 * head), "white")
img.paste(
    Image.fromarray(((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()), (0, 2 * head)
)
draw = ImageDraw.Draw(img)
for k, name in enumerate(aes):
    draw.text((128 + k * 3 * 128 + 4, 2), name, fill="black")
for j, label in enumerate(["input"] + [f"c'={c}" for c in prefixes] * 2):
    draw.text((j * 128 + 4, head + 2), label, fill="black")
Path(args.strip).parent.mkdir(parents=True, exist_ok=True)
# palette PNG: small file
img.quantize(colors=256, dither=Image.Dither.NONE).save(args.strip, optimize=True)
print(f"strip: {args.strip} ({img.width}x{img.height})")

# --- tiling: decode the latent of a 1024² scene in one pass and in 256 px tiles (64 px overlap), compare. The AE is
# --tiling_ae: the toy f32 AE of runs/ae15_toy.sh, trained on zoomed crops; the ablation's AEs saw only whole 128 px
# scenes and do not reconstruct 8x larger shapes, tiled or not, so a seam test on them would measure nothing.
ae = load_autoencoder(args.tiling_ae, tile_px=None)
# (1, 3, 1024, 1024)
x = to_tensor(render(ShapesDataset(1024, seed=10_000, split="test").scene(0), 1024))[None]
with torch.no_grad():
    z = ae.encode(x)  # (1, C, 32, 32)
    full = ae.decode(z).clamp(-1, 1)
    ae.tile_px, ae.tile_overlap_px = 256, 64
    tiles = ae.decode(z).clamp(-1, 1)
    z_tiles = ae.encode(x)
q = lambda t: ((t + 1) * 127.5).round()  # 8-bit levels
diff = (q(tiles) - q(full)).abs()
psnr = lambda t: 10 * torch.log10(4 / (t - x).pow(2).mean())
print(
    f"tiled decode (256 px tiles, 64 px overlap) vs one pass at 1024²: mean |diff| {diff.mean():.3f} / 255, "
    f"99.9th percentile {diff.flatten().quantile(0.999):.0f} / 255, max {diff.max():.0f} / 255; reconstruction PSNR "
    f"one pass {psnr(full):.2f} dB, tiled {psnr(tiles):.2f} dB; tiled encode: mean |z diff| "
    f"{(z_tiles - z).abs().mean():.4f} (latent std {z.std():.3f})"
)
panel = torch.cat([x[0], full[0], tiles[0], (diff[0] / 127.5 * 20 - 1).clamp(-1, 1)], dim=2)
Image.fromarray(((panel + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(
    out / "tiling.png"
)
print(f"tiling panel (input | one pass | tiled | 20x |diff|): {out / 'tiling.png'}")
