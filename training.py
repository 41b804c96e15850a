"""What the three fine-tuning stages share: align.py --stage head (DC-Gen stage 2), lora.py (stage 3) and distill.py.

Each stage script loads its model, writes its loss in its own file and hands both to `train`. Shared here:
  * `prepare`: LoRA injected on the model's targets, requires_grad set, trainable tensors in fp32 beside a bf16 base;
  * `draw`, `flow_matching_loss`, `guide_loss`: a training point on the rectified-flow path and the two diffusion
    objectives DC-Gen trains with (the stages choose between them);
  * `train`: the loop (DDP or FSDP2, bf16 autocast, AdamW, clipping, EMA, DC-AE 1.5 channel prefixes, previews,
    validation, atomic checkpoints of the trainable tensors, exact resume, diffusers' LoRA file);
  * `merged_state_dict`: the weights of a model folder, in the dtype the run trained in.
The anchor is EDM's split of `training/loss.py` from `training_loop.py`: the loop knows nothing of the objective.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from common import (
    Dist,
    UsageError,
    denoise,
    draw_prefixes,
    get_noise,
    get_schedule,
    guided_velocity,
    load_ckpt,
    lr_at,
    print0,
    sample_sigmas,
    save_ckpt,
    save_image_grid,
    shift_for,
    step_generator,
    update_ema,
    wrap_model,
)
from data import BucketSampler, LatentCache
from models.autoencoder import load_autoencoder
from models.c2i import ddim_sample, eps_objective, gaussian_loss
from models.lora import inject_lora, lora_layers, save_diffusers_lora, unload_lora
from models.pipeline import SHIFTS, read_shift

# ----------------------------------------------------------------------------------------------------------------
# the model to fine-tune


def prepare(model: nn.Module, rank: int, alpha: float, targets, trainable) -> nn.Module:
    """LoRA of `rank` on the layers matching `targets` (regexes; empty: no LoRA) and the modules
    `trainable` trained in full; rank 0 trains every weight. Only trainable tensors need gradients,
    and they train in fp32 beside a bf16 base (autocast computes in bf16): a bf16 update of 1e-4
    relative would round to nothing."""
    if rank == 0:
        return model.float().requires_grad_(True)
    if targets:
        inject_lora(model, rank, alpha, targets=targets, trainable=trainable)
    # no LoRA: only the named modules train (DC-Gen stage 2: embedder and head, backbone frozen)
    else:
        model.requires_grad_(False)
        for name in trainable:
            model.get_submodule(name).requires_grad_(True)
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.float()
    return model


def check_latent(model: nn.Module, shape: tuple[int, int, int], what: str) -> None:
    """The model must take the cached latents: C channels, a grid its patch size divides."""
    C, h, w = shape
    p, C_model = model.params.patch_size, model.params.in_channels
    if C_model != C or h % p or w % p:
        raise ValueError(
            f"the model takes latents of {C_model} channels in {p}x{p} patches, but {what} holds latents of shape "
            f"{(C, h, w)}: wrong --init, --cache or --latent"
        )


def open_cache(folder: str, *latents: str) -> LatentCache:
    """The latent cache a stage trains on, checked before the stage writes anything (config.json, log.txt): it
    exists, holds rows, and holds `latents`."""
    # a folder without meta.json: FileNotFoundError naming it and the command to run
    cache = LatentCache(folder)
    if len(cache) == 0:
        raise UsageError(
            f"the latent cache {folder} holds no rows; write it with align.py --stage cache"
        )
    missing = [k for k in latents if k not in cache.meta["shapes"]]
    if missing:
        have = sorted(cache.meta["shapes"])
        raise UsageError(f"the latent cache {folder} has no {missing} latents (it holds {have})")
    return cache


def latest_checkpoint(out_dir, log=None, keys=("model", "optimizer", "step")) -> tuple:
    """(path, contents) of the newest out_dir/ckpt_*.pt that loads and holds `keys`, or (None, None). A newer one
    that does not (truncated by a full disk or a partial copy: every save is atomic, so not by a crash) is named in
    one line and skipped, and --resume continues from the one before."""
    for path in sorted(Path(out_dir).glob("ckpt_*.pt"), reverse=True):
        try:
            ckpt = load_ckpt(path)
            missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
            problem = f"{path} holds no {missing}: not a training checkpoint" if missing else ""
        except ValueError as e:  # load_ckpt's "<path> is truncated or corrupt (...)"
            problem = str(e)
        if not problem:
            return path, ckpt
        print0(f"warning: {problem}; skipped, trying the checkpoint before it", log_file=log)
    return None, None


def cache_rows(cache: LatentCache, batch: tuple[int, list[int]], keys: list[str]) -> str:
    """Where a non-finite loss came from: the batch's cache rows (bucket, rows in it), by shard file,
    whose cached values are not finite, or, when all are finite, the batch's rows (the model
    diverged)."""
    bucket, rows = batch
    values = cache.get(rows, keys, bucket)
    bad = [r for i, r in enumerate(rows) if not all(v[i].isfinite().all() for v in values.values())]
    files, starts = cache.files[bucket], cache.starts[bucket]  # [(file, rows)], first row of each
    by_shard = {}  # shard file -> its rows
    for r in sorted(bad or rows):
        s = int(np.searchsorted(starts, r, side="right")) - 1
        by_shard.setdefault(files[s][0], []).append(str(r - int(starts[s])))
    where = "; ".join(f"{f} rows {', '.join(r)}" for f, r in by_shard.items())
    where += f" of {cache.folder}"
    return (
        f"non-finite cached values in {where}"
        if bad
        else f"batch {where} is finite: the model diverged"
    )


def full_layers(model: nn.Module) -> tuple[str, ...]:
    """The modules trained in full beside LoRA (DC-Gen: x_embedder and proj_out), by name."""
    names = {
        n.rpartition(".")[0]
        for n, p in model.named_parameters()
        if p.requires_grad and ".lora_" not in n
    }
    return tuple(sorted(names))


def check_loaded(result, model: nn.Module, source) -> None:
    """A checkpoint holds a run's trainable tensors only: it must name no unknown tensor and miss no
    trainable one."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(result.unexpected_keys)
    missing = sorted(set(result.missing_keys) & trainable)
    if unknown or missing:
        raise ValueError(
            f"{source} does not fit the model its config builds: unknown tensors {unknown[:4]}, missing "
            f"trainable tensors {missing[:4]}; was it written by another run or version?"
        )


