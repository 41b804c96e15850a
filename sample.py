"""Text to image with any model of this project: prompts and a model folder in, PNGs and latencies out.
Speed is DC-Gen's claim (arXiv 2509.25180: 53x lower 4K latency than FLUX.1-Krea on an H100), so each part is timed.

    text encoding -> noise -> Euler flow-matching steps (common.denoise) with the model's shift -> tiled AE decode

The shift is the one the model was trained with, read from its folder (models/pipeline.py): DC-Gen-FLUX 1K uses
r = sqrt(C·p²·L/4096), FLUX.1 and DC-Gen-FLUX 4K the dynamic mu, SANA a constant flow_shift; --shift overrides it.
Guidance-distilled models (FLUX.1-Krea, DC-Gen-FLUX) take --guidance as an input (one pass per step); CFG models
(SANA) use true classifier-free guidance --cfg (two passes).

Run:    python sample.py --prompt "a red circle above a blue square on a black background" --size 4096  # toy zoo
        python sample.py --model DC-Gen-FLUX.1-Krea-Dev-v1.0-Res4K --prompt "a cozy cabin" --size 4096 --device cuda
        python sample.py --model FLUX.1-Krea-dev --prompts prompts.txt --size 1024 --batch 4 --grid --out grid.png
Input:  a model folder: released FLUX.1-Krea-dev, DC-Gen-FLUX, SANA (diffusers layout), or one our stages wrote;
        by default the embedded toy zoo (zoo/). Optionally --noise: a safetensors file with `noise` (B, C, h, w).
Output: PNG(s) whose text metadata holds the whole recipe (prompt, seed, steps, guidance, shift, model, size, dtype,
        tile, code version), each written to a temporary file and renamed into place; timings on stdout.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import resource
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

# libgomp's idle threads spin-wait for the next parallel region: beside any other busy process the
# 20 steps slow down 25-60x; PASSIVE threads sleep instead (docs/performance.md). Read when torch
# loads libgomp, hence before the imports below; an OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import (  # noqa: E402
    Device,
    Shift,
    denoise,
    get_noise,
    get_schedule,
    guided_velocity,
    load_ckpt,
    parse_config,
    pick_device,
    run_info,
    run_main,
    shift_for,
)
from models.c2i import sample_classes  # noqa: E402
from models.loading import read_config  # noqa: E402
from models.pipeline import load_pipeline  # noqa: E402
from models.tiling import nearest_multiples, reuse_freed_memory  # noqa: E402
from pngfile import Writer, tile_grid, to_pixels  # noqa: E402
from toy.text import knows_only_toy_captions, toy_prompts  # noqa: E402

ZOO = Path(__file__).resolve().parent / "zoo"

# ----------------------------------------------------------------------------------------------------------------
# config


SampleDtype = typing.Literal["auto", "fp32", "bf16", "fp16"]  # fp16 runs fp16


@dataclass
class Config:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    prompt: tuple[str, ...] = ()  # one prompt per flag, quoted: --prompt "a red circle" --prompt "a blue square"
    prompts: str = ""  # a text file with one prompt per line
    model: str = str(ZOO / "dcgen-4k")  # model folder; the default is the toy zoo's DC-Gen 4K model
    out: str = "out/sample.png"  # PNG; several images are written as out_0.png, out_1.png, ... unless --grid
    grid: bool = False  # write all images as one grid PNG
    size: str = ""  # image size in px: 4096 (square) or WxH, e.g. 4608x3328 (empty: --width/--height, else the model's)
    width: int = 0  # image width in px (0: the model's training size)
    height: int = 0  # image height in px (0: the model's training size)
    steps: int = 20  # Euler steps
    guidance: float = 3.5  # embedded guidance scale (guidance-distilled models)
    cfg: float = 0.0  # true classifier-free guidance scale (0: 1 for guidance-distilled models, 4.5 for CFG models)
    seed: int = 0  # noise seed (image i of a run uses the i-th draw of one seeded generator)
    batch: int = 1  # images per forward pass (lowered, said aloud, when the memory would not hold it)
    noise: str = ""  # start from this noise: a safetensors file with `noise` (B, C, h, w) in the AE's latent layout
    shift: Shift = ""  # override the model's noise-level shift: flux, dcgen or constant (empty: the model's own)
    shift_value: float = 3.0  # r of --shift constant
    device: Device = "auto"  # auto (cuda if present), cuda or cpu
    dtype: SampleDtype = "auto"  # auto, fp32, bf16 or fp16 (auto: bf16 on GPU, and on AMX CPUs for real-width models)
    tile_px: int = 1024  # AE decode tile size in px for large images (0: never tile)
    max_length: int = 0  # text tokens: T5's for FLUX (0: 512, the most), Gemma's for SANA (0: 300)
    png_level: int = 1  # PNG zlib level 0-9: 1 writes a 4096 px image in a fifth of the time of 9, about 1.5x larger
    classes: tuple[str, ...] = ()  # class-conditional models (DiT, USiT): class ids or id2label names, not prompts
    solver: typing.Literal["euler", "dopri5"] = "euler"  # class-conditional flow models: Euler on --steps, or dopri5
    # fmt: on


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# helpers: input checks, each bad input answered with one line before any work is done


def check_argv(argv: list[str]) -> None:
    """One value per --prompt: unquoted, `--prompt a red circle` would be three prompts (images)."""
    for i in (i for i, arg in enumerate(argv) if arg == "--prompt"):
        words = list(itertools.takewhile(lambda a: not a.startswith("--"), argv[i + 1 :]))
        if len(words) > 1:
            raise ValueError(
                f'--prompt takes one prompt, got {len(words)} words: quote it, --prompt "{" ".join(words)}" '
                "(repeat --prompt for several prompts)"
            )


def check_flags(cfg: Config) -> None:
    for flag, value in (("steps", cfg.steps), ("batch", cfg.batch)):
        if value < 1:
            raise ValueError(f"--{flag} {value}: give a positive number")
    if not 0 <= cfg.png_level <= 9:
        raise ValueError(f"--png_level {cfg.png_level}: give 0 (fastest, largest) to 9 (smallest)")


def read_prompts(cfg: Config) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompts:
        if not Path(cfg.prompts).is_file():
            raise FileNotFoundError(f"--prompts {cfg.prompts}: no such file")
        prompts += [ln.strip() for ln in Path(cfg.prompts).read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ValueError('no prompts: give --prompt "..." (repeatable) or --prompts FILE')
    return prompts


def check_out(out: Path) -> None:
    """The PNG can be written, checked before minutes of sampling: a .png name, in a directory that
    exists (or is made now) and takes a file."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name, e.g. {out / 'sample.png'}")
    if out.suffix.lower() != ".png":
        raise ValueError(
            f"--out {out}: sample.py writes PNG; give a name ending in .png, e.g. {out.with_suffix('.png')}"
        )
    try:  # a file where a directory must be, a read-only or full disk, no permission
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.{os.getpid()}.probe", "wb") as f:
            Path(f.name).unlink()
    except OSError as e:
        blocked = isinstance(e, FileExistsError | NotADirectoryError)
        why = "a file is in the way" if blocked else e.strerror
        raise ValueError(
            f"--out {out}: cannot write in {out.parent} ({why}); choose another --out"
        ) from None


