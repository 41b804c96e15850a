"""Text to image with any model of this project: prompts and a model folder in, PNGs and latencies out. Speed is
DC-Gen's claim (paper §4: 53x lower 4K latency than FLUX.1-Krea on an H100), so the time of each part is reported.

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

import data
from common import (
    denoise,
    get_noise,
    get_schedule,
    guided_velocity,
    load_ckpt,
    parse_config,
    save_image_grid,
    shift_factor,
)
from models.autoencoder import nearest_multiples
from models.pipeline import SHIFTS, load_pipeline

ZOO = Path(__file__).resolve().parent / "zoo"

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
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
        raise ValueError(f"image sizes must be multiples of {factor} px for this model (AE factor × patch); "
                         f"nearest valid {near}")  # fmt: skip
    return H, W


def toy_prompts(prompts: list[str], background: str = "black") -> list[str]:
    """The toy zoo learned only data.py's captions, which always end 'on a <colour> background': a prompt that is
    such a caption but for the background gets `background` (said aloud; without one the toy models misdraw, e.g.
    both objects red). Any other prompt outside the grammar gets a note, once."""

    def problem(text: str) -> str | None:  # why text is not a caption of the toy dataset, or None
        try:
            data.parse_caption(text)
        except ValueError as e:
            return str(e)
        return None

    out = []
    for prompt in prompts:
        completed = f"{prompt} on a {background} background"
        if problem(prompt) and not problem(completed):
            print(f"note: the toy zoo's captions always name a background; sampling {completed!r}")
            prompt = completed
        out.append(prompt)
    if unknown := next(filter(None, map(problem, out)), None):
        print(f"note: the toy zoo knows only the captions it was trained on; {unknown}. Expect a poor image.")
    return out


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def progress(velocity, steps: int, sync):
    """Wrap a velocity function so that each call (one Euler step) updates a `step i/n, s/step` line."""
    state = {"i": 0, "t0": time.perf_counter()}

    def wrapped(x, sigma):
        out = velocity(x, sigma)
        sync()
        state["i"] += 1
        per_step = (time.perf_counter() - state["t0"]) / state["i"]
        print(f"\r  step {state['i']}/{steps} ({per_step:.2f}s/step)", end="\n" if state["i"] == steps else "")
        return out

    return wrapped


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> list[Path]:
    cfg = parse_config(Config, argv)
    prompts = read_prompts(cfg)
    for flag, value in (("steps", cfg.steps), ("batch", cfg.batch)):
        if value < 1:
            raise ValueError(f"--{flag} {value}: give a positive number")
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cfg.shift and cfg.shift not in SHIFTS:
        raise ValueError(f"--shift {cfg.shift!r}: choose one of {SHIFTS}")

    # --- models ---
    t0 = time.perf_counter()
    folder = Path(cfg.model) if cfg.model else ZOO / "dcgen-4k"
    pipe = load_pipeline(folder, dtype=dtype, device=device, max_length=cfg.max_length or None,
                         tile_px=cfg.tile_px or None)  # fmt: skip
    model, ae = pipe.transformer.eval(), pipe.ae.eval()
    if folder.resolve().is_relative_to(ZOO):
        prompts = toy_prompts(prompts)
    p, f, C = pipe.patch_size(), ae.spatial_factor, model.params.in_channels
    if 0 < cfg.tile_px < 4 * f or cfg.tile_px % f:
        raise ValueError(f"--tile_px {cfg.tile_px}: give 0 (decode in one pass) or a multiple of this AE's factor "
                         f"{f} px of at least {4 * f} px, so that tiles overlap by whole latent pixels")  # fmt: skip
    H, W = image_size(cfg, f * p, native=4096 if f == 64 else 1024)  # f64 AEs are DC-Gen's 4K (Res4K, zoo/dcgen-4k)
    h, w = H // f, W // f  # latent grid
    n_params = sum(t.numel() for t in model.parameters()) / 1e6
    prefix = f", its first {C} channels" if C < ae.latent_channels else ""  # a DC-AE 1.5 channel-prefix model
    print(f"model {folder} ({type(model).__name__}, {n_params:.1f} M parameters; AE f{f}c{ae.latent_channels}{prefix}, "
          f"patch {p}) loaded in {time.perf_counter() - t0:.1f}s on {device}, {dtype}")  # fmt: skip

    # --- noise and schedule ---
    shape = (len(prompts), C, h, w)
    if cfg.noise:
        noise = load_ckpt(cfg.noise)
        if "noise" not in noise or tuple(noise["noise"].shape) != shape:
            got = tuple(noise["noise"].shape) if "noise" in noise else f"keys {sorted(noise)}"
            raise ValueError(
                f"--noise {cfg.noise}: expected a tensor `noise` of shape {shape} (prompts, C, h, w), got {got}"
            )
        noise = noise["noise"].float()
    else:
        noise = get_noise(shape, cfg.seed)
    kind = cfg.shift or pipe.shift
    r = shift_factor(kind, (h // p) * (w // p), C * p * p, cfg.shift_value if cfg.shift else pipe.shift_value)
    sigmas = get_schedule(cfg.steps, r)
    distilled = bool(getattr(model.params, "guidance_embed", False))
    scale = cfg.cfg or (1.0 if distilled else 4.5)
    print(f"{len(prompts)} image(s) {W}x{H}: latent {C}x{h}x{w}, {(h // p) * (w // p)} tokens, {cfg.steps} steps, "
          f"shift {kind} (r = {r:.2f}), " + (f"guidance {cfg.guidance}" if distilled else "") +
          (f"{', ' if distilled else ''}CFG {scale}" if scale != 1 else ""))  # fmt: skip

    # --- generate, batch by batch; the clock runs around synchronised work only ---
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = {"text": 0.0, "denoise": 0.0, "decode": 0.0}

    def timed(part, fn, *args):
        sync()
        t0 = time.perf_counter()
        out = fn(*args)
        sync()
        times[part] += time.perf_counter() - t0
        return out

    out, paths = Path(cfg.out), []
    meta = {"model": str(folder), "size": f"{W}x{H}", "steps": cfg.steps, "cfg": scale, "shift": f"{kind} r={r:.3f}",
            "guidance": cfg.guidance if distilled else "none", "seed": cfg.noise or cfg.seed}  # fmt: skip
    one_file = cfg.grid or len(prompts) == 1
    grid = []  # the images of the one file; else each batch is written as it is decoded (memory: one batch)
    with torch.no_grad():
        for start in range(0, len(prompts), cfg.batch):
            batch = prompts[start : start + cfg.batch]
            cond = timed("text", pipe.text, batch)
            null = timed("text", pipe.text.null, len(batch)) if scale != 1 else None
            v = guided_velocity(model, cond, null, cfg.guidance if distilled else None, scale)
            v = progress(lambda x, sigma, v=v: v(x.to(dtype), sigma), cfg.steps, sync)
            x = timed("denoise", denoise, v, noise[start : start + len(batch)].to(device), sigmas)  # (B, C, h, w)
            images = timed("decode", ae.decode, x.to(dtype)).float().cpu()  # (B, 3, H, W) in [-1, 1]
            if one_file:
                grid.append(images)
                continue
            for i, (img, prompt) in enumerate(zip(images, batch), start):  # PNGs with their recipe in the metadata
                paths.append(out.with_name(f"{out.stem}_{i}{out.suffix}"))
                save_image_grid(img[None], paths[-1], text={"prompt": prompt, "index": i, **meta})
    if one_file:
        images = torch.cat(grid) if len(grid) > 1 else grid[0]
        grid.clear()  # one copy of the pixels, not two, while the PNG is written (4096 px: 200 MB each)
        save_image_grid(images, out, nrow=min(4, len(prompts)), text={"prompt": " | ".join(prompts), **meta})
        paths.append(out)
    per_step = times["denoise"] / (cfg.steps * -(-len(prompts) // cfg.batch))  # per step of one batch
    print(f"text encoding {times['text']:.2f}s | denoising {times['denoise']:.2f}s ({per_step:.3f}s/step) | "
          f"decoding {times['decode']:.2f}s | total {sum(times.values()):.2f}s | "
          f"peak memory {peak_memory_gb(device):.2f} GB")  # fmt: skip
    print(f"Done in {sum(times.values()):.1f}s: {', '.join(map(str, paths))}")
    return paths


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback from deep inside
        sys.exit(f"error: {e}")
