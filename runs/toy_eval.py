"""Prompt adherence of toy models: sample.py on held-out procedural prompts (captions no training scene used), scored by
data.py's scorer (the toy's GenEval). Prints one line per model, writes eval.json and a grid of the first images.

Run:    python runs/toy_eval.py --model zoo/krea --model zoo/dcgen-1k --size 256 --count 200 --out out/toy-eval
        python runs/toy_eval.py --model out/toy/base/model --name base --size 256 --extra=--cfg=4.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import sample  # noqa: E402


def evaluate(model: str, out: Path, specs: list, size: int, steps: int, batch: int, extra: list[str]) -> dict:
    """Sample one image per held-out prompt (seed i for prompt i), then score each against its prompt."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(s.caption for s in specs) + "\n")
    t0 = time.perf_counter()
    paths = sample.main(["--model", model, "--prompts", str(out / "prompts.txt"), "--size", str(size), "--steps",
                         str(steps), "--batch", str(batch), "--out", str(out / "img.png"), *extra])  # fmt: skip
    images = [Image.open(p).convert("RGB") for p in paths]
    results = [data.score(img, s) for img, s in zip(images, specs, strict=True)]
    checks = {k: sum(r["checks"][k] for r in results) / len(results) for k in results[0]["checks"]}
    grid = Image.new("RGB", (8 * 128, 128))
    for i, img in enumerate(images[:8]):
        grid.paste(img.resize((128, 128), Image.Resampling.BOX), (128 * i, 0))
    grid.save(out / "grid.png")
    return {"model": model, "size": size, "steps": steps, "count": len(specs), "extra": extra,
            "accuracy": sum(r["correct"] for r in results) / len(results), "checks": checks,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model folder (repeat for several)")
    ap.add_argument("--name", action="append", default=[], help="a name per --model (default: the folder's name)")
    ap.add_argument("--size", type=int, default=256, help="image size in px")
    ap.add_argument("--count", type=int, default=200, help="held-out prompts (data.eval_specs)")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps")
    ap.add_argument("--batch", type=int, default=8, help="images per forward pass")
    ap.add_argument("--extra", action="append", default=[], help="more sample.py flags, e.g. --extra=--cfg=4.5")
    ap.add_argument("--out", default="out/toy-eval", help="folder for images, grids and eval.json")
    args = ap.parse_args()
    specs, out = data.eval_specs(args.count), Path(args.out)
    names = args.name or [Path(m).name if Path(m).name != "model" else Path(m).parent.name for m in args.model]
    report = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    for name, model in zip(names, args.model, strict=True):
        r = evaluate(model, out / name, specs, args.size, args.steps, args.batch, args.extra)
        report[name] = r
        checks = " ".join(f"{k} {v:.2f}" for k, v in r["checks"].items())
        print(f"{name}: accuracy {r['accuracy']:.3f} on {r['count']} held-out prompts at {args.size}px | {checks} | "
              f"{r['seconds']:.0f}s", flush=True)  # fmt: skip
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
