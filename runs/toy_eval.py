"""Prompt adherence of toy models: sample.py on held-out procedural prompts (captions no training scene used), scored by
toy/score.py (the toy's GenEval). Prints one line per model, writes eval.json and a grid of the first images.

Run:    python runs/toy_eval.py --model zoo/krea --model zoo/dcgen-1k --size 256 --count 200 --out out/toy-eval
        python runs/toy_eval.py --model out/toy/base/model --name base --size 256 --extra=--cfg=4.5
        python runs/toy_eval.py --model zoo/krea --count 64 --swap    # does the placement follow the word order?
        python runs/toy_eval.py --model zoo/dcgen-4k --size 4096 --count 24 --split train   # does it fit its data?

--swap also samples every prompt with its two objects named the other way round ("a blue square above a red circle"
for "a red circle above a blue square"), from the same noise, and counts the prompts whose relation holds under both
wordings: a model that reads the caption as a bag of words puts the colours where the noise suggests, whatever order
they come in, and gets the relation right under at most one wording.

--split train samples the captions of the first --count training scenes instead (those runs/toy.sh's latent caches
hold): a model that scores much better there than on held-out prompts has memorised its data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sample  # noqa: E402
from toy.score import score  # noqa: E402
from toy.shapes import ShapesDataset, Spec, eval_specs  # noqa: E402


def evaluate(
    model: str, out: Path, specs: list, size: int, steps: int, batch: int, extra: list[str]
) -> dict:
    """Sample one image per held-out prompt (seed i for prompt i), then score each against its
    prompt."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(s.caption for s in specs) + "\n")
    t0 = time.perf_counter()
    paths = sample.main(
        [
            "--model",
            model,
            "--prompts",
            str(out / "prompts.txt"),
            "--size",
            str(size),
            "--steps",
            str(steps),
            "--batch",
            str(batch),
            "--out",
            str(out / "img.png"),
            *extra,
        ]
    )
    results, grid = [], Image.new("RGB", (8 * 128, 128))
    # one image in memory at a time (4K: 50 MB)
    for i, (path, spec) in enumerate(zip(paths, specs, strict=True)):
        img = Image.open(path).convert("RGB")
        results.append(score(img, spec))
        if i < 8:
            grid.paste(img.resize((128, 128), Image.Resampling.BOX), (128 * i, 0))
    checks = {k: sum(r["checks"][k] for r in results) / len(results) for k in results[0]["checks"]}
    grid.save(out / "grid.png")
    return {
        "model": model,
        "size": size,
        "steps": steps,
        "count": len(specs),
        "extra": extra,
        "accuracy": sum(r["correct"] for r in results) / len(results),
        "checks": checks,
        "seconds": time.perf_counter() - t0,
        "per_image": [r["checks"] for r in results],
    }


def swapped(spec: Spec) -> Spec:
    """The same scene with its objects named the other way round: 'a X above a Y' -> 'a Y above a
    X'."""
    return dataclasses.replace(
        spec, color_a=spec.color_b, shape_a=spec.shape_b, color_b=spec.color_a, shape_b=spec.shape_a
    )


def word_order(r: dict, r_swap: dict) -> dict:
    """Of the prompts whose two colours are found under both wordings: under how many wordings the
    relation holds."""
    found = lambda c: c["a_color"] and c["b_color"]  # noqa: E731
    pairs = [
        (c, d)
        for c, d in zip(r["per_image"], r_swap["per_image"], strict=True)
        if found(c) and found(d)
    ]
    n_right = [c["relation"] + d["relation"] for c, d in pairs]
    return {
        "pairs": len(pairs),
        "both": n_right.count(2),
        "one": n_right.count(1),
        "neither": n_right.count(0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", action="append", required=True, help="model folder (repeat for several)"
    )
    ap.add_argument(
        "--name",
        action="append",
        default=[],
        help="a name per --model (default: the folder's name)",
    )
    ap.add_argument("--size", type=int, default=256, help="image size in px")
    ap.add_argument("--count", type=int, default=200, help="prompts")
    ap.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="test: held-out captions (toy.shapes.eval_specs); train: those of the first --count training "
        "scenes, which runs/toy.sh's caches hold (seed 0): how well a model fits them",
    )
    ap.add_argument("--steps", type=int, default=20, help="Euler steps")
    ap.add_argument("--batch", type=int, default=8, help="images per forward pass")
    ap.add_argument(
        "--extra", action="append", default=[], help="more sample.py flags, e.g. --extra=--cfg=4.5"
    )
    ap.add_argument("--out", default="out/toy-eval", help="folder for images, grids and eval.json")
    ap.add_argument(
        "--swap",
        action="store_true",
        help="also sample each prompt with its objects' order swapped",
    )
    args = ap.parse_args()
    if args.split == "test":
        specs = eval_specs(args.count)
    else:
        scenes = ShapesDataset(seed=0, split="train")
        specs = [scenes.scene(i).spec for i in range(args.count)]
    out = Path(args.out)
    names = args.name or [
        Path(m).name if Path(m).name != "model" else Path(m).parent.name for m in args.model
    ]
    report = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    for name, model in zip(names, args.model, strict=True):
        r = evaluate(model, out / name, specs, args.size, args.steps, args.batch, args.extra)
        r["split"] = args.split
        report[name] = r
        checks = " ".join(f"{k} {v:.2f}" for k, v in r["checks"].items())
        print(
            f"{name}: accuracy {r['accuracy']:.3f} on {r['count']} {args.split} prompts at {args.size}px | "
            f"{checks} | {r['seconds']:.0f}s",
            flush=True,
        )
        if args.swap:
            r["swapped"] = evaluate(
                model,
                out / f"{name}-swapped",
                [swapped(s) for s in specs],
                args.size,
                args.steps,
                args.batch,
                args.extra,
            )
            r["word_order"] = w = word_order(r, r["swapped"])
            print(
                f"{name}: word order: of {w['pairs']} prompts with both colours found under both wordings, the "
                f"relation holds under both {w['both']}, one {w['one']}, neither {w['neither']}",
                flush=True,
            )
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
