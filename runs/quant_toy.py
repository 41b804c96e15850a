"""SVDQuant on the toy DC-Gen model (docs/quantization.md): NVFP4 and INT4, round-to-nearest and SVDQuant r = 32.
For each variant: quantize.py (calibrated with the sampler), the relative error of the model's velocity vs fp32 on
held-out latents at random noise levels, and prompt adherence on held-out prompts (runs/toy_eval.py), next to fp32.

Run:    python runs/quant_toy.py --model zoo/dcgen-1k --val_cache out/toy/cache/val256 --out out/toy/quant
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_eval  # noqa: E402

import quantize  # noqa: E402
from data import LatentCache  # noqa: E402
from models.pipeline import load_pipeline  # noqa: E402
from models.svdquant import load_quantized  # noqa: E402
from toy.shapes import eval_specs  # noqa: E402

VARIANTS = {
    "nvfp4-rtn": ("nvfp4", "rtn"),
    "nvfp4-svdquant": ("nvfp4", "svdquant"),
    "int4-rtn": ("int4", "rtn"),
    "int4-svdquant": ("int4", "svdquant"),
}


@torch.no_grad()
def velocity_error(ref, model, cache: LatentCache, rows: int = 64, seed: int = 0) -> float:
    """||v_q - v|| / ||v|| of the velocity on `rows` held-out latents, noise levels uniform in (0,
    1), guidance 3.5."""
    batch = cache.get(list(range(min(rows, len(cache)))), ["student", *sorted(cache.null)])
    x0 = batch.pop("student").float()
    g = torch.Generator().manual_seed(seed)
    sigma = torch.rand(len(x0), generator=g)
    x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * torch.randn(
        x0.shape, generator=g
    )
    kw = {"guidance": torch.full((len(x0),), 3.5)} if ref.params.guidance_embed else {}
    v, v_q = ref(x_t, sigma, **batch, **kw), model(x_t, sigma, **batch, **kw)
    return ((v_q - v).norm() / v.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="zoo/dcgen-1k", help="the toy model folder to quantise")
    ap.add_argument(
        "--val_cache",
        default="out/toy/cache/val256",
        help="held-out latent cache of the model's AE",
    )
    ap.add_argument(
        "--size", type=int, default=256, help="image size of calibration and evaluation"
    )
    ap.add_argument("--count", type=int, default=200, help="held-out prompts scored")
    ap.add_argument("--out", default="out/toy/quant", help="output folder")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    args = ap.parse_args()
    out, specs = Path(args.out), eval_specs(args.count)
    ref = load_pipeline(args.model, parts=("transformer",)).transformer.eval()
    cache = LatentCache(args.val_cache)
    report = {"fp32": toy_eval.evaluate(args.model, out / "fp32", specs, args.size, 20, 8, [])}
    print(f"fp32: accuracy {report['fp32']['accuracy']:.3f}", flush=True)
    for name in args.variants:
        precision, method = VARIANTS[name]
        flags = f"--precision {precision} --method {method} --calib_count 16 --calib_size {args.size} --calib_steps 20"
        # toy-sized search
        flags += f" --num_grids 10 --lowrank_iters 20 --device cpu --name {name}"
        quantize.main(["--model", args.model, *flags.split(), "--out_dir", str(out / name)])
        err = velocity_error(ref, load_quantized(out / name / "transformer").eval(), cache)
        r = toy_eval.evaluate(str(out / name), out / name / "eval", specs, args.size, 20, 8, [])
        report[name] = {"velocity_rel_err": err, **r}
        print(f"{name}: velocity rel err {err:.4f} | accuracy {r['accuracy']:.3f}", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
