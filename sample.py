"""Text to image with any model of this project: prompts and a model folder in, PNGs and latencies out. Speed is
DC-Gen's claim (arXiv 2509.25180: 53x lower 4K latency than FLUX.1-Krea on an H100), so each part is timed.

    text encoding -> noise -> Euler flow-matching steps (common.denoise) with the model's shift -> tiled AE decode

The shift is the one the model was trained with, read from its folder (models/pipeline.py): DC-Gen-FLUX 1K uses
r = sqrt(C·p²·L/4096), FLUX.1 and DC-Gen-FLUX 4K the dynamic mu, SANA a constant flow_shift; --shift overrides it.
Guidance-distilled models (FLUX.1-Krea, DC-Gen-FLUX) take --guidance as an input (one pass per step); CFG models
(SANA) use true classifier-free guidance --cfg (two passes). Positions are on the model's own token grid.

Run:    python sample.py --prompt "a red circle above a blue square on a black background" --size 4096  # toy zoo
        python sample.py --model DC-Gen-FLUX.1-Krea-Dev-v1.0-Res4K --prompt "a cozy cabin" --size 4096 --device cuda
        python sample.py --model FLUX.1-Krea-dev --prompts prompts.txt --size 1024 --batch 4 --grid --out grid.png
Input:  a model folder: released FLUX.1-Krea-dev, DC-Gen-FLUX, SANA (diffusers layout), or one our stages wrote;
        by default the embedded toy zoo (zoo/). Optionally --noise: a safetensors file with `noise` (B, C, h, w).
Output: PNG(s) whose text metadata holds prompt, seed, steps, guidance, model and size; timings on stdout.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import (
    denoise,
    get_noise,
    get_schedule,
    guided_velocity,
    load_ckpt,
    parse_config,
    save_image_grid,
    shift_for,
)
from models.c2i import sample_classes
from models.pipeline import SHIFTS, load_pipeline
from models.tiling import nearest_multiples
from toy.text import knows_only_toy_captions, toy_prompts

ZOO = Path(__file__).resolve().parent / "zoo"

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    prompt: tuple[str, ...] = ()  # a prompt; repeat the flag for several
    prompts: str = ""  # a text file with one prompt per line
    model: str = ""  # model folder (default: the toy zoo's DC-Gen model, zoo/dcgen-4k)
    out: str = "out/sample.png"  # PNG; several images are written as out_0.png, out_1.png, ... unless --grid
    grid: bool = False  # write all images as one grid PNG
    size: int = 0  # square image size in px (0: --width/--height, else 1024; 4096 for a model on an f64 AE)
    width: int = 0  # image width in px
    height: int = 0  # image height in px
    steps: int = 20  # Euler steps
    guidance: float = 3.5  # embedded guidance scale (guidance-distilled models)
    cfg: float = 0.0  # true classifier-free guidance scale (0: 1 for guidance-distilled models, 4.5 for CFG models)
    seed: int = 0  # noise seed (image i of a run uses the i-th draw of one seeded generator)
    batch: int = 1  # images per forward pass
    noise: str = ""  # start from this noise: a safetensors file with `noise` (B, C, h, w) in the AE's latent layout
    shift: str = ""  # override the model's noise-level shift: flux, dcgen or constant
    shift_value: float = 3.0  # r of --shift constant
    device: str = "auto"  # auto (cuda if present), cuda or cpu
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16 or fp32
    tile_px: int = 1024  # AE decode tile size in px for large images (0: never tile)
    max_length: int = 0  # text tokens: T5's for FLUX (0: 512, the most), Gemma's for SANA (0: 300)
    classes: tuple[str, ...] = ()  # class-conditional models (DiT, USiT): class ids or id2label names, not prompts
    # fmt: on


# ----------------------------------------------------------------------------------------------------------------
# helpers


def read_prompts(cfg: Config) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompts:
        if not Path(cfg.prompts).is_file():
            raise FileNotFoundError(f"--prompts {cfg.prompts}: no such file")
        prompts += [ln.strip() for ln in Path(cfg.prompts).read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ValueError('no prompts: give --prompt "..." (repeatable) or --prompts FILE')
    return prompts


def image_size(cfg: Config, factor: int, native: int) -> tuple[int, int]:
    """(height, width) in px, checked against the model's pixel factor (AE factor × patch size)."""
    H, W = (cfg.size, cfg.size) if cfg.size else (cfg.height or native, cfg.width or native)
    bad = [(n, v) for n, v in (("height", H), ("width", W)) if v <= 0 or v % factor]
    if bad:
        near = ", ".join(f"{n} {v}: {nearest_multiples(v, factor)}" for n, v in bad)
        raise ValueError(
            f"image sizes must be multiples of {factor} px for this model (AE factor × patch); nearest valid {near}"
        )
    return H, W


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def progress(velocity, steps: int, sync):
    """Wrap a velocity function so that each call (one Euler step) updates a `step i/n, s/step`
    line."""
    state = {"i": 0, "t0": time.perf_counter()}

    def wrapped(x, sigma):
        out = velocity(x, sigma)
        sync()
        state["i"] += 1
        per_step = (time.perf_counter() - state["t0"]) / state["i"]
        print(
            f"\r  step {state['i']}/{steps} ({per_step:.2f}s/step)",
            end="\n" if state["i"] == steps else "",
        )
        return out

    return wrapped


