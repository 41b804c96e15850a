"""The GPU check: the paper's speed claims and the planner's memory model, measured in one short run on one GPU.

Three sections, bf16 and random weights (latency and memory depend on the shapes, not on the values):
  1. transformer seconds per denoising step of FLUX.1-dev (12B, f8 latent, 2x2 patches) against DC-Gen-FLUX (the
     same backbone on a DC-AE f32c32 latent up to --dcgen_1k_max px, on DC-AE 1.5 f64c128 above, as bench.py pairs
     them) at 1024 / 2048 / 4096 px, eager and with torch.compile; the speed-up beside the FLOP ratio and the paper's
     end-to-end one (DC-Gen §4: 4.65 -> 1.10 s at 1K, 23.76 -> 1.41 s at 2K, 213.81 -> 4.04 s at 4K on an H100).
  2. one LoRA training step of DC-Gen stage 3 (§3.3) on the real 12B shape at 512 px: lora.py's model (bf16 frozen
     base, fp32 rank-256 LoRA and latent layers), its guide loss (one forward with gradient, one without), gradient
     checkpointing and AdamW; seconds per step and the allocator's peak beside plan.predict's.
  3. the DC-AE 1.5 f64c128 decode of a 4096 px image (latent 128x64x64), in one pass and in 1024 px tiles: seconds and
     peak memory.
Every item is timed around torch.cuda.synchronize() after one warm-up call, and the run keeps to --budget_s: an item
whose estimate (its FLOPs at --mfu of --peak_tflops, plus --compile_s when compiled) would end past the budget is
skipped with a note. An item that fails (out of memory, a kernel limit) is recorded with its error and the run goes
on; the exit status is then 1.

Run:    bash runs/gpu.sh --out out/gpu                  # one H100: about 4-6 min, 420 s budget
        bash runs/gpu.sh --tiny --out out/gpu-tiny      # a CPU: the same code paths on toy presets, in seconds
Output: out/gpu.json (every figure, the device, torch/CUDA versions, git commit), out/gpu.md (the tables, also printed)
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import lora  # noqa: E402
import plan  # noqa: E402
import training  # noqa: E402
from common import parse_config, run_info, shift_for, step_generator, update_ema  # noqa: E402
from models.autoencoder import PRESETS as AE_PRESETS  # noqa: E402
from models.autoencoder import build_autoencoder  # noqa: E402
from models.flux import PRESETS as FLUX_PRESETS  # noqa: E402
from models.flux import Flux  # noqa: E402

# DC-Gen §4, H100, whole generation (text, steps, decode) of FLUX.1-Krea-dev vs DC-Gen-FLUX, seconds
PAPER_SECONDS = {1024: (4.65, 1.10), 2048: (23.76, 1.41), 4096: (213.81, 4.04)}

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    out: str = "out/gpu"  # folder for gpu.json and gpu.md
    tiny: bool = False  # CPU smoke run: replaces the fields named in TINY by toy presets and sizes
    device: str = "auto"  # auto, cuda or cpu
    threads: int = 0  # CPU threads of torch (0: its default)
    dtype: str = "bf16"  # bf16 or fp32: inference weights, the frozen base of the LoRA step, the decode
    budget_s: float = 420.0  # wall-clock budget: items whose estimate would end past it are skipped, with a note
    peak_tflops: float = 989.0  # dense bf16 peak of the card, TFLOP/s (H100 SXM 989), for estimates and predictions
    mfu: float = 0.4  # assumed fraction of peak_tflops reached, for estimates and plan's predicted seconds
    # 1. transformer latency per denoising step
    base: str = "flux-dev"  # base FLUX preset (models/flux.py)
    base_ae: str = "flux-vae"  # its AE preset (models/vae.py or dcae.py): only the spatial factor is used
    dcgen_1k: str = "dcgen-flux-1k"  # DC-Gen preset at sizes up to dcgen_1k_max
    dcgen_1k_ae: str = "dc-ae-f32c32-in-1.0"  # its AE preset
    dcgen_4k: str = "dcgen-flux-4k"  # DC-Gen preset above dcgen_1k_max
    dcgen_4k_ae: str = "dc-ae-1.5-f64c128"  # its AE preset
    dcgen_1k_max: int = 1024  # sizes up to this use dcgen_1k, larger ones dcgen_4k (bench.py's pairing)
    sizes: tuple[int, ...] = (1024, 2048, 4096)  # square image sizes in px
    text_len: int = 512  # T5 tokens at sampling
    steps: int = 3  # timed steps per item (median reported), after one warm-up step
    big_step_s: float = 2.0  # when a step takes (or is estimated to take) longer, time only steps_big steps
    steps_big: int = 1  # timed steps of the big items (FLUX at 2K, 4K)
    compile: bool = True  # also time compiled transformer blocks (GPU only; skipped with a note on a CPU)
    compile_mode: str = "default"  # torch.compile mode of the blocks
    compile_s: float = 40.0  # assumed compile time of one compiled item (one new shape), for the budget
    # 2. one LoRA training step (lora.py's model and guide loss)
    train_preset: str = "dcgen-flux-1k"  # FLUX preset trained (needs a guidance embedding for the guide loss)
    train_latent_hw: int = 16  # latent side: 512 px on DC-AE f32c32
    train_txt_len: int = 256  # T5 tokens in training
    micro_batch: int = 8  # samples per step
    rank: int = 256  # LoRA rank (alpha = rank, as DC-Gen §3.3)
    ema: bool = True  # keep lora.py's fp32 EMA of the trainable weights (its default --ema 0.999)
    train_warmup: int = 2  # untimed steps first (the first one allocates AdamW's state)
    train_steps: int = 3  # timed steps (median reported)
    # 3. DC-AE decode
    ae: str = "dc-ae-1.5-f64c128"  # AE preset (models/dcae.py or vae.py)
    decode_size: int = 4096  # image size in px
    tile_px: tuple[int, ...] = (0, 1024)  # tile sizes to time (0: one pass)
    decode_estimate_s: float = 10.0  # assumed seconds of one decode item (warm-up + timed), for the budget
    # fmt: on


# --tiny: toy presets of models/flux.py, dcae.py, vae.py at CPU sizes, same code paths; fp32 (a CPU's bf16 matmuls
# are slow without AMX) on one thread (matmuls this small gain nothing from more, and a second thread on a busy
# 2-core machine made steps 50x slower). peak_tflops is a nominal CPU figure: it scales estimates and plan's seconds.
TINY = dict(
    base="toy",
    base_ae="toy-vae-f8c4",
    dcgen_1k="toy-f32c16",
    dcgen_1k_ae="toy-f32c16",
    dcgen_4k="toy-f32c16",
    dcgen_4k_ae="toy-f32c16",
    dcgen_1k_max=256,
    sizes=(256, 512),
    text_len=32,
    train_preset="tiny",
    train_latent_hw=8,
    train_txt_len=16,
    micro_batch=2,
    rank=8,
    ae="tiny-1.5",
    decode_size=256,
    tile_px=(0, 128),
    dtype="fp32",
    threads=1,
    peak_tflops=0.1,
)


# ----------------------------------------------------------------------------------------------------------------
# helpers: budget, memory, errors


class Clock:
    """Seconds since the start, the budget check, and a log line stamped with the elapsed time."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s, self.notes = time.perf_counter(), budget_s, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)

    def fits(self, what: str, estimate_s: float) -> dict | None:
        """None if the item fits the budget, else its skip record (also noted and printed)."""
        if self.elapsed() + estimate_s <= self.budget_s:
            return None
        why = f"{self.elapsed():.0f} s elapsed + {estimate_s:.0f} s estimated > {self.budget_s:.0f} s budget"
        self.notes.append(f"skipped {what}: {why}")
        self.log(f"skip {what}: {why}")
        return {"skipped": why}


