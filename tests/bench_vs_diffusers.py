"""Speed of our MMDiT (models/flux.py) against diffusers' FluxTransformer2DModel, same config, same weights.

A measurement script, not a test (timings are never asserted in tests). It lives in tests/ because it imports the
diffusers reference. Forward (no grad) and a training step (forward + backward) are timed alternately, ours then
theirs, after warm-up; the medians and the ratio ours / diffusers are printed (goal <= 1.0) and written as JSON.

Run:   python tests/bench_vs_diffusers.py                      # CPU, width 512, 2 + 4 blocks, 1024 + 64 tokens
       python tests/bench_vs_diffusers.py --device cuda --dtype bfloat16 --width 3072 --heads 24
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.flux import Flux, FluxParams  # noqa: E402

from flux_reference import run_diffusers  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument(
        "--heads", type=int, default=4, help="head dim = width / heads; 128 as in FLUX by default"
    )
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument(
        "--img_tokens",
        type=int,
        default=1024,
        help="a square grid of 2×2 patches of a 16-ch latent",
    )
    ap.add_argument("--txt_tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="out/bench_vs_diffusers.json")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    head_dim = args.width // args.heads
    # (16, 56, 56) at 128
    axes = (head_dim - 2 * (head_dim * 7 // 16), head_dim * 7 // 16, head_dim * 7 // 16)
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(
        in_channels=64,
        num_layers=args.double,
        num_single_layers=args.single,
        attention_head_dim=head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=axes,
    )
    params = FluxParams(
        hidden_size=args.width,
        num_heads=args.heads,
        depth=args.double,
        depth_single=args.single,
        axes_dim=axes,
    )
    ours = Flux(params)
    ours.load_state_dict(ref.state_dict(), strict=True)  # identical weights
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)

    side = int(args.img_tokens**0.5)
    g = torch.Generator().manual_seed(0)
    B = args.batch
    x = torch.randn(B, 16, 2 * side, 2 * side, generator=g).to(device, dtype)
    txt = torch.randn(B, args.txt_tokens, 4096, generator=g).to(device, dtype)
    y = torch.randn(B, 768, generator=g).to(device, dtype)
    t, w = (
        torch.full((B,), 0.5, device=device, dtype=dtype),
        torch.full((B,), 3.5, device=device, dtype=dtype),
    )
    runs = {
        "ours": lambda: ours(x, t, txt, y, w),
        "diffusers": lambda: run_diffusers(ref, x, t, txt, y, w, 2),
    }

    with torch.no_grad():
        err = (runs["ours"]().float() - runs["diffusers"]().float()).abs().max().item()
    print(
        f"config: width {args.width}, {args.double} + {args.single} blocks, {side * side} image + "
        f"{args.txt_tokens} text tokens, batch {B}, {args.dtype} on {device}, {torch.get_num_threads()} threads; "
        f"max |ours - diffusers| = {err:.2e}"
    )

    def train_step(name):
        model = ours if name == "ours" else ref
        model.zero_grad(set_to_none=True)
        runs[name]().float().square().mean().backward()

    results = {}
    for mode in ("forward", "train_step"):
        times = {"ours": [], "diffusers": []}
        for i in range(args.warmup + args.repeats):
            # alternate, so drift in machine load hits both alike
            for name in ("ours", "diffusers"):
                if mode == "forward":
                    with torch.no_grad():
                        dt = timed(runs[name], device)
                else:
                    dt = timed(lambda name=name: train_step(name), device)
                if i >= args.warmup:
                    times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[mode] = {
            **{f"{k}_s": v for k, v in med.items()},
            "ratio": med["ours"] / med["diffusers"],
        }
        print(
            f"{mode:10s}  ours {med['ours'] * 1e3:8.1f} ms   diffusers {med['diffusers'] * 1e3:8.1f} ms   "
            f"ratio {results[mode]['ratio']:.3f}  (median of {args.repeats})"
        )

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "max_abs_err": err, **results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