def check_flags(cfg: Config) -> None:
    for flag, value in (("steps", cfg.steps), ("batch", cfg.batch)):
        if value < 1:
            raise ValueError(f"--{flag} {value}: give a positive number")
    if cfg.shift and cfg.shift not in SHIFTS:
        raise ValueError(f"--shift {cfg.shift!r}: choose one of {SHIFTS}")


def check_tile_px(tile_px: int, f: int) -> None:
    if 0 < tile_px < 4 * f or tile_px % f:
        raise ValueError(
            f"--tile_px {tile_px}: give 0 (decode in one pass) or a multiple of this AE's factor "
            f"{f} px of at least {4 * f} px, so that tiles overlap by whole latent pixels"
        )


def initial_noise(cfg: Config, shape: tuple[int, ...]) -> torch.Tensor:
    """x at sigma = 1: the --noise file's tensor, else seeded Gaussian noise (common.get_noise)."""
    if not cfg.noise:
        return get_noise(shape, cfg.seed)
    noise = load_ckpt(cfg.noise)
    if "noise" not in noise or tuple(noise["noise"].shape) != shape:
        got = tuple(noise["noise"].shape) if "noise" in noise else f"keys {sorted(noise)}"
        raise ValueError(
            f"--noise {cfg.noise}: expected a tensor `noise` of shape {shape} (prompts, C, h, w), got {got}"
        )
    return noise["noise"].float()


class Clock:
    """Seconds spent per part (text, denoise, decode), the clock running around synchronised work
    only."""

    def __init__(self, sync):
        self.sync = sync
        self.times = {"text": 0.0, "denoise": 0.0, "decode": 0.0}

    def __call__(self, part: str, fn, *args):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args)
        self.sync()
        self.times[part] += time.perf_counter() - t0
        return out


def describe_model(folder: Path, pipe, seconds: float, device: torch.device, dtype) -> str:
    """One line on what was loaded: the model, its size, its AE and patch, the load time."""
    model, ae, p = pipe.transformer, pipe.ae, pipe.patch_size()
    f, C = ae.spatial_factor, model.params.in_channels
    n_params = sum(t.numel() for t in model.parameters()) / 1e6
    # a DC-AE 1.5 channel-prefix model
    prefix = f", its first {C} channels" if C < ae.latent_channels else ""
    return (
        f"model {folder} ({type(model).__name__}, {n_params:.1f} M parameters; AE f{f}c{ae.latent_channels}{prefix}, "
        f"patch {p}) loaded in {seconds:.1f}s on {device}, {dtype}"
    )


def sample_batch(
    pipe,
    prompts: list[str],
    noise: torch.Tensor,
    sigmas,
    cfg: Config,
    scale: float,
    timed: Clock,
    dtype,
) -> torch.Tensor:
    """One batch: text encoding, the Euler steps from `noise` (B, C, h, w), AE decoding -> images
    (B, 3, H, W) in [-1, 1], on the CPU."""
    distilled = bool(getattr(pipe.transformer.params, "guidance_embed", False))
    cond = timed("text", pipe.text, prompts)
    null = timed("text", pipe.text.null, len(prompts)) if scale != 1 else None
    v = guided_velocity(pipe.transformer, cond, null, cfg.guidance if distilled else None, scale)
    v = progress(lambda x, sigma, v=v: v(x.to(dtype), sigma), cfg.steps, timed.sync)
    x = timed("denoise", denoise, v, noise, sigmas)  # (B, C, h, w)
    return timed("decode", pipe.ae.decode, x.to(dtype)).float().cpu()


def save_one_file(grid: list[torch.Tensor], prompts: list[str], out: Path, meta: dict) -> Path:
    """All images as one PNG (a grid of up to 4 per row), the prompts joined in its metadata."""
    images = torch.cat(grid) if len(grid) > 1 else grid[0]
    # one copy of the pixels, not two, while the PNG is written (4096 px: 200 MB each)
    grid.clear()
    save_image_grid(
        images, out, nrow=min(4, len(prompts)), text={"prompt": " | ".join(prompts), **meta}
    )
    return out


