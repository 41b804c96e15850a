"""Quantisation ablation on a FLUX-shaped random layer stack: relative output error vs fp32 of {round-to-nearest,
SVDQuant} x {NVFP4, INT4}, with the outlier input channels real FLUX activations have injected (inject_outliers).
Written as ablation.json and a markdown table. Paper context: SVDQuant (arXiv 2411.05007) Table 1; DC-Gen's NVFP4 step.

Run: bash runs/quant_ablation.sh            (width 3072, 1 double + 1 single block; ~20 min on 2 CPU cores)
     python runs/quant_ablation.py --preset tiny --num_grids 4 --lowrank_iters 3 --out_dir out/qa-smoke
"""

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import parse_config, print0  # noqa: E402
from models.flux import PRESETS, Flux  # noqa: E402
from models.svdquant import flux_layers, split_proj_out  # noqa: E402
from quantize import Config as QuantizeConfig  # noqa: E402
from quantize import calibrate, quantize_adaln, quantize_model, random_batches, run_batches  # noqa: E402


@dataclass
class Config(QuantizeConfig):
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    preset: str = "flux-dev"  # models/flux.py preset whose width the 1 + 1-block stack takes
    outlier_channels: int = 16  # input channels per quantised layer turned into outliers
    outlier_scale: float = 20.0  # their magnitude factor
    out_dir: str = "out/quant-ablation"  # ablation.json, log.txt
    # fmt: on


@torch.no_grad()
def inject_outliers(model: Flux, k: int, scale: float, gen: torch.Generator) -> None:
    """Give every quantised layer's input k outlier channels, as real FLUX activations have:
    - qkv / fc1 inputs: +scale on k channels of the AdaLN scale chunks, so x·(1 + scale) is ~scale times larger there;
    - attention-out inputs: k rows of the v projection times `scale`, the matching out-projection columns / scale
      (attention is linear in v: the network computes the same function);
    - fc2 inputs: k rows of fc1 times `scale`, fc2 columns / scale (close to the same function through GELU)."""
    D = model.params.hidden_size

    def adaln(lin, chunks):
        idx = torch.randperm(D, generator=gen)[:k]
        for c in chunks:
            lin.bias[c * D + idx] += scale

    def pair(a, b):
        idx = torch.randperm(a.out_features, generator=gen)[:k]
        a.weight[idx] *= scale
        a.bias[idx] *= scale
        b.weight[:, idx] /= scale

    for blk in model.transformer_blocks:
        adaln(blk.norm1.linear, (1, 4))
        adaln(blk.norm1_context.linear, (1, 4))
        pair(blk.attn.to_v, blk.attn.to_out[0])
        pair(blk.attn.add_v_proj, blk.attn.to_add_out)
        pair(blk.ff.net[0].proj, blk.ff.net[2])
        pair(blk.ff_context.net[0].proj, blk.ff_context.net[2])
    for blk in model.single_transformer_blocks:
        adaln(blk.norm.linear, (1,))
        pair(blk.attn.to_v, blk.proj_out.linears[0])
        pair(blk.proj_mlp, blk.proj_out.linears[1])


def ablation(cfg: Config, device, log: Path) -> None:
    """{RTN, SVDQuant} x {NVFP4, INT4} on a random 1 double + 1 single block stack with outlier
    inputs: relative error vs fp32 of the stack's output, and of every quantised linear on held-out
    input rows (mean over linears)."""
    params = replace(PRESETS[cfg.preset], depth=1, depth_single=1)
    model = Flux(params).to(device).eval()  # random init (seeded), fp32
    split_proj_out(model)
    inject_outliers(
        model, cfg.outlier_channels, cfg.outlier_scale, torch.Generator().manual_seed(cfg.seed)
    )
    calib = list(random_batches(params, cfg, cfg.seed, cfg.calib_batches))
    held_out = list(random_batches(params, cfg, cfg.seed + 1, 2))
    groups, _ = flux_layers(model)
    names = [layer[0] for g in groups for layer in g]
    stats = calibrate(model, lambda: run_batches(model, calib), names, cfg.reservoir_rows, cfg.seed)
    held = calibrate(
        model, lambda: run_batches(model, held_out), names, cfg.reservoir_rows, cfg.seed + 1
    )
    ref = run_batches(model, held_out)
    rel = lambda a, b: math.sqrt(
        sum((x - y).square().sum().item() for x, y in zip(a, b))
        / sum(y.square().sum().item() for y in b)
    )
    floor = copy.deepcopy(model)
    quantize_adaln(floor)  # what every row below shares: only the AdaLN linears quantised (W4A16)
    results = [
        dict(
            precision="-",
            method="adaln-w4a16-only",
            output_rel_err=rel(run_batches(floor, held_out), ref),
            layer_rel_err=None,
            seconds=0,
        )
    ]
    del floor
    for precision in ("nvfp4", "int4"):
        for method in ("rtn", "svdquant"):
            t0, qm = time.time(), copy.deepcopy(model)
            quantize_model(qm, stats, replace(cfg, precision=precision, method=method), log)
            layer_errs = []
            with torch.no_grad():
                for layer in (layer for g in groups for layer in g):
                    x = held[layer[0]].x.to(device)  # held-out rows of this layer's input
                    layer_errs += [
                        rel([qm.get_submodule(n)(x)], [model.get_submodule(n)(x)]) for n in layer
                    ]
            r = dict(
                precision=precision,
                method=method,
                output_rel_err=rel(run_batches(qm, held_out), ref),
                layer_rel_err=sum(layer_errs) / len(layer_errs),
                seconds=round(time.time() - t0),
            )
            results.append(r)
            print0(
                f"ablation | {precision:<5} {method:<8} | output rel_err {r['output_rel_err']:.4f} | "
                f"layer rel_err {r['layer_rel_err']:.4f} | dt {r['seconds']}s",
                log_file=log,
            )
    (Path(cfg.out_dir) / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    print0(
        "\n| precision | method | stack output rel. error | mean layer rel. error (held-out rows) |",
        log_file=log,
    )
    print0("|---|---|---|---|", log_file=log)
    for r in results:
        layer = "-" if r["layer_rel_err"] is None else f"{r['layer_rel_err']:.4f}"
        print0(
            f"| {r['precision']} | {r['method']} | {r['output_rel_err']:.4f} | {layer} |",
            log_file=log,
        )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv)
    device = torch.device(
        cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    torch.manual_seed(cfg.seed)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    ablation(cfg, device, Path(cfg.out_dir) / "log.txt")


if __name__ == "__main__":
    main()