def image_size(cfg: Config, factor: int, native: int) -> tuple[int, int]:
    """(height, width) in px from --size (N or WxH) or --width/--height, checked against the model's
    pixel factor (AE factor × patch)."""
    if cfg.size:
        m = re.fullmatch(r"(-?\d+)(?:x(-?\d+))?", cfg.size.strip().lower())
        if not m:
            raise ValueError(
                f"--size {cfg.size!r}: give one number of px (4096) or WxH (4608x3328)"
            )
        W, H = int(m[1]), int(m[2] or m[1])
    else:
        H, W = cfg.height or native, cfg.width or native
    bad = [(n, v) for n, v in (("height", H), ("width", W)) if v <= 0 or v % factor]
    if bad:
        near = ", ".join(f"{n} {v}: {nearest_multiples(v, factor)}" for n, v in bad)
        raise ValueError(
            f"image sizes must be multiples of {factor} px for this model (AE factor × patch); nearest valid {near}"
        )
    return H, W


def check_tile_px(tile_px: int, f: int) -> None:
    if 0 < tile_px < 4 * f or tile_px % f:
        raise ValueError(
            f"--tile_px {tile_px}: give 0 (decode in one pass) or a multiple of this AE's factor "
            f"{f} px of at least {4 * f} px, so that tiles overlap by whole latent pixels"
        )


