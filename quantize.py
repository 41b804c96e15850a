"""quantize.py: SVDQuant W4A4 post-training quantisation of a FLUX-layout transformer (the NVFP4 step of
DC-Gen's abstract, arXiv 2509.25180), emulated in PyTorch and exported to Nunchaku's checkpoint format.

SVDQuant (Li et al., ICLR 2025, arXiv 2411.05007 §4), per linear layer y = x·Wᵀ + b of every transformer block:
  1. smoothing    λ_j = max|x_j|^α / max|W_j|^β, x̂ = x/λ, Ŵ = W·diag(λ): input outliers move into the weight;
                  (α, β) from a grid by output error (DeepCompressor calib/smooth.py, configs/svdquant/__default__.yaml)
  2. low rank     Ŵ = L_up·L_down + R, rank r = 32 in 16 bits, refined L <- SVD_r(Ŵ - Q(Ŵ - L)) (calib/lowrank.py)
  3. 4-bit        y ≈ Q(x̂)·Q(R)ᵀ + x̂·L_downᵀ·L_upᵀ + b: NVFP4 (E2M1, FP8 scale per 16) or INT4 (group 64)
AdaLN linears become W4A16; embedders, norm_out and proj_out stay 16-bit (Nunchaku's layout; models/svdquant.py).
Steps 1-3 for one smoothing group are models/svdquant.py's svdquant_group; this script calibrates, runs it group
by group, saves the emulated model and writes Nunchaku's file (models/nunchaku.py).

Run:      python quantize.py --model zoo/dcgen-4k --calib_size 4096 --name toy-dcgen-4k --out_dir out/quant-toy
          python quantize.py --model DC-Gen-FLUX.1-Krea-Dev-v1.0-Res4K --calib_prompts prompts.txt --calib_size 4096
          (one process on one GPU: calibration and the per-layer search are sequential, there is no torchrun variant)
Smoke:    python quantize.py --preset tiny --device cpu --num_grids 4 --lowrank_iters 3 --out_dir out/quantize-smoke
Ablation: bash runs/quant_ablation.sh   (runs/quant_ablation.py: RTN vs SVDQuant x NVFP4 vs INT4, FLUX-shaped stack)
Check:    add --check on a Blackwell (NVFP4) / Ada (INT4) GPU with Nunchaku installed: Nunchaku vs the emulation
Input:    a model folder (calibrated by running the sampler over --calib_count prompts), a FLUX transformer folder
          with inputs recorded from the sampler (--calib_file: x, t, txt, y[, guidance] stacked), or --preset (random).
Output:   out_dir/transformer/ (the emulated model: models.svdquant.load_quantized; for a model folder input, out_dir
          is a model folder too: sample.py --model out_dir generates with the quantised model),
          out_dir/svdq-{fp4|int4}_r{rank}-{name}.safetensors (Nunchaku's NunchakuFluxTransformer2DModelV2 loads it),
          out_dir/config.json, out_dir/log.txt
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor

from common import (
    Device,
    denoise,
    get_noise,
    get_schedule,
    guided_velocity,
    init_dist,
    load_ckpt,
    parse_config,
    print0,
    run_info,
    run_main,
    save_ckpt,
    save_config,
    save_pretrained,
    seed_everything,
    shift_for,
)
from models.flux import PRESETS, Flux, position_ids
from models.nunchaku import check_rank, nunchaku_metadata, nunchaku_problem, nunchaku_state_dict
from models.pipeline import load_pipeline, write_pipeline
from models.svdquant import (
    Layer,
    W4A16Linear,
    act_shift,
    encode,
    flux_layers,
    install,
    load_quantized,
    quantize_weight,
    set_module,
    split_proj_out,
    svdquant_group,
)
from toy.shapes import ShapesDataset

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    model: str = ""  # model folder (calibrated with the sampler) or FLUX transformer folder; "" = random `preset`
    preset: str = "tiny"  # models/flux.py preset of the random model (used when `model` is "")
    patch_size: int = 0  # latent patch size of `model` (0: its config's `_patch_size`, else 1)
    out_dir: str = "out/quantize"  # transformer/ (emulation), svdq-*.safetensors (Nunchaku), config.json, log.txt
    name: str = "model"  # model name in the export file name svdq-{fp4|int4}_r{rank}-{name}.safetensors
    precision: Literal["nvfp4", "int4"] = "nvfp4"  # nvfp4 (Blackwell RTX 50) | int4 (Turing/Ampere/Ada)
    method: Literal["svdquant", "rtn"] = "svdquant"  # rtn: round-to-nearest W4A4, no smoothing or low rank (ablation)
    rank: int = 32  # rank r of the 16-bit low-rank branch
    num_grids: int = 20  # α grid i/n, i = 1..n-1, of the smoothing search (DeepCompressor 20; its fast.yaml 10)
    lowrank_iters: int = 100  # at most this many refinements L <- SVD_r(Ŵ - Q(Ŵ - L)); stops when the error rises
    svd_niter: int = 4  # power iterations of the randomised truncated SVD
    calib_file: str = ""  # safetensors of recorded model inputs x, t, txt, y[, guidance], each (N, ...); "" = random
    calib_prompts: str = ""  # model folder: prompt file for the sampler (one per line); "" = procedural captions
    calib_count: int = 64  # model folder: prompts run through the sampler, every step's inputs recorded
    calib_steps: int = 20  # model folder: sampler steps
    calib_size: int = 1024  # model folder: image size in px of the calibration samples
    calib_batch_size: int = 2  # samples per calibration forward
    calib_batches: int = 4  # random calibration forwards (when calib_file is "")
    latent_hw: int = 16  # side of the random calibration latents, latent pixels
    txt_len: int = 32  # text tokens of the random calibration inputs
    guidance: float = 3.5  # embedded guidance scale of the random calibration inputs (guidance-distilled models)
    reservoir_rows: int = 512  # input rows kept per layer (uniform sample) for the output-error objective
    check: bool = False  # load the export with the real Nunchaku (Blackwell/Ada GPU) and compare one forward
    device: Device = "auto"  # cuda | cpu | auto
    seed: int = 0
    dry_run: bool = False  # print the config and the layer counts, then exit
    # fmt: on


# ----------------------------------------------------------------------------------------------------------------
# helpers: calibration


class InputStats:
    """What one linear saw: per-input-channel min and max over every row, and a uniform sample of
        `rows` rows (bottom-k reservoir: each row draws a random key, the rows with the k smallest keys
        are kept).

    NOTE(deviation): DeepCompressor keeps every calibration activation (128 prompts x all steps) on
        disk; the extremes here are exact over all rows, the output-error objective uses the sample."""

    def __init__(self, rows: int, generator: torch.Generator):
        self.rows, self.gen = rows, generator
        self.min = self.max = self.x = self.keys = None

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])  # (N, in), on the model's device
        mn, mx = x.amin(0).float().cpu(), x.amax(0).float().cpu()
        self.min = mn if self.min is None else torch.minimum(self.min, mn)
        self.max = mx if self.max is None else torch.maximum(self.max, mx)
        # The k smallest keys of (kept ∪ new) are among (kept ∪ the k smallest new): only k rows
        # leave the device.
        keys = torch.rand(x.shape[0], generator=self.gen)
        new = keys.topk(min(self.rows, len(keys)), largest=False).indices
        x, keys = x[new.to(x.device)].float().cpu(), keys[new]
        if self.x is not None:
            x, keys = torch.cat([self.x, x]), torch.cat([self.keys, keys])
        keep = keys.topk(min(self.rows, len(keys)), largest=False).indices
        self.x, self.keys = x[keep], keys[keep]


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    run: Callable[[], None],
    names: list[str],
    rows: int = 512,
    seed: int = 0,
):
    """Hook the inputs of the linears `names`, call `run()` (any code that runs the model: the
    sampler over N prompts at its timesteps, or a loop over recorded inputs), unhook. Returns {name:
    InputStats}."""
    gen = torch.Generator().manual_seed(seed)
    stats = {n: InputStats(rows, gen) for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: stats[n].update(a[0]))
        for n in names
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    unseen = [n for n, s in stats.items() if s.x is None]
    if unseen:
        raise RuntimeError(f"calibration never ran {len(unseen)} hooked layers, e.g. {unseen[:3]}")
    return stats


def random_batches(params, cfg: Config, seed: int, batches: int) -> Iterator[dict]:
    """Random model inputs: latents (B, C, H, W), noise levels t, T5-like txt, pooled y, guidance."""
    g = torch.Generator().manual_seed(seed)
    B, hw = cfg.calib_batch_size, cfg.latent_hw
    for _ in range(batches):
        yield dict(
            x=torch.randn(B, params.in_channels, hw, hw, generator=g),
            t=torch.rand(B, generator=g),
            txt=torch.randn(B, cfg.txt_len, params.context_in_dim, generator=g),
            y=torch.randn(B, params.vec_in_dim, generator=g),
            guidance=torch.full((B,), cfg.guidance) if params.guidance_embed else None,
        )


def file_batches(path: str, batch_size: int) -> Iterator[dict]:
    """Recorded model inputs (safetensors): x (N, C, H, W), t (N,), txt (N, L, 4096), y (N, 768)[,
    guidance (N,)]."""
    d = load_ckpt(path)
    for i in range(0, d["x"].shape[0], batch_size):
        yield {
            k: d[k][i : i + batch_size] if k in d else None
            for k in ("x", "t", "txt", "y", "guidance")
        }


@torch.no_grad()
def run_batches(model: Flux, batches: list[dict]) -> list[Tensor]:
    # Flux casts x, txt, y to its dtype and keeps t, guidance in float32
    device = next(model.parameters()).device
    return [
        model(**{k: None if v is None else v.to(device) for k, v in b.items()}) for b in batches
    ]


def sampler_run(pipe, cfg: Config, device) -> Callable[[], None]:
    """Calibration as SVDQuant does it: the sampler itself over N prompts, so every layer sees its
    inputs at every noise level of a real generation (the model's own guidance, shift and
    resolution)."""
    if cfg.calib_prompts:
        prompts = [
            ln.strip() for ln in Path(cfg.calib_prompts).read_text().splitlines() if ln.strip()
        ]
    # the toy's: procedural captions (seed + 1: not the scenes the toy models trained on first)
    else:
        prompts = [ShapesDataset(seed=cfg.seed + 1)[i]["caption"] for i in range(cfg.calib_count)]
    prompts = prompts[: cfg.calib_count]
    model, f, p = pipe.transformer, pipe.ae.spatial_factor, pipe.patch_size()
    C, h = model.params.in_channels, cfg.calib_size // f
    sigmas = get_schedule(cfg.calib_steps, shift_for(pipe.shift, (C, h, h), p, pipe.shift_value))
    distilled = model.params.guidance_embed

    @torch.no_grad()
    def run():
        for i in range(0, len(prompts), cfg.calib_batch_size):
            batch = prompts[i : i + cfg.calib_batch_size]
            cond, null = pipe.text(batch), None if distilled else pipe.text.null(len(batch))
            v = guided_velocity(
                model, cond, null, cfg.guidance if distilled else None, 1.0 if distilled else 4.5
            )
            denoise(v, get_noise((len(batch), C, h, h), cfg.seed + i).to(device), sigmas)

    return run


# ----------------------------------------------------------------------------------------------------------------
# helpers: quantisation, smoothing group by smoothing group (the search itself: models/svdquant.py)


def make_layer(model: Flux, names: list[str], st: InputStats, fp4: bool, device) -> Layer:
    """The search's view of one fused layer: its float weight and bias, the calibration rows and
    their reference output, and the input range (shifted for INT4 post-GELU inputs)."""
    lins = [model.get_submodule(n) for n in names]
    w = torch.cat([m.weight.detach().float() for m in lins]).to(device)
    b = torch.cat(
        [
            m.bias.detach().float() if m.bias is not None else w.new_zeros(m.out_features)
            for m in lins
        ]
    )
    s = act_shift(names[0], fp4)
    x = st.x.float().to(device)
    xmax = torch.maximum((st.max + s).abs(), (st.min + s).abs()).to(device)
    return Layer(
        names, [m.out_features for m in lins], w, b.float().to(device), x, x @ w.T, xmax, s
    )


@torch.no_grad()
def quantize_model(model: Flux, stats: dict, cfg: Config, log: Path | None = None) -> None:
    """In place: every W4A4 group of flux_layers through svdquant_group, then the AdaLN linears to
    W4A16."""
    fp4, device = cfg.precision == "nvfp4", next(model.parameters()).device
    groups, _ = flux_layers(model)
    for i, group in enumerate(groups):
        t0 = time.time()
        layers = [make_layer(model, names, stats[names[0]], fp4, device) for names in group]
        lam, (alpha, beta), results = svdquant_group(layers, cfg, fp4)
        for layer, res in zip(layers, results):
            install(model, layer, lam, res, fp4)
        rel = math.sqrt(
            sum(r.err for r in results) / sum(layer.y.square().sum().item() for layer in layers)
        )
        print0(
            f"group {i + 1:03d}/{len(groups):03d} | {'+'.join(layer.names[0] for layer in layers):<40} | "
            f"alpha {alpha:.2f} beta {beta:.2f} | iters {max(r.iters for r in results):3d} | rel_err {rel:.4f} | "
            f"dt {1000 * (time.time() - t0):.0f}ms",
            log_file=log,
        )
    quantize_adaln(model)


@torch.no_grad()
def quantize_adaln(model: Flux) -> None:
    """In place: the AdaLN linears to W4A16, INT4 group 64 round-to-nearest (DeepCompressor's
    extra_wgts)."""
    for name in flux_layers(model)[1]:
        lin = model.get_submodule(name)
        q, s, _ = quantize_weight(lin.weight.float(), fp4=False)
        m = W4A16Linear(lin.in_features, lin.out_features, device=lin.weight.device)
        m.load_state_dict(dict(qweight=encode(q, fp4=False), wscales=s, bias=lin.bias))
        set_module(model, name, m)


# ----------------------------------------------------------------------------------------------------------------
# helpers: the real Nunchaku (--check)


@torch.no_grad()
def nunchaku_check(export: Path, folder: Path, cfg: Config, device, log: Path) -> None:
    """One forward of Nunchaku's NunchakuFluxTransformer2DModelV2 on the export vs our emulation,
    same inputs."""
    from nunchaku.models.transformers.transformer_flux_v2 import NunchakuFluxTransformer2DModelV2

    ours = load_quantized(folder, device)
    theirs = NunchakuFluxTransformer2DModelV2.from_pretrained(
        str(export), device=device, torch_dtype=torch.bfloat16
    )
    b = next(random_batches(ours.params, cfg, cfg.seed + 2, 1))
    b = {k: None if v is None else v.to(device, torch.bfloat16) for k, v in b.items()}
    v = ours(**b).float()
    p, (H, W), L = ours.params.patch_size, b["x"].shape[2:], b["txt"].shape[1]
    # diffusers' packing
    tokens = rearrange(b["x"], "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
    ids = position_ids(L, H // p, W // p, device).float()
    out = theirs(
        hidden_states=tokens,
        encoder_hidden_states=b["txt"],
        pooled_projections=b["y"],
        timestep=b["t"],
        img_ids=ids[L:],
        txt_ids=ids[:L],
        guidance=b["guidance"],
        return_dict=False,
    )[0]
    v_theirs = rearrange(
        out.float(), "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=H // p, p1=p, p2=p
    )
    rel = ((v_theirs - v).norm() / v.norm()).item()
    print0(
        f"check | nunchaku vs emulation | rel_err {rel:.4f}{' | MISMATCH' if rel > 0.05 else ''}",
        log_file=log,
    )
    if rel > 0.05:
        raise SystemExit(
            f"--check: Nunchaku's output differs from the emulation by {rel:.1%} (> 5%); see {log}"
        )


# ----------------------------------------------------------------------------------------------------------------
# helpers: main's steps


def check_flags(cfg: Config) -> None:
    """Bad flags, and a --check that cannot run, fail here: before hours of work, not after."""
    if cfg.precision not in ("nvfp4", "int4"):
        raise ValueError(f"unknown precision {cfg.precision!r}; choose from 'nvfp4', 'int4'")
    if cfg.method not in ("svdquant", "rtn"):
        raise ValueError(f"unknown method {cfg.method!r}; choose from 'svdquant', 'rtn'")
    if cfg.check and (problem := nunchaku_problem(cfg.precision == "nvfp4")):
        raise SystemExit(f"--check cannot run: {problem}")
    # a transformer folder, no sampler
    bare = cfg.model and not (Path(cfg.model) / "transformer").is_dir()
    if bare and not cfg.calib_file:
        raise ValueError(
            f"--model {cfg.model} is a transformer folder: calibrate it on inputs recorded from the "
            "sampler (--calib_file), or pass the whole model folder so the sampler runs"
        )


def calibration_run(cfg: Config, pipe, model: Flux, device) -> tuple[Callable[[], None], str]:
    """What calibration runs, and a description for the log: the sampler over N prompts (a model
    folder), the recorded inputs of --calib_file, or random inputs."""
    if pipe is not None:
        return sampler_run(
            pipe, cfg, device
        ), f"sampler {cfg.calib_count} prompts x {cfg.calib_steps} steps"
    if cfg.calib_file:
        batches = list(file_batches(cfg.calib_file, cfg.calib_batch_size))
    else:
        batches = list(random_batches(model.params, cfg, cfg.seed, cfg.calib_batches))
    return (lambda: run_batches(model, batches)), f"batches {len(batches)}"


def save_outputs(model: Flux, cfg: Config, pipe, out: Path) -> tuple[Path, Path]:
    """The emulated model (models.svdquant.load_quantized reads it) and Nunchaku's single-file
    export. Returns the transformer folder and the export file."""
    fp4 = cfg.precision == "nvfp4"
    rank = cfg.rank if cfg.method == "svdquant" else 0
    folder = out / "transformer"
    q = dict(precision=cfg.precision, method=cfg.method, rank=rank, config=asdict(cfg))
    config = {**model.diffusers_config(), "_svdquant": q}
    if pipe is not None:  # a whole model folder: sample.py --model out_dir runs the quantised model
        write_pipeline(
            out,
            model,
            pipe.folder / "vae",
            pipe.folder,
            pipe.shift,
            pipe.shift_value,
            config=config,
        )
    else:
        save_pretrained(folder, model.state_dict(), config)
    sd = nunchaku_state_dict(model)
    packed_rank = next(v.shape[1] for k, v in sd.items() if k.endswith(".lora_down"))
    export = out / f"svdq-{'fp4' if fp4 else 'int4'}_r{rank}-{cfg.name}.safetensors"
    save_ckpt(sd, export, metadata=nunchaku_metadata(model, fp4, packed_rank))
    return folder, export


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv)
    check_flags(cfg)
    # --- device (one process: no process group); --device cuda without a GPU fails before out_dir is written
    device = init_dist(cfg.device).device
    out = Path(cfg.out_dir)
    save_config(cfg, out)
    log = out / "log.txt"
    seed_everything(cfg.seed)
    print0(json.dumps(run_info()), log_file=log)

    # --- model: a model folder (with its text encoder and AE, so the sampler can calibrate), or a bare transformer
    pipe = (
        load_pipeline(cfg.model, device=device)
        if (Path(cfg.model) / "transformer").is_dir()
        else None
    )
    if pipe is not None:
        model = pipe.transformer
    elif cfg.model:
        model = Flux.from_pretrained(cfg.model, patch_size=cfg.patch_size or None, device=device)
    else:
        model = Flux(PRESETS[cfg.preset]).to(device).eval()  # random weights: smoke tests
    split_proj_out(model)
    groups, w4a16 = flux_layers(model)
    n_w4a4 = sum(len(layer) for g in groups for layer in g)
    if cfg.method == "svdquant":
        check_rank(model, groups, cfg.rank)
    n_params = sum(p.numel() for p in model.parameters())
    counts = f"W4A4 linears {n_w4a4} in {len(groups)} smoothing groups | W4A16 AdaLN linears {len(w4a16)}"
    print0(f"model | params {n_params:,} | {counts}", log_file=log)
    if model.params.hidden_size % 1024:
        note = (
            "Nunchaku's loaders need hidden_size % 1024 == 0 (AdaLN W4A16 scales; W4A4 dims % 128)"
        )
        print0(
            f"note | {note}: this export follows DeepCompressor's packer, which pads; only our unpacker reads it"
        )
    if cfg.dry_run:
        return

    # --- data: calibration inputs (the sampler over N prompts, recorded inputs, or random)
    run, what = calibration_run(cfg, pipe, model, device)
    # Each fused layer reads one input; hook its first linear (q for q/k/v, proj_out.linears.0 for
    # the split head).
    names = [layer[0] for g in groups for layer in g]
    t0 = time.time()
    stats = calibrate(model, run, names, cfg.reservoir_rows, cfg.seed)
    print0(f"calib | {what} | layers {len(names)} | dt {time.time() - t0:.1f}s", log_file=log)

    # --- quantise, layer group by layer group
    t0 = time.time()
    quantize_model(model, stats, cfg, log)
    print0(
        f"quantize | {cfg.precision} {cfg.method} rank {cfg.rank} | dt {time.time() - t0:.1f}s",
        log_file=log,
    )

    # --- save: the emulated model (load_quantized) and Nunchaku's file
    folder, export = save_outputs(model, cfg, pipe, out)
    print0(f"save | {folder} | {export} ({export.stat().st_size / 2**20:.1f} MiB)", log_file=log)
    if cfg.check:
        nunchaku_check(export, folder, cfg, device, log)


if __name__ == "__main__":
    run_main(main)