def attempt(clock: Clock, what: str, fn, errors: list[str]) -> dict:
    """Run one item. An exception (out of memory, a kernel's size limit, a bug in plan.py) is
    recorded in gpu.json and gpu.md, printed, and turns the exit status to 1, and the run goes on:
    one failing item must not cost a short GPU loan the others."""
    try:
        return fn()
    except Exception as e:
        errors.append(f"{what}: {type(e).__name__}: {str(e)[:500]}")
        clock.log(f"ERROR {errors[-1]}")
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    """The CUDA allocator's peak since reset_peak; None on a CPU (the process's peak RSS would mix
    all items)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Return the memory of dropped models to the device, so the next item starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ae_params(name: str):
    if name not in AE_PRESETS:
        raise ValueError(f"unknown AE preset {name!r}; choose from {sorted(AE_PRESETS)}")
    return AE_PRESETS[name]


def flux_params(name: str):
    if name not in FLUX_PRESETS:
        raise ValueError(f"unknown FLUX preset {name!r}; choose from {sorted(FLUX_PRESETS)}")
    return FLUX_PRESETS[name]


def spatial_factor(ae_name: str) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return build_autoencoder(ae_params(ae_name)).spatial_factor


# ----------------------------------------------------------------------------------------------------------------
# 1. transformer latency per denoising step


def latency_plan(cfg: Config) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(role, FLUX preset, AE preset, sizes) in run order: the cheap DC-Gen models first, the base
    last, so that a tight budget drops the most expensive items (FLUX at 4K) first."""
    small = tuple(s for s in cfg.sizes if s <= cfg.dcgen_1k_max)
    large = tuple(s for s in cfg.sizes if s > cfg.dcgen_1k_max)
    return [
        ("dcgen", cfg.dcgen_1k, cfg.dcgen_1k_ae, small),
        ("dcgen", cfg.dcgen_4k, cfg.dcgen_4k_ae, large),
        ("base", cfg.base, cfg.base_ae, tuple(cfg.sizes)),
    ]