def pick_dtype(name: str, device: torch.device, folder: Path) -> tuple[torch.dtype, str]:
    """The compute dtype and why. auto: bf16 on a GPU; on a CPU bf16 only where its matrix units
    multiply bf16 natively (AMX: the FLUX-width forward 2.07x faster than fp32) and the model is of
    real width, so the toy zoo (width 128) stays fp32 and its demo image unchanged."""
    if name != "auto":
        return DTYPES[name], f"--dtype {name}"
    if device.type == "cuda":
        return torch.bfloat16, "auto: GPU"
    tr = folder / "transformer" / "config.json"
    cfg = read_config(tr.parent, "transformer") if tr.is_file() else {}
    width = cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
    cpuinfo = Path("/proc/cpuinfo")
    amx = cpuinfo.is_file() and "amx_bf16" in cpuinfo.read_text()
    if amx and width >= 1024:
        return torch.bfloat16, f"auto: CPU with AMX bf16, model width {width}"
    return torch.float32, f"auto: CPU{' without AMX bf16' if not amx else ''}, model width {width}"


def trained_px(folder: Path, f: int) -> int:
    """The square image size the model was trained at: our "_trained_px" key in model_index.json
    (diffusers ignores "_" keys), else DC-Gen's convention: 4096 px on an f64 AE (Res4K), else 1024."""
    index = folder / "model_index.json"
    px = json.loads(index.read_text()).get("_trained_px") if index.is_file() else None
    return int(px) if px else 4096 if f == 64 else 1024