def save_batch(
    images: torch.Tensor, prompts: list[str], start: int, out: Path, meta: dict
) -> list[Path]:
    """One PNG per image, out_{i}.png for prompt i, with its recipe in the metadata."""
    paths = []
    for i, (img, prompt) in enumerate(zip(images, prompts), start):
        paths.append(out.with_name(f"{out.stem}_{i}{out.suffix}"))
        save_image_grid(img[None], paths[-1], text={"prompt": prompt, "index": i, **meta})
    return paths


def report(
    times: dict[str, float], batch_steps: int, device: torch.device, paths: list[Path]
) -> None:
    """The latency of each part (the paper's claim is speed), the peak memory, and the files
    written."""
    per_step = times["denoise"] / batch_steps  # per step of one batch
    print(
        f"text encoding {times['text']:.2f}s | denoising {times['denoise']:.2f}s ({per_step:.3f}s/step) | "
        f"decoding {times['decode']:.2f}s | total {sum(times.values()):.2f}s | "
        f"peak memory {peak_memory_gb(device):.2f} GB"
    )
    print(f"Done in {sum(times.values()):.1f}s: {', '.join(map(str, paths))}")


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> list[Path]:
    cfg = parse_config(Config, argv)
    if cfg.classes:  # a class-conditional folder: models/c2i.py samples it, one image per class
        dev = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        args = (cfg.model, cfg.classes, cfg.steps, cfg.cfg or 4.0, cfg.seed, cfg.size, dev)
        images, names, meta = sample_classes(*args)
        return [save_one_file([images], names, Path(cfg.out), meta)]
    prompts = read_prompts(cfg)
    check_flags(cfg)
    device = torch.device(
        cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    # --- models ---
    t0 = time.perf_counter()
    folder = Path(cfg.model) if cfg.model else ZOO / "dcgen-4k"
    max_length = cfg.max_length or None
    pipe = load_pipeline(
        folder, dtype=dtype, device=device, max_length=max_length, tile_px=cfg.tile_px or None
    )
    model = pipe.transformer.eval()
    ae = pipe.ae.eval()
    if knows_only_toy_captions(folder):  # a toy text encoder says so in its tokenizer's config
        prompts = toy_prompts(prompts)  # complete a missing background; note prompts it cannot read
    p = pipe.patch_size()
    f = ae.spatial_factor
    C = model.params.in_channels
    check_tile_px(cfg.tile_px, f)
    # f64 AEs are DC-Gen's 4K (Res4K, zoo/dcgen-4k)
    H, W = image_size(cfg, f * p, native=4096 if f == 64 else 1024)
    h, w = H // f, W // f  # latent grid
    print(describe_model(folder, pipe, time.perf_counter() - t0, device, dtype))

    # --- noise and schedule ---
    noise = initial_noise(cfg, (len(prompts), C, h, w))
    kind = cfg.shift or pipe.shift
    r = shift_for(kind, (C, h, w), p, cfg.shift_value if cfg.shift else pipe.shift_value)
    sigmas = get_schedule(cfg.steps, r)
    distilled = bool(getattr(model.params, "guidance_embed", False))
    scale = cfg.cfg or (1.0 if distilled else 4.5)
    guidance = f"guidance {cfg.guidance}" if distilled else ""
    cfg_part = f"{', ' if distilled else ''}CFG {scale}" if scale != 1 else ""
    tokens = (h // p) * (w // p)
    print(
        f"{len(prompts)} image(s) {W}x{H}: latent {C}x{h}x{w}, {tokens} tokens, {cfg.steps} steps, "
        f"shift {kind} (r = {r:.2f}), {guidance}{cfg_part}"
    )

    # --- generate, batch by batch; the clock runs around synchronised work only ---
    timed = Clock(torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    out = Path(cfg.out)
    paths = []
    meta = {
        "model": str(folder),
        "size": f"{W}x{H}",
        "steps": cfg.steps,
        "cfg": scale,
        "shift": f"{kind} r={r:.3f}",
        "guidance": cfg.guidance if distilled else "none",
        "seed": cfg.noise or cfg.seed,
    }
    one_file = cfg.grid or len(prompts) == 1
    # the images of the one file; else each batch is written as it is decoded (memory: one batch)
    grid = []
    with torch.no_grad():
        for start in range(0, len(prompts), cfg.batch):
            batch = prompts[start : start + cfg.batch]
            batch_noise = noise[start : start + len(batch)].to(device)  # (B, C, h, w)
            images = sample_batch(pipe, batch, batch_noise, sigmas, cfg, scale, timed, dtype)
            if one_file:
                grid.append(images)
            else:  # PNGs with their recipe in the metadata
                paths += save_batch(images, batch, start, out, meta)
    if one_file:
        paths.append(save_one_file(grid, prompts, out, meta))
    report(timed.times, cfg.steps * -(-len(prompts) // cfg.batch), device, paths)
    return paths


if __name__ == "__main__":
    try:
        main()
    # bad input: one clear line, no traceback from deep inside
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