def build_role(role: str, preset: str, ae_name: str, device, dtype) -> bench.Role:
    """A bench.Role of random weights. Not bench.build_role: that one fixes the real presets (no
    tiny run) and materialises the AE too; here the AE stays on the meta device, read only for its
    spatial factor."""
    with torch.device("meta"):
        # in dtype already: no fp32 copy of 12B (48 GB) on the device
        model = Flux(flux_params(preset)).to(dtype)
        ae = build_autoencoder(ae_params(ae_name))
    return bench.Role(
        role, preset, bench.random_init(model, device, dtype), ae, text=None, cfg=False
    )


def compile_blocks(model: Flux, mode: str) -> None:
    """Regional compilation: every transformer block compiled in place, the 19 double-stream blocks
    sharing one compiled graph per shape and the 38 single-stream blocks another. A whole-model
    compile (bench.py --compile) takes minutes per resolution for 57 blocks; this takes seconds and
    runs the same kernels inside the blocks."""
    # NOTE(deviation): bench.py compiles the whole model in max-autotune-no-cudagraphs mode; here
    # blocks, --compile_mode one graph per block class and shape; past the limit (default 8) dynamo
    # would run the blocks eager, silently
    torch._dynamo.config.recompile_limit = 64
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.compile(mode=mode, dynamic=False)