def warn_far_size(folder: Path, H: int, W: int, trained: int, cell: int) -> None:
    """A model draws on the token grid it was trained on; 4x fewer or more tokens than that (2x the
    side) is far outside it, where the toy 4K model at 1024 px draws blank images."""
    tokens, native = (H // cell) * (W // cell), (trained // cell) ** 2
    if native / 4 <= tokens <= native * 4:
        return
    released_4k = ", 4608x3328, 5376x3072, 4608x3584 or their transposes"  # DC-Gen's 4K sizes
    near = f"{trained} px" + (released_4k if trained == 4096 else "")
    print(
        f"warning: {folder} was trained at {trained}x{trained} px ({native} tokens); {W}x{H} px is {tokens} tokens, "
        f"far outside: expect a poor or blank image. Its sizes: {near}",
        file=sys.stderr,
    )


def initial_noise(cfg: Config, shape: tuple[int, ...]) -> torch.Tensor:
    """x at sigma = 1: the --noise file's tensor, else seeded Gaussian noise (common.get_noise)."""
    if not cfg.noise:
        return get_noise(shape, cfg.seed)
    noise = load_ckpt(cfg.noise)  # a corrupt file: a ValueError naming it (models/loading.py)
    if "noise" not in noise or tuple(noise["noise"].shape) != shape:
        got = tuple(noise["noise"].shape) if "noise" in noise else f"keys {sorted(noise)}"
        raise ValueError(
            f"--noise {cfg.noise}: expected a tensor `noise` of shape {shape} (prompts, C, h, w), got {got}"
        )
    return noise["noise"].float()


# ----------------------------------------------------------------------------------------------------------------
# helpers: memory, estimated before any work so that a large run fails or shrinks at once, not after minutes


def available_bytes(device: torch.device) -> int:
    """Free GPU memory, or the kernel's MemAvailable (0: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    lines = meminfo.read_text().splitlines() if meminfo.is_file() else []
    return next((int(ln.split()[1]) * 1024 for ln in lines if ln.startswith("MemAvailable:")), 0)


def decode_bytes(ae, H: int, W: int, elt: int) -> int:
    """About the peak of decoding one H x W image: the fp32 canvas its tiles blend into (output,
    weights, a weighted tile, then the uint8 pixels and PNG rows: 34 bytes a pixel) plus the
    decoder's largest activations on one window (about 6 maps of a stage's width)."""
    widths = getattr(ae.params, "decoder_block_out_channels", None) or ae.params.block_out_channels
    tile = ae.tile_px if ae.tile_px and max(H, W) > ae.tile_px else 0
    h, w = (min(H, tile), min(W, tile)) if tile else (H, W)
    acts = max(6 * c * (h >> i) * (w >> i) for i, c in enumerate(widths)) * elt
    return 34 * H * W + acts


def fit_batch(cfg: Config, model, ae, tokens: int, size: tuple, n: int, elt: int, device) -> int:
    """--batch, lowered (said aloud) when its denoising activations would not fit; an error naming
    the numbers when one image's decode does not fit."""
    avail, (H, W) = available_bytes(device), size
    if not avail:
        return cfg.batch
    grid = 6 * H * W * n if cfg.grid and n > 1 else 0  # every image's pixels, then the grid's
    need = decode_bytes(ae, H, W, elt) + grid
    if need > avail:
        raise ValueError(
            f"decoding {W}x{H} px needs about {need / 2**30:.1f} GB and {avail / 2**30:.1f} GB is available: "
            f"lower --tile_px (now {cfg.tile_px}){', drop --grid' if grid else ''} or the size"
        )
    # per image: about 16 activations of (tokens + text tokens) x width in flight
    per_image = 16 * (tokens + 512) * model.params.hidden_size * elt
    fits = max(1, int((avail - grid) // per_image))
    if fits < min(cfg.batch, n):
        print(
            f"note: --batch {cfg.batch} needs about {cfg.batch * per_image / 2**30:.1f} GB for denoising and "
            f"{avail / 2**30:.1f} GB is available: running batches of {fits}"
        )
        return fits
    return cfg.batch


# ----------------------------------------------------------------------------------------------------------------
# helpers: progress and timing


def progress(label: str, unit: str):
    """A `label i/n (s/unit)` line rewritten in place; call it with (i, n)."""
    t0 = time.perf_counter()

    def show(i: int, n: int) -> None:
        per = (time.perf_counter() - t0) / i
        print(f"\r  {label} {i}/{n} ({per:.2f}s/{unit})", end="\n" if i == n else "", flush=True)

    return show


def with_progress(velocity, steps: int, sync):
    """Wrap a velocity function so that each call (one Euler step) updates a step line."""
    show, state = progress("step", "step"), {"i": 0}

    def wrapped(x, sigma):
        out = velocity(x, sigma)
        sync()
        state["i"] += 1
        show(state["i"], steps)
        return out

    return wrapped


class Clock:
    """Seconds spent per part (text, denoise, decode), the clock running around synchronised work
    only."""

    def __init__(self, sync):
        self.sync = sync
        self.times = {"text": 0.0, "denoise": 0.0, "decode": 0.0}

    def __call__(self, part: str, fn, *args, **kw):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.sync()
        self.times[part] += time.perf_counter() - t0
        return out


def describe_model(
    folder: Path, pipe, seconds: float, device: torch.device, dtype, why: str
) -> str:
    """One line on what was loaded: the model, its size, its AE and patch, the load time, the dtype."""
    model, ae, p = pipe.transformer, pipe.ae, pipe.patch_size()
    f, C = ae.spatial_factor, model.params.in_channels
    n_params = sum(t.numel() for t in model.parameters()) / 1e6
    # a DC-AE 1.5 channel-prefix model
    prefix = f", its first {C} channels" if C < ae.latent_channels else ""
    return (
        f"model {folder} ({type(model).__name__}, {n_params:.1f} M parameters; AE f{f}c{ae.latent_channels}{prefix}, "
        f"patch {p}) loaded in {seconds:.1f}s on {device}, {str(dtype).removeprefix('torch.')} ({why})"
    )


def report(
    times: dict[str, float], batch_steps: int, device, paths: list[Path], waited: float
) -> None:
    """The latency of each part (the paper's claim is speed), the peak memory, the files written."""
    per_step = times["denoise"] / batch_steps  # per step of one batch
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"text encoding {times['text']:.2f}s | denoising {times['denoise']:.2f}s ({per_step:.3f}s/step) | "
        f"decoding {times['decode']:.2f}s | total {sum(times.values()):.2f}s | PNG wait {waited:.2f}s | "
        f"peak memory {peak:.2f} GB"
    )
    print(f"Done in {sum(times.values()):.1f}s: {', '.join(map(str, paths))}")


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> list[Path]:
    argv = sys.argv[1:] if argv is None else argv
    check_argv(argv)
    cfg = parse_config(Config, argv)
    check_flags(cfg)
    out = Path(cfg.out)
    check_out(out)
    device = torch.device(pick_device(cfg.device))
    reuse_freed_memory()
    if cfg.classes:  # a class-conditional folder (DiT, USiT): one image per class, as one PNG
        return sample_class_folder(cfg, out, device)
    prompts = read_prompts(cfg)
    folder = Path(cfg.model)
    dtype, why = pick_dtype(cfg.dtype, device, folder)

    # --- models ---
    t0 = time.perf_counter()
    max_length = cfg.max_length or None
    pipe = load_pipeline(
        folder, dtype=dtype, device=device, max_length=max_length, tile_px=cfg.tile_px or None
    )
    model, ae = pipe.transformer.eval(), pipe.ae.eval()
    if knows_only_toy_captions(folder):  # a toy text encoder says so in its tokenizer's config
        prompts = toy_prompts(prompts)  # complete a missing background; note prompts it cannot read
    p, f, C = pipe.patch_size(), ae.spatial_factor, model.params.in_channels
    check_tile_px(cfg.tile_px, f)
    trained = trained_px(folder, f)
    H, W = image_size(cfg, f * p, native=trained)
    h, w = H // f, W // f  # latent grid
    print(describe_model(folder, pipe, time.perf_counter() - t0, device, dtype, why))
    warn_far_size(folder, H, W, trained, f * p)

    # --- noise, schedule and guidance ---
    noise = initial_noise(cfg, (len(prompts), C, h, w))
    kind = cfg.shift or pipe.shift
    r = shift_for(kind, (C, h, w), p, cfg.shift_value if cfg.shift else pipe.shift_value)
    sigmas = get_schedule(cfg.steps, r)
    distilled = bool(getattr(model.params, "guidance_embed", False))
    scale = cfg.cfg or (1.0 if distilled else 4.5)
    tokens = (h // p) * (w // p)
    rows = tokens * (1 if scale == 1 else 2)  # a CFG step runs [cond, null]
    batch = fit_batch(cfg, model, ae, rows, (H, W), len(prompts), dtype.itemsize, device)
    guidance = f"guidance {cfg.guidance}" if distilled else ""
    cfg_part = f"{', ' if distilled else ''}CFG {scale}" if scale != 1 else ""
    print(
        f"{len(prompts)} image(s) {W}x{H}: latent {C}x{h}x{w}, {tokens} tokens, {cfg.steps} steps, "
        f"shift {kind} (r = {r:.2f}), {guidance}{cfg_part}"
    )
    info = run_info()  # the code's version, so that the image can be remade from its metadata
    meta = {
        "model": str(folder),
        "size": f"{W}x{H}",
        "steps": cfg.steps,
        "cfg": scale,
        "shift": f"{kind} r={r:.3f}",
        "guidance": cfg.guidance if distilled else "none",
        "seed": cfg.noise or cfg.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "tile_px": cfg.tile_px,
        "max_length": cfg.max_length,
        "code": info["git_commit"] + ("+dirty" if info["git_dirty"] else ""),  # or "unknown"
    }

    # --- generate batch by batch, decode and write image by image ---
    paths, times, waited = generate(cfg, pipe, prompts, noise, sigmas, scale, batch, dtype, meta)
    report(times, cfg.steps * -(-len(prompts) // batch), device, paths, waited)
    return paths


def sample_class_folder(cfg: Config, out: Path, device: torch.device) -> list[Path]:
    size = int(cfg.size) if cfg.size.isdigit() else 0  # square only; 0: the model's own
    args = (cfg.model, cfg.classes, cfg.steps, cfg.cfg or 4.0, cfg.seed, size, device, cfg.solver)
    images, names, meta = sample_classes(*args)  # models/c2i.py: DDIM, DDPM, flow Euler or dopri5
    writer = Writer(cfg.png_level)
    writer.put(out, tile_grid([to_pixels(x) for x in images], min(4, len(images))), meta)
    writer.wait()
    print(f"{', '.join(names)} -> {out}")
    return [out]


def generate(cfg, pipe, prompts, noise, sigmas, scale, batch, dtype, meta) -> tuple:
    """Denoise `batch` prompts at a time, then decode each image and hand it to the PNG writer, so
    memory holds one decoded image (and the one being written), whatever the batch. Returns the paths
    written, the seconds per part (the clock runs around synchronised work only), the PNG wait."""
    device, out = next(pipe.transformer.parameters()).device, Path(cfg.out)
    timed = Clock(torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    writer, paths, grid = Writer(cfg.png_level), [], []
    guidance = cfg.guidance if meta["guidance"] != "none" else None
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            texts = prompts[start : start + batch]
            cond = timed("text", pipe.text, texts)
            null = timed("text", pipe.text.null, len(texts)) if scale != 1 else None
            v = guided_velocity(pipe.transformer, cond, null, guidance, scale)
            v = with_progress(lambda x, sigma, v=v: v(x.to(dtype), sigma), cfg.steps, timed.sync)
            x = timed("denoise", denoise, v, noise[start : start + len(texts)].to(device), sigmas)
            for i, prompt in enumerate(texts, start):  # x: (B, C, h, w)
                show = progress(f"decode {i + 1}/{len(prompts)}: tile", "tile")
                z = x[i - start : i - start + 1].to(dtype)
                pixels = to_pixels(timed("decode", pipe.ae.decode, z, progress=show)[0].cpu())
                if cfg.grid or len(prompts) == 1:
                    grid.append(pixels)  # (H, W, 3) uint8
                else:  # out_{i}.png with its recipe in the metadata
                    paths.append(out.with_name(f"{out.stem}_{i}{out.suffix}"))
                    writer.put(paths[-1], pixels, {"prompt": prompt, "index": i, **meta})
    if grid:  # one file: a grid of up to 4 images per row, the prompts joined in its metadata
        paths.append(out)
        writer.put(out, tile_grid(grid, min(4, len(grid))), {"prompt": " | ".join(prompts), **meta})
    writer.wait()
    return paths, timed.times, writer.waited


if __name__ == "__main__":
    try:
        run_main(main)  # bad input or too little memory: one line `error: ...`, status 2
    except KeyboardInterrupt:
        sys.exit("interrupted: every PNG written so far is complete; none is half-written")