def with_shift(cfg):
    """cfg with --shift resolved before config.json is written: given, or the --init folder's own
    (what sample.py uses for it), so a run trains at the noise levels its model samples at (SANA a
    constant 3.0, FLUX mu(L)); a model trained from a preset takes FLUX's."""
    if cfg.shift:
        choices = f'choose one of {SHIFTS} (or "": the model folder\'s own)'
        assert cfg.shift in SHIFTS, f"--shift {cfg.shift!r}: {choices}"
        return cfg
    shift, value = read_shift(cfg.init) if cfg.init else ("flux", cfg.shift_value)
    return dataclasses.replace(cfg, shift=shift, shift_value=value)


RENAMED = {"aug_channels": "prefixes", "aug_k": "num_prefixes", "aug_full": "always_max"}


def run_config(cls, saved: dict, **overrides):
    """A stage's Config from a checkpoint's saved one: flags renamed since (RENAMED) take their new
    names, flags the stage no longer has are dropped, and `overrides` applied (e.g. merge="")."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {RENAMED.get(k, k): v for k, v in saved.items()}
    return cls(**{k: v for k, v in fields.items() if k in names} | overrides)


def merged_state_dict(
    model: nn.Module, weights: dict, dtype: torch.dtype, source
) -> dict[str, torch.Tensor]:
    """`weights` (a checkpoint's trainable tensors) loaded into the prepared model, LoRA folded into
    the base, every tensor in `dtype`: the run's (bf16 for --dtype bf16, as the released DC-Gen
    weights)."""
    check_loaded(model.load_state_dict(weights, strict=False), model, source)
    model = unload_lora(model) if lora_layers(model) else model  # W + (alpha / r)·B·A, in W's dtype
    # the fp32-trained layers join the base's dtype
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# a training point and the diffusion objectives


def draw(x0, g, batch: int, rank: int, r: float, drop_text: float, w_min: float, w_max: float):
    """A training point for each of this rank's latents x0 (b, C, h, w). Every draw is made for the
    global batch and sliced, so any number of ranks (and a resumed run) sees the same numbers.
    Returns x_t, sigma, the target velocity v = noise - x0, the text-dropout mask and a guidance
    scale w ~ U(w_min, w_max)."""
    b = x0.shape[0]
    rows = slice(rank * b, (rank + 1) * b)  # this rank's slice of the global batch
    noise = torch.randn((batch, *x0.shape[1:]), generator=g)[rows].to(x0)
    sigma = sample_sigmas(batch, r, g)[rows].to(x0)  # (b,)
    drop = (torch.rand(batch, generator=g) < drop_text)[rows].to(x0.device)
    w = (w_min + (w_max - w_min) * torch.rand(batch, generator=g))[rows].to(x0)
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x0 + s * noise  # the straight path of rectified flow
    return x_t, sigma, noise - x0, drop, w


def flow_matching_loss(model, x_t, sigma, v, cond: dict) -> torch.Tensor:
    """|| v_θ(x_t, t, c) - (noise - x0) ||²: flow matching. A guidance-distilled model is asked for
    its conditional velocity (embedded guidance w = 1)."""
    raw = getattr(model, "module", model)  # under DDP the params live on the wrapped module
    w_one = (
        {"guidance": torch.ones_like(sigma)} if getattr(raw.params, "guidance_embed", False) else {}
    )
    return F.mse_loss(model(x_t, sigma, **cond, **w_one).float(), v.float())


def guide_loss(
    model, frozen, x_t, sigma, v, cond: dict, null: dict, w, uncond: str = "one"
) -> torch.Tensor:
    """DC-Gen's guide loss for guidance-distilled bases (FLUX.1-Krea), DC-Gen §3.3 Eqs. (3)-(7), as
    the official `dc_ai/t2icore/models/flux.py` (Flux.forward_train, use_guide_loss) computes it. A
    distilled model's output is v_g ≈ v_u + w·(v_c - v_u), so the conditional velocity it implies,
    v_hat = (v_g - (1 - w)·v_u) / w, is regressed on the data's velocity: the guidance embedded in
    the model stays meaningful while it moves to the new latent."""
    # guided prediction at a random scale w, with gradient
    v_g = model(x_t, sigma, **cond, guidance=w)
    # NOTE(deviation): the official code evaluates v_u at guidance 1; the paper's Eqs. (5)-(7) at
    # the same w as v_g. We follow the code; --guide_uncond w is the paper's variant.
    with torch.no_grad():  # the unconditional prediction is a fixed target-side term
        null_b = {k: t.expand(len(x_t), *t.shape[1:]) for k, t in null.items()}
        w_u = torch.ones_like(w) if uncond == "one" else w
        v_u = frozen(x_t, sigma, **null_b, guidance=w_u)
    w = w[:, None, None, None]
    # DC-Gen Eq. (6): the conditional velocity implied by v_g
    v_hat = (v_g.float() - (1 - w) * v_u.float()) / w
    return F.mse_loss(v_hat, v.float())  # DC-Gen Eq. (7)


# ----------------------------------------------------------------------------------------------------------------
# validation and previews


@torch.no_grad()
def validate(raw, cache: LatentCache, latent: str, c, device) -> float:
    """Flow-matching loss of the conditional velocity (guidance w = 1 for guidance-distilled models)
    on every row of a held-out cache, with the same noise and noise levels at every call: comparable
    across steps and runs (c: the run's config). A model on DiT's ε/Σ objective: that loss instead,
    per row, with the same fixed noise and timesteps."""
    keys = [latent, *sorted(cache.null)]
    total, values = 0.0, 0
    for bucket, n in enumerate(cache.counts()):  # every row of every bucket
        for start in range(0, n, c.batch_size):
            idx = torch.arange(start, min(n, start + c.batch_size))
            batch = {k: v.to(device) for k, v in cache.get(idx, keys, bucket).items()}
            x0 = batch.pop(latent).float()
            seed = start if bucket == 0 else (bucket << 32) + start
            g = torch.Generator().manual_seed(seed)
            if eps_objective(c.loss, raw):
                total += gaussian_loss(raw, x0, batch, g).item() * len(idx)
                values += len(idx)
                continue
            r = shift_for(c.shift, x0.shape[1:], raw.params.patch_size, c.shift_value)
            x_t, sigma, v, _, _ = draw(x0, g, len(idx), 0, r, 0.0, 1.0, 1.0)
            w = (
                {"guidance": torch.ones_like(sigma)}
                if getattr(raw.params, "guidance_embed", False)
                else {}
            )
            total += F.mse_loss(
                raw(x_t, sigma, **batch, **w).float(), v.float(), reduction="sum"
            ).item()
            values += v.numel()
    return total / values


@torch.no_grad()
def preview(raw, ae, cond: dict, null: dict, latent_shape, r: float, c, path: Path) -> None:
    """Fixed captions, fixed noise, the current weights: a grid to watch training by (c: the run's
    config)."""
    first = next(iter(cond.values()))  # text states, or class labels ("label")
    B = first.shape[0]
    x = get_noise((B, *latent_shape), seed=c.seed).to(first.device)
    if eps_objective(c.loss, raw):  # DiT's ε/Σ objective: its DDIM sampler, CFG on the labels
        x = ddim_sample(raw, x, cond["label"], {}, c.sample_steps, c.sample_guidance)
    elif getattr(raw.params, "guidance_embed", False):  # embedded guidance, whatever the loss
        v = guided_velocity(raw, cond, guidance=c.sample_guidance)
        x = denoise(v, x, get_schedule(c.sample_steps, r))
    else:
        v = guided_velocity(raw, cond, null, cfg=c.sample_guidance)
        x = denoise(v, x, get_schedule(c.sample_steps, r))
    save_image_grid(ae.decode(x.to(next(ae.parameters()).dtype)), path, nrow=B)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor of t (FSDP shards are gathered: every rank must call this)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


# ----------------------------------------------------------------------------------------------------------------
# the training loop

# Fields `train` reads from a stage's Config, and their values for a stage whose Config lacks them
# (align.py's head stage has no EMA, no decay, no prefixes): one loop, each stage's --help with only
# its own flags.
OPTIONAL = dict(
    decay=0,
    beta1=0.9,
    weight_decay=0.0,
    ema=0.0,
    val_cache="",
    val_every=0,
    sample_count=4,
    sample_steps=20,
    sample_guidance=3.5,
    prefixes=(),
    num_prefixes=2,
    always_max=True,
    init="",
    loss="fm",
)
LossFn = Callable[[nn.Module, torch.Tensor, dict, torch.Generator, float], torch.Tensor]


def lora_file_base(raw: nn.Module, init: str) -> tuple[tuple[str, ...], dict] | None:
    """What diffusers' LoRA file needs beside the LoRA tensors: the modules trained in full and
    their --init weights (it stores each as its change from them), taken before training or resuming
    moves them. None where no such file can be written: no --init folder, no LoRA, or a full module
    that is no nn.Linear (SANA's conv embedder)."""
    full = full_layers(raw)
    if (
        not init
        or not lora_layers(raw)
        or any(type(raw.get_submodule(n)) is not nn.Linear for n in full)
    ):
        return None
    base = {}
    for name in full:
        for k, v in raw.get_submodule(name).state_dict().items():
            base[f"{name}.{k}"] = v.detach().float().cpu().clone()
    return full, base


def resume(model: nn.Module, raw: nn.Module, opt, ema: dict, ckpt: dict, path: Path, device) -> int:
    """Load a checkpoint's trainable tensors, optimizer state and EMA into a (possibly FSDP-sharded)
    model; every rank reads the file and FSDP re-shards what it loads. Returns the step to continue
    from."""
    opts = StateDictOptions(full_state_dict=True, strict=False)  # the trainable tensors only
    check_loaded(set_model_state_dict(model, ckpt["model"], options=opts), raw, path)
    set_optimizer_state_dict(
        model, opt, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    for n, p in raw.named_parameters():
        if n in ema:  # EMA tensors live like their parameters: sharded under FSDP
            v = ckpt["ema"][n].to(device)
            ema[n] = (
                distribute_tensor(v, p.device_mesh, p.placements) if isinstance(p, DTensor) else v
            )
    return ckpt["step"]


def save(model, raw, opt, ema: dict, cfg, step: int, d: Dist, lora_file, dtype, last_good) -> Path:
    """Atomically write the trainable tensors, EMA, optimizer and config as out_dir/ckpt_{step}.pt,
    and diffusers' LoRA file beside it; every rank takes part (FSDP gathers the shards), the master
    writes."""
    params = [p for p in model.parameters() if p.requires_grad]
    finite = torch.tensor(float(all(torch.isfinite(p).all() for p in params)))  # this rank's shards
    if d.world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    # an update diverged after the loss was computed: never let it replace a good checkpoint
    if not finite:
        raise UsageError(f"non-finite weights after step {step}; last good checkpoint: {last_good}")
    sd_opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = {
        "model": get_model_state_dict(model, options=sd_opts),
        "optimizer": get_optimizer_state_dict(model, opt, options=sd_opts),
        "ema": {n: full_tensor(t) for n, t in ema.items()},
        "step": step,
        "config": dataclasses.asdict(cfg),
    }
    out = Path(cfg.out_dir)
    path = out / f"ckpt_{step:07d}.pt"
    if d.master:
        save_ckpt(state, path)
    if d.master and lora_file is not None:  # the EMA weights when there are, as --merge folds in
        full, base = lora_file
        weights = state["ema"] or state["model"]
        save_diffusers_lora(raw, out, full=full, base=base, state_dict=weights, dtype=dtype)
    return path


def prefix_loss(loss_fn: LossFn, model, x0, text: dict, g, c, p: int) -> torch.Tensor:
    """The step's loss: loss_fn on the full latent, or with --prefixes the mean over K channel
    prefixes x0[:, :c'], each at the shift of its own size (DC-AE 1.5's augmented diffusion
    training, official `dc_gen/c2icore/trainer.py`)."""
    C = x0.shape[1]
    # NOTE(deviation): the official trainer draws the prefixes from a per-GPU generator; here every
    # rank draws the same ones (from the step's generator), so N ranks train exactly as one process
    # and a resume replays.
    prefixes = draw_prefixes(g, c.prefixes, c.num_prefixes, c.always_max, C) if c.prefixes else [C]
    loss = 0.0
    for n_ch in prefixes:
        r = shift_for(c.shift, (n_ch, *x0.shape[2:]), p, c.shift_value)
        loss = loss + loss_fn(model, x0[:, :n_ch], text, g, r) / len(prefixes)
    return loss


def log_line(step: int, c, loss: float, grad_norm: float, lr: float, dt: float, device) -> str:
    """One `key value` line of the training log (peak GPU memory since start on CUDA)."""
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    line = f"step {step:07d}/{c.steps:07d} | loss {loss:.4f} | grad {grad_norm:.3f} | lr {lr:.2e}"
    return line + f" | dt {dt * 1e3:.0f}ms | samples/s {c.batch_size / dt:.1f} | mem {mem:.1f}GB"


def update(loss, params, opt, ema: dict, raw, step: int, c, d: Dist, last_good, where) -> tuple:
    """Backward, clipping, one AdamW step at the step's learning rate, the EMA. Returns the loss averaged
    over the ranks, the gradient norm (before clipping) and the learning rate. A non-finite loss stops
    the run before the update, naming the step and the batch's cache rows (`where(step)`)."""
    lr = lr_at(step, c.lr, c.warmup, steps=c.steps, decay=c.decay)
    for group in opt.param_groups:
        group["lr"] = lr
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, c.clip_grad if c.clip_grad > 0 else math.inf)
    loss_value = loss.detach().clone()
    if d.world_size > 1:
        dist.all_reduce(loss_value, op=dist.ReduceOp.AVG)
    if not math.isfinite(loss_value.item()):
        raise UsageError(
            f"loss is {loss_value.item()} at step {step + 1} ({where(step)}); last good checkpoint: "
            f"{last_good}"
        )
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema:
        update_ema(ema, raw, c.ema)
    return loss_value.item(), grad_norm.item(), lr


def monitor(raw, step: int, c, d: Dist, cache: LatentCache, latent: str, amp, log: Path) -> bool:
    """At their intervals, a preview grid of fixed captions and noise (master; not under FSDP) and the
    validation loss. Returns whether either ran (its time is not training time)."""
    ran = False
    if c.sample_every and step % c.sample_every == 0 and d.master and not c.fsdp:
        # the AE only decodes previews; training reads cached latents
        ae = load_autoencoder(cache.meta[f"{latent}_ae"], device=d.device).eval()
        n = min(c.sample_count, cache.counts()[0])  # bucket 0's first rows
        text = {
            k: v.to(d.device) for k, v in cache.get(torch.arange(n), sorted(cache.null)).items()
        }
        null = {k: v.to(d.device) for k, v in cache.null.items()}
        shape = cache.shape(latent)
        r = shift_for(c.shift, shape, raw.params.patch_size, c.shift_value)
        raw.eval()
        # under --dtype bf16 the frozen weights are bf16 and the trainable ones fp32, as in training
        with amp():
            preview(
                raw, ae, text, null, shape, r, c, Path(c.out_dir) / "samples" / f"{step:07d}.png"
            )
        raw.train()
        ran = True
    validating = (c.val_every and step % c.val_every == 0) or step == c.steps
    if c.val_cache and validating and (d.master or c.fsdp):
        raw.eval()
        with amp():
            val = LatentCache(c.val_cache)
            loss = validate(raw, val, latent, c, d.device)
        print0(f"step {step:07d}/{c.steps:07d} | val_loss {loss:.5f}", log_file=log)
        raw.train()
        ran = True
    return ran


def train(
    cfg, d: Dist, raw: nn.Module, cache: LatentCache, latent: str, loss_fn: LossFn, log: Path
) -> Path:
    """Run cfg.steps optimizer steps of `loss_fn(model, x0, text, g, r)` on this rank's latents x0
    (b, C, h, w) from `cache[latent]` (text: the cached text states; g: the step's generator, r: the
    shift's factor for x0). Returns the last checkpoint. `raw` is the prepared model; it is wrapped
    (DDP or FSDP2) here."""
    c = types.SimpleNamespace(**{**OPTIONAL, **dataclasses.asdict(cfg)})
    dtype = torch.bfloat16 if c.dtype == "bf16" else torch.float32
    # this rank's rows of every step
    # every step's global batch from one bucket, the same on every rank (data.BucketSampler)
    sampler = BucketSampler(
        cache.counts(), c.batch_size // d.world_size, d.rank, d.world_size, c.seed
    )
    lora_file = lora_file_base(raw, c.init)
    C = cache.shape(latent)[0]
    if c.prefixes and not any(n < C for n in c.prefixes):
        raise SystemExit(f"--prefixes {c.prefixes}: none is shorter than the latent's {C} channels")
    raw.adaptive_channels = bool(c.prefixes)  # the model takes channel prefixes x[:, :c']
    raw.grad_checkpointing = c.grad_checkpointing
    raw.to(d.device)
    # DDP or FSDP2; `raw` stays the plain module (FSDP2 shards it in place)
    model = wrap_model(raw, d, c.fsdp)

    # --- optimizer, EMA, resume ---
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay)
    ema = {}
    if c.ema:
        ema = {n: p.detach().float().clone() for n, p in raw.named_parameters() if p.requires_grad}
    last_good, ckpt = latest_checkpoint(c.out_dir, log) if c.resume else (None, None)
    step = resume(model, raw, opt, ema, ckpt, last_good, d.device) if last_good else 0
    if last_good:
        print0(f"resumed from {last_good} at step {step}", log_file=log)
    amp = partial(torch.autocast, d.device.type, dtype=torch.bfloat16, enabled=c.dtype == "bf16")
    keys = [latent, *sorted(cache.null)]
    where = lambda step: cache_rows(cache, sampler.batch_of(step), keys)  # a NaN loss's rows

    # --- training loop ---
    t0 = time.perf_counter()
    while step < c.steps:
        g = step_generator(c.seed, step)
        bucket, rows = sampler.batch_of(step)
        batch = {k: v.to(d.device) for k, v in cache.get(rows, keys, bucket).items()}
        x0 = batch.pop(latent).float()  # (b, C, h, w)
        with amp():
            loss = prefix_loss(loss_fn, model, x0, batch, g, c, raw.params.patch_size)
        loss_value, grad_norm, lr = update(
            loss, params, opt, ema, raw, step, c, d, last_good, where
        )
        step += 1

        if step % c.log_every == 0 or step == c.steps:
            dt = (time.perf_counter() - t0) / c.log_every
            print0(log_line(step, c, loss_value, grad_norm, lr, dt, d.device), log_file=log)
            t0 = time.perf_counter()
        if monitor(raw, step, c, d, cache, latent, amp, log):
            # stop the clock: previews and validation are not training time
            t0 = time.perf_counter()
        if step % c.save_every == 0 or step == c.steps:
            last_good = save(model, raw, opt, ema, cfg, step, d, lora_file, dtype, last_good)
            t0 = time.perf_counter()
    print0(f"done: {step} steps, last checkpoint {last_good}", log_file=log)
    return last_good
