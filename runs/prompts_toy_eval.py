"""Prompt adherence of toy models at square and non-square sizes: each model samples held-out
procedural prompts (captions no training scene used) at each size with its own sampler (its shift,
embedded guidance 3.5, 20 Euler steps; data.teacher_sample, the same code that generates a cache
from prompts), and toy/score.py scores each image. A non-square image is scored undistorted: its
longer side scaled to the scorer's 256 px, the rest padded with its own border (the background).

Run:    python runs/prompts_toy_eval.py --model out/prompts-toy/lora/model --model zoo/dcgen-1k \
            --size 256x256 --size 192x320 --size 320x192 --count 48 --out out/prompts-toy/eval
Output: a table on stdout (accuracy per model and size), eval.json and one grid PNG per model and size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import teacher_sample  # noqa: E402
from models.pipeline import load_pipeline  # noqa: E402
from toy.score import SCORE_PX, score  # noqa: E402
from toy.shapes import eval_specs  # noqa: E402


def for_scorer(img: Image.Image) -> Image.Image:
    """A SCORE_PX² image of `img` without distortion: the longer side scaled to SCORE_PX, the
    shorter padded by repeating the border pixels (the background)."""
    s = SCORE_PX / max(img.size)
    w, h = round(img.width * s), round(img.height * s)
    a = np.asarray(img.resize((w, h), Image.Resampling.BOX))
    top, left = (SCORE_PX - h) // 2, (SCORE_PX - w) // 2
    pad = ((top, SCORE_PX - h - top), (left, SCORE_PX - w - left), (0, 0))
    return Image.fromarray(np.pad(a, pad, mode="edge"))


@torch.no_grad()
def evaluate(model: str, specs, size: tuple[int, int], batch: int, grid: Path) -> dict:
    """One image per prompt (seed i for prompt i) at size (H, W); each scored against its prompt."""
    pipe = load_pipeline(model)
    results, thumbs = [], []
    for start in range(0, len(specs), batch):
        part = specs[start : start + batch]
        cond = pipe.text([s.caption for s in part])
        seeds = list(range(start, start + len(part)))
        z = teacher_sample(pipe, cond, pipe.text.null(1), seeds, size, 20, 3.5, 0.0)
        x = pipe.ae.decode(z).float().clamp(-1, 1)
        pixels = ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for px, spec in zip(pixels, part):
            img = Image.fromarray(px)
            results.append(score(for_scorer(img), spec))
            if len(thumbs) < 8:
                thumbs.append(img)
    sheet = Image.new("RGB", (sum(t.width for t in thumbs), size[0]))
    for i, t in enumerate(thumbs):
        sheet.paste(t, (i * size[1], 0))
    sheet.save(grid)
    checks = {k: sum(r["checks"][k] for r in results) / len(results) for k in results[0]["checks"]}
    accuracy = sum(r["correct"] for r in results) / len(results)
    return {"accuracy": accuracy, "checks": checks, "count": len(results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model folder (repeatable)")
    ap.add_argument("--size", action="append", default=[], help="HxW px (repeatable)")
    ap.add_argument("--count", type=int, default=48, help="held-out prompts")
    ap.add_argument("--batch", type=int, default=8, help="images per forward pass")
    ap.add_argument("--out", default="out/prompts-toy/eval", help="folder for eval.json and grids")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.size or ["256x256"]]
    specs, out = eval_specs(args.count), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for model in args.model:
        name = Path(model).name if Path(model).name != "model" else Path(model).parent.name
        for H, W in sizes:
            t0 = time.perf_counter()
            r = evaluate(model, specs, (H, W), args.batch, out / f"{name}-{H}x{W}.png")
            report[f"{name} {H}x{W}"] = r | {"model": model, "seconds": time.perf_counter() - t0}
            checks = " ".join(f"{k} {v:.2f}" for k, v in r["checks"].items())
            print(
                f"{name} {H}x{W}: accuracy {r['accuracy']:.3f} on {r['count']} prompts | {checks}"
            )
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| model | " + " | ".join(f"{H}x{W}" for H, W in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for model in args.model:
        name = Path(model).name if Path(model).name != "model" else Path(model).parent.name
        cells = [f"{report[f'{name} {H}x{W}']['accuracy']:.3f}" for H, W in sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