def step_estimate(cfg: Config, preset: str, ae_name: str, size: int) -> tuple[int, float, float]:
    """Tokens, FLOPs of one step, and the seconds that step should take at mfu of peak_tflops."""
    p = flux_params(preset)
    tokens = (size // spatial_factor(ae_name) // p.patch_size) ** 2
    flops = sum(bench.flux_flops(p, tokens, cfg.text_len).values())
    return tokens, flops, flops / (cfg.mfu * cfg.peak_tflops * 1e12)


def latency_item(cfg: Config, role: bench.Role, size: int, device, dtype) -> dict:
    """One warm-up step (kernel selection; compilation of compiled blocks), then `steps` timed
    steps, or steps_big when the warm-up took longer than big_step_s (FLUX-12B at 4K: about 10 s a
    step on an H100)."""
    x, cond, null = bench.inputs(role, size, bench.Config(text_len=cfg.text_len), device, dtype)
    step = bench.step_fn(role, x, cond, null, role.model)
    reset_peak(device)
    with torch.no_grad():
        first_s = bench.timed(step, device)
        n = cfg.steps if first_s <= cfg.big_step_s else cfg.steps_big
        times = [bench.timed(step, device) for _ in range(n)]
    return {
        "steps_timed": n,
        "step_s": statistics.median(times),
        "first_call_s": first_s,
        "peak_gib": peak_gib(device),
    }


def latency_section(
    cfg: Config, clock: Clock, compiled: bool, device, dtype, errors: list[str], rows: list[dict]
):
    """Every model of the pair at its sizes, eager or compiled, appended to `rows` as measured. A
    compiled item's estimate includes a compilation only for a sequence length not compiled yet (the
    graphs are shared across models: DC-Gen at 4K has FLUX's 1K shape); after the first, the
    measured compile time replaces --compile_s if it is longer."""
    compiled_tokens, compile_s = set(), cfg.compile_s
    for role_name, preset, ae_name, sizes in latency_plan(cfg):
        role = None
        for size in sizes:
            tokens, flops, est_s = step_estimate(cfg, preset, ae_name, size)
            row = {
                "role": role_name,
                "model": preset,
                "size": size,
                "tokens": tokens,
                "compiled": compiled,
            }
            row["tflop"] = flops / 1e12
            what = f"latency {preset} @ {size} px{' compiled' if compiled else ''}"
            if compiled and device.type != "cuda":
                rows.append(
                    {
                        **row,
                        "skipped": "compile: GPU only (inductor's CPU build would dominate a CI minute)",
                    }
                )
                continue
            n = cfg.steps if est_s <= cfg.big_step_s else cfg.steps_big
            new_shape = compiled and tokens not in compiled_tokens
            skip = clock.fits(what, (1 + n) * est_s + (compile_s if new_shape else 0.0))
            if skip:
                rows.append({**row, **skip})
                continue
            if role is None:  # built once per model, only if one of its items fits the budget
                role = build_role(role_name, preset, ae_name, device, dtype)
                if compiled:
                    compile_blocks(role.model, cfg.compile_mode)
            row.update(
                attempt(clock, what, partial(latency_item, cfg, role, size, device, dtype), errors)
            )
            if "step_s" in row:
                row["tflops_achieved"] = flops / row["step_s"] / 1e12
                if new_shape:
                    compiled_tokens.add(tokens)
                    compile_s = max(compile_s, row["first_call_s"] - row["step_s"])
                clock.log(
                    f"{what}: {row['step_s']:.3f} s/step ({row['steps_timed']} timed, first call "
                    f"{row['first_call_s']:.1f} s), {num(row['tflops_achieved'])} TFLOP/s"
                )
            rows.append(row)
        del role
        release(device)


def speedups(rows: list[dict]) -> list[dict]:
    """Base over DC-Gen seconds per step at each size and compile mode, beside the FLOP ratio and
    the paper's."""
    timed = {(r["role"], r["size"], r["compiled"]): r for r in rows if "step_s" in r}
    out = []
    for (role, size, compiled), dc in timed.items():
        base = timed.get(("base", size, compiled))
        if role != "dcgen" or base is None:
            continue
        paper = PAPER_SECONDS.get(size)
        out.append(
            {
                "size": size,
                "compiled": compiled,
                "base_step_s": base["step_s"],
                "dcgen_step_s": dc["step_s"],
                "speedup": base["step_s"] / dc["step_s"],
                "flop_ratio": base["tflop"] / dc["tflop"],
                "paper_speedup": paper[0] / paper[1] if paper else None,
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. one LoRA training step


def lora_model(cfg: Config, params, lcfg, device, dtype):
    """lora.py's dtype policy (bf16 frozen base; fp32 LoRA A, B and latent layers), built on the meta
    device and materialised on the GPU in its dtype: no fp32 copy of 12B (48 GB) on the way. Returns
    the model, its trainable tensors, AdamW over them and the fp32 EMA (empty without --ema)."""
    with torch.device("meta"):
        model = Flux(params)
    model = bench.random_init(model, device, dtype).train()
    model = training.prepare(model, lcfg.rank, lcfg.alpha, model.lora_targets, model.latent_layers)
    model.grad_checkpointing = True
    trainable = [t for t in model.parameters() if t.requires_grad]
    betas = (lcfg.beta1, lcfg.beta2)
    opt = torch.optim.AdamW(trainable, lr=lcfg.lr, betas=betas, weight_decay=lcfg.weight_decay)
    ema = {}
    if cfg.ema:
        ema = {
            n: t.detach().float().clone() for n, t in model.named_parameters() if t.requires_grad
        }
    return model, trainable, opt, ema


def lora_step(cfg: Config, clock: Clock, device, dtype) -> dict:
    """lora.py's model, loss and update on random latents: the step's seconds and peak memory, and
    plan.predict's."""
    params = flux_params(cfg.train_preset)
    assert params.guidance_embed, f"{cfg.train_preset}: the guide loss needs a distilled preset"
    C, hw, b, p = params.in_channels, cfg.train_latent_hw, cfg.micro_batch, params.patch_size
    pred = plan.predict(
        "lora",
        params,
        micro_batch=b,
        latent_hw=(hw, hw),
        txt_len=cfg.train_txt_len,
        dtype=cfg.dtype,
        grad_checkpointing=True,
        fsdp_world=1,
        lora_rank=cfg.rank,
        guide=True,
        aug_k=1,
    )
    pred_s = pred["flops"] / (cfg.mfu * cfg.peak_tflops * 1e12)
    row = {"plan": pred, "plan_step_s": pred_s, "plan_peak_gib": pred["peak"] / 2**30}
    skip = clock.fits("the LoRA step", (cfg.train_warmup + cfg.train_steps) * pred_s + 5.0)
    if skip:
        return {**row, **skip}
    lcfg = lora.Config(
        preset=cfg.train_preset,
        rank=cfg.rank,
        alpha=float(cfg.rank),
        dtype=cfg.dtype,
        shift="flux",
        grad_checkpointing=True,
    )
    model, trainable, opt, ema = lora_model(cfg, params, lcfg, device, dtype)

    # --- data: random latents and T5 / CLIP states of the real shapes ---
    x0 = torch.randn(b, C, hw, hw, device=device)  # (b, C, h, w), fp32 as lora.py reads the cache
    cond = {
        "txt": torch.randn(b, cfg.train_txt_len, params.context_in_dim, device=device, dtype=dtype),
        "y": torch.randn(b, params.vec_in_dim, device=device, dtype=dtype),
    }
    null = {k: v[:1].clone() for k, v in cond.items()}  # the empty prompt's states, (1, ...)
    r = shift_for(lcfg.shift, (C, hw, hw), p)
    losses = []

    def step(i: int) -> None:
        """lora.py's loop body: the guide loss under autocast, backward, clip, AdamW, EMA."""
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
            g = step_generator(0, i)
            x_t, sigma, v, _, w = training.draw(x0, g, b, 0, r, 0.0, lcfg.w_min, lcfg.w_max)
            loss = training.guide_loss(model, model, x_t, sigma, v, cond, null, w)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, lcfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            update_ema(ema, model, lcfg.ema)
        losses.append(loss.item())

    # --- steps: warm-up (AdamW's state appears at the first), then timed; the peak covers both ---
    reset_peak(device)
    for i in range(cfg.train_warmup):
        bench.timed(partial(step, i), device)
    times = [
        bench.timed(partial(step, cfg.train_warmup + i), device) for i in range(cfg.train_steps)
    ]
    row["step_s"] = statistics.median(times)
    row["peak_gib"] = peak_gib(device)
    row["step_ratio"] = row["step_s"] / pred_s  # measured / predicted
    peak = row["peak_gib"]
    row["peak_ratio"] = peak / row["plan_peak_gib"] if peak is not None else None
    row["trainable_m"] = sum(t.numel() for t in trainable) / 1e6
    # plan's FLOPs over the measured time
    row["tflops_achieved"] = pred["flops"] / row["step_s"] / 1e12
    row["loss"] = losses[-1]
    mem = f", peak {peak:.1f} GiB (plan {row['plan_peak_gib']:.1f})" if peak is not None else ""
    clock.log(
        f"LoRA step {cfg.train_preset} b={b} @ {hw}x{hw} latent: {row['step_s']:.3f} s "
        f"(plan {pred_s:.3f} s){mem}, loss {row['loss']:.4f}"
    )
    return row  # the model, optimizer and EMA go with this frame (main frees their device memory)


# ----------------------------------------------------------------------------------------------------------------
# 3. DC-AE decode


def decode_item(ae, z: torch.Tensor, tile_px: int, device) -> dict:
    ae.tile_px = tile_px or None  # tiles overlap by a quarter of their size
    with torch.no_grad():
        # warm-up: cuDNN's kernel choice for every conv shape
        bench.timed(lambda: ae.decode(z), device)
        reset_peak(device)
        seconds = bench.timed(lambda: ae.decode(z), device)
    # weights + latent + activations + image
    return {"seconds": seconds, "peak_gib": peak_gib(device)}


def decode_section(cfg: Config, clock: Clock, device, dtype, errors: list[str], rows: list[dict]):
    """One decode per tile size, appended to `rows` as measured."""
    ae = None
    for tile in cfg.tile_px:
        what = f"decode {cfg.ae} @ {cfg.decode_size} px, tile {tile or 'none'}"
        row = {"ae": cfg.ae, "size": cfg.decode_size, "tile_px": tile}
        skip = clock.fits(what, cfg.decode_estimate_s)
        if skip:
            rows.append({**row, **skip})
            continue
        if ae is None:
            with torch.device("meta"):
                ae = build_autoencoder(ae_params(cfg.ae))
            ae = bench.random_init(ae, device, dtype)
            f = ae.spatial_factor
            z = torch.randn(
                1, ae.latent_channels, cfg.decode_size // f, cfg.decode_size // f, device=device
            )
            z = z.to(dtype)  # (1, C, size / f, size / f)
        row.update(attempt(clock, what, partial(decode_item, ae, z, tile, device), errors))
        if "seconds" in row:
            mem = f", peak {row['peak_gib']:.2f} GiB" if row["peak_gib"] is not None else ""
            clock.log(f"{what}: {row['seconds']:.2f} s{mem}")
        rows.append(row)
    del ae
    release(device)


# ----------------------------------------------------------------------------------------------------------------
# report


def fmt(v, spec: str, unit: str = "") -> str:
    return "-" if v is None else format(v, spec) + unit


def num(v: float | None) -> str:
    """Figures from a toy's 1e-6 TFLOP to FLUX's thousands, readable in one column."""
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2g}"


def status(r: dict, key: str, spec: str) -> str:
    """A measured figure, or why there is none."""
    return "skipped" if "skipped" in r else "error" if "error" in r else fmt(r.get(key), spec)


def markdown(res: dict) -> str:
    run, cfg = res["run"], res["config"]
    dirty = " (dirty)" if run["git_dirty"] else ""
    md = [
        f"# GPU check on {run['device']}",
        "",
        f"torch {run['torch']}, CUDA {run['cuda']}, commit {run['git_commit'][:10]}{dirty}, {cfg['dtype']}, random "
        f"weights; {res['elapsed_s']:.0f} s of a {cfg['budget_s']:.0f} s budget. Memory: {res['memory']}.",
        "",
        "## Transformer seconds per denoising step",
        "",
        "| model | px | tokens | compile | TFLOP/step | s/step | steps timed | first call s | TFLOP/s | peak GiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["latency"]:
        md.append(
            f"| {r['model']} | {r['size']} | {r['tokens']} | {'yes' if r['compiled'] else 'no'} | "
            f"{num(r['tflop'])} | {status(r, 'step_s', '.3f')} | {fmt(r.get('steps_timed'), 'd')} | "
            f"{fmt(r.get('first_call_s'), '.1f')} | {num(r.get('tflops_achieved'))} | "
            f"{num(r.get('peak_gib'))} |"
        )
    md += [
        "",
        "| px | compile | base s/step | DC-Gen s/step | speed-up | FLOP ratio | paper speed-up (end to end) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in res["speedup"]:
        md.append(
            f"| {s['size']} | {'yes' if s['compiled'] else 'no'} | {s['base_step_s']:.3f} | "
            f"{s['dcgen_step_s']:.3f} | {s['speedup']:.1f}x | {s['flop_ratio']:.1f}x | "
            f"{fmt(s['paper_speedup'], '.1f', 'x')} |"
        )
    t = res["lora_step"]
    md += [
        "",
        f"## One LoRA training step (guide loss, grad checkpointing, AdamW; plan at {cfg['mfu']:g} of "
        f"{cfg['peak_tflops']:g} TFLOP/s)",
        "",
        "| model | latent | txt | micro-batch | rank | s/step | plan s/step | measured / plan | peak GiB | "
        "plan peak GiB | measured / plan |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {t['model']} | {t['latent_hw']}x{t['latent_hw']} | {t['txt_len']} | {t['micro_batch']} | {t['rank']} | "
        f"{status(t, 'step_s', '.3f')} | {fmt(t.get('plan_step_s'), '.3f')} | {fmt(t.get('step_ratio'), '.2f')} | "
        f"{num(t.get('peak_gib'))} | {num(t.get('plan_peak_gib'))} | "
        f"{fmt(t.get('peak_ratio'), '.2f')} |",
    ]
    md += [
        "",
        "## DC-AE decode",
        "",
        "| AE | px | tile px | s | peak GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["decode"]:
        md.append(
            f"| {r['ae']} | {r['size']} | {r['tile_px'] or 'none'} | {status(r, 'seconds', '.2f')} | "
            f"{num(r.get('peak_gib'))} |"
        )
    md += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    if res["errors"]:
        md += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv)
    if cfg.tiny:
        cfg = dataclasses.replace(cfg, **TINY)
    assert cfg.dtype in ("bf16", "fp32"), f"--dtype {cfg.dtype!r}: choose bf16 or fp32"
    device = torch.device(
        cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    # a typo fails now, not minutes in
    for name in (cfg.base, cfg.dcgen_1k, cfg.dcgen_4k, cfg.train_preset):
        flux_params(name)
    for name in (cfg.base_ae, cfg.dcgen_1k_ae, cfg.dcgen_4k_ae, cfg.ae):
        ae_params(name)
    clock = Clock(cfg.budget_s)
    info = run_info()
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} thread(s)"
    )
    info["device"] = name
    print(json.dumps({"config": dataclasses.asdict(cfg), "run": info}, indent=2))
    errors: list[str] = []
    res = {
        "run": info,
        "config": dataclasses.asdict(cfg),
        "latency": [],
        "decode": [],
        "errors": errors,
    }
    res["lora_step"] = {
        "model": cfg.train_preset,
        "latent_hw": cfg.train_latent_hw,
        "txt_len": cfg.train_txt_len,
        "micro_batch": cfg.micro_batch,
        "rank": cfg.rank,
    }
    if device.type == "cuda":
        res["memory"] = "torch.cuda.max_memory_allocated, reset before each item"
    else:
        res["memory"] = "not measured on a CPU (the process's peak RSS would mix every item)"

    # Run order: eager latency, the LoRA step, the decode, then the compiled latency, whose compile
    # times are the least certain estimates: when the budget runs out, what goes is compiled FLUX at
    # the largest sizes. Whatever happens, what was measured is written (an unexpected exception
    # still ends the run, after the files).
    try:
        latency_section(cfg, clock, False, device, dtype, errors, res["latency"])
        res["lora_step"].update(
            attempt(clock, "LoRA step", partial(lora_step, cfg, clock, device, dtype), errors)
        )
        release(device)
        decode_section(cfg, clock, device, dtype, errors, res["decode"])
        if cfg.compile:
            latency_section(cfg, clock, True, device, dtype, errors, res["latency"])
    finally:
        res["speedup"] = speedups(res["latency"])
        res["notes"] = clock.notes + [
            "speed-up: base over DC-Gen seconds per transformer step; the paper's is end to end (text, steps, decode)",
            f"compile: each transformer block compiled (regional), mode {cfg.compile_mode}; first call s includes it"
            if device.type == "cuda"
            else "compile: skipped on a CPU (GPU only)",
        ]
        res["elapsed_s"] = clock.elapsed()
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "gpu.md").write_text(markdown(res))
        print(markdown(res))
        clock.log(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return res


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
