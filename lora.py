"""Stage 3 of DC-Gen: LoRA fine-tuning of the aligned model, end to end (paper §3.3; paper.md A.3, official trainer).

The same loop trains all weights (--rank 0), a base model from scratch (--rank 0 --preset, no --init: the toy zoo's
CFG base), only the latent layers (what `align.py --stage head`, DC-Gen stage 2, runs), and DC-AE 1.5's augmented
diffusion training (--aug_channels, paper.md B.4). --merge folds a LoRA's EMA weights into the base and writes a full
model folder, so the resolution ladder 512 -> 1K -> 4K is: train, merge, train a fresh LoRA at the next size.

The loss, on x_t = (1 - sigma)·x0 + sigma·noise with sigma logit-normal and shifted (common.sample_sigmas) and the
target velocity v = noise - x0:
  * CFG models (SANA, the toy base): flow matching; the caption is replaced by the empty prompt 10% of the time so
    that classifier-free guidance works at sampling.
  * guidance-distilled models (FLUX.1-Krea; chosen when the model has a guidance embedding): DC-Gen's guide loss
    (paper.md A.4, as the official code does it): w ~ U(1, 14), v_g = model(x_t, c, w), v_u = model(x_t, null, 1)
    without gradient, and v_hat = (v_g - (1 - w)·v_u) / w regressed on v. A distilled model's output is
    v_g ≈ v_u + w·(v_c - v_u), so v_hat ≈ v_c: the loss asks the *conditional* velocity inside it to be right,
    which keeps the embedded guidance meaningful while the model moves to the new latent space.

Run:    python lora.py --init out/head/model --cache out/cache-512 --out_dir out/lora-512
        torchrun --standalone --nproc_per_node=8 lora.py --init out/head/model --cache out/cache-512 \
            --fsdp --grad_checkpointing --dtype bf16 --batch_size 512
        python lora.py --merge out/lora-512/ckpt_0010000.pt --out_dir out/lora-512/model
Smoke:  python lora.py --preset tiny --rank 0 --cache out/cache-tiny --latent teacher --steps 2 --out_dir out/smoke
Input:  a model folder (align.py --stage head, a released base, or a merged stage) and a latent cache (align.py
        --stage cache). Output: out_dir/ckpt_{step:07d}.pt (trainable tensors, their EMA, optimizer, step, config),
        config.json, log.txt, samples/{step:07d}.png, pytorch_lora_weights.safetensors (diffusers' LoRA file, for
        `pipe.load_lora_weights(out_dir)` on the --init folder: README); with --merge, a model folder (transformer/
        + linked vae/, text).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from common import (
    cleanup_dist,
    denoise,
    get_noise,
    get_schedule,
    guided_velocity,
    init_dist,
    load_ckpt,
    lr_at,
    parse_config,
    print0,
    run_info,
    sample_sigmas,
    save_ckpt,
    save_config,
    save_image_grid,
    seed_everything,
    shift_factor,
    step_generator,
    update_ema,
    wrap_model,
)
from data import LatentCache, StepSampler
from models.autoencoder import load_autoencoder
from models.flux import PRESETS, Flux
from models.lora import inject_lora, lora_layers, save_diffusers_lora, unload_lora
from models.pipeline import SHIFTS, load_pipeline, read_shift, write_pipeline
from models.text import drop_text

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # what to train
    init: str = ""  # model folder to start from; "" trains --preset from scratch (with --rank 0)
    preset: str = ""  # FLUX preset (models/flux.py) of a model trained from scratch
    cache: str = "out/cache"  # latent cache written by align.py --stage cache
    latent: str = "student"  # cached latent to train on: student (deep-compression AE) or teacher (base AE)
    out_dir: str = "out/lora"  # checkpoints, log.txt, samples/
    rank: int = 256  # LoRA rank; 0 trains all weights
    alpha: float = 256.0  # LoRA alpha: the update is (alpha / rank)·B·A
    lora_targets: tuple[str, ...] | None = None  # regexes of the LoRA layers (default: the model's); empty: no LoRA
    trainable: tuple[str, ...] | None = None  # modules trained in full beside LoRA (default: the model's latent layers)
    # loss
    loss: str = "auto"  # auto (guide if the model embeds guidance, else fm), fm (flow matching), guide
    drop_text: float = 0.1  # probability of training a sample on the empty prompt
    w_min: float = 1.0  # guide loss: smallest guidance scale w
    w_max: float = 14.0  # guide loss: largest guidance scale w
    guide_uncond: str = "one"  # guide loss: v_u at guidance 1 (official code) or at the sampled w ("w", the paper)
    shift: str = ""  # noise-level shift: "" the --init folder's own (sample.py's; flux for --preset), flux (mu linear
    # in tokens), dcgen (sqrt(C·p²·L/4096)) or constant
    shift_value: float = 3.0  # r of --shift constant (with --shift "", the folder's own value)
    aug_channels: tuple[int, ...] = ()  # DC-AE 1.5 augmented training: candidate channel prefixes (empty: off)
    aug_k: int = 2  # loss terms per step: the full latent plus aug_k - 1 prefixes drawn from aug_channels
    aug_full: bool = True  # the full latent is always a term (official always_sample_max_channel); False: all aug_k
    # terms are drawn from aug_channels and the full latent (the official default)
    # optimisation (official stage-3 recipe: AdamW (0.9, 0.95), wd 0, lr 1e-4, 1000 warm-up steps, clip 0.1, EMA 0.999)
    steps: int = 10_000  # optimizer steps
    batch_size: int = 64  # global batch, split over the ranks
    lr: float = 1e-4  # peak learning rate
    warmup: int = 1000  # linear warm-up steps, then constant
    decay: int = 0  # linear decay to 0 over the last `decay` steps (0: none; the official recipe is constant)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    weight_decay: float = 0.0  # AdamW weight decay
    clip_grad: float = 0.1  # max global gradient norm (0: none; the norm is still logged)
    ema: float = 0.999  # EMA decay of the trainable weights (0: no EMA)
    # runtime
    device: str = "auto"  # auto, cuda or cpu
    dtype: str = "fp32"  # fp32, or bf16 (frozen weights stored in bf16, autocast; trainable weights fp32)
    fsdp: bool = False  # shard the model over the ranks (FSDP2, per block) instead of replicating it (DDP)
    grad_checkpointing: bool = False  # recompute block activations in backward (memory O(1) in depth)
    seed: int = 0  # seeds the data order and every draw of the loss
    log_every: int = 10  # steps between log lines
    sample_every: int = 1000  # steps between preview grids (0: never)
    sample_count: int = 4  # previews: the first cached captions, fixed noise
    sample_steps: int = 20  # Euler steps of a preview
    sample_guidance: float = 3.5  # previews: embedded guidance (guidance-distilled) or CFG scale (CFG models)
    save_every: int = 1000  # steps between checkpoints
    val_cache: str = ""  # held-out latent cache: log the validation flow-matching loss on it
    val_every: int = 0  # steps between validations (0: at the end only, when val_cache is given)
    resume: bool = False  # continue from the newest checkpoint in out_dir
    dry_run: bool = False  # print the config and parameter counts, then exit
    merge: str = ""  # a checkpoint of this script: fold its (EMA) weights into its base and write a model folder
    merge_ema: bool = True  # --merge: use the EMA weights (else the raw ones)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def build_model(cfg: Config, cache: LatentCache, dtype: torch.dtype) -> torch.nn.Module:
    """The model to train, with LoRA injected and requires_grad set: only the trainable tensors need gradients."""
    C, h, w = cache.shape(cfg.latent)
    if cfg.init:
        model = load_pipeline(cfg.init, dtype=dtype, parts=("transformer",)).transformer
    else:
        assert cfg.preset in PRESETS, f"without --init, give --preset: one of {sorted(PRESETS)}"
        model = Flux(PRESETS[cfg.preset]).to(dtype)
    p, C_model = model.params.patch_size, model.params.in_channels
    if C_model != C or h % p or w % p:
        raise ValueError(
            f"model {cfg.init or cfg.preset} takes latents of {C_model} channels in {p}x{p} patches, but the cache "
            f"{cfg.cache} holds {cfg.latent} latents of shape {(C, h, w)}: wrong --init, --cache or --latent"
        )
    if cfg.rank == 0:  # all weights train: fp32 master weights (autocast computes in bf16 under --dtype bf16)
        return model.float().requires_grad_(True)
    trainable = model.latent_layers if cfg.trainable is None else cfg.trainable
    targets = model.lora_targets if cfg.lora_targets is None else cfg.lora_targets
    if targets:
        inject_lora(model, cfg.rank, cfg.alpha, targets=targets, trainable=trainable)
    else:  # no LoRA: only the named modules train (DC-Gen stage 2: embedder and head, backbone frozen)
        model.requires_grad_(False)
        for name in trainable:
            model.get_submodule(name).requires_grad_(True)
    for module in model.modules():  # trainable tensors (LoRA A, B; embedder, head) train in fp32 beside a bf16 base
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.float()
    return model


def draw(x0, g, batch, rank, r, cfg):
    """A training point for each of this rank's latents x0 (b, C, h, w). Every draw is made for the global batch
    and sliced, so any number of ranks (and a resumed run) sees the same numbers. Returns x_t, sigma, the target
    velocity v = noise - x0, the text-dropout mask and a guidance scale w ~ U(w_min, w_max)."""
    b = x0.shape[0]
    rows = slice(rank * b, (rank + 1) * b)  # this rank's slice of the global batch
    noise = torch.randn((batch, *x0.shape[1:]), generator=g)[rows].to(x0)
    sigma = sample_sigmas(batch, r, g)[rows].to(x0)  # (b,)
    drop = (torch.rand(batch, generator=g) < cfg.drop_text)[rows].to(x0.device)
    w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(batch, generator=g))[rows].to(x0)
    s = sigma[:, None, None, None]
    return (1 - s) * x0 + s * noise, sigma, noise - x0, drop, w  # x_t on the straight path (rectified flow)


def diffusion_loss(model, frozen, x0, cond, null, g, batch, rank, r, cfg, guide):
    """Stage 3's loss term on this rank's latents: flow matching, or the guide loss for guidance-distilled models."""
    x_t, sigma, v, drop, w = draw(x0, g, batch, rank, r, cfg)
    cond = drop_text(cond, null, drop)
    if not guide:  # plain flow matching; a guidance-distilled model is asked for its conditional velocity (w = 1)
        w_one = {"guidance": torch.ones_like(sigma)} if getattr(frozen.params, "guidance_embed", False) else {}
        return F.mse_loss(model(x_t, sigma, **cond, **w_one).float(), v.float())
    v_g = model(x_t, sigma, **cond, guidance=w)  # guided prediction at a random scale w
    # NOTE(deviation): the official code evaluates v_u at guidance 1; the paper's Eq. 5-7 (as transcribed, paper.md
    # A.4) at the same w as v_g. We follow the code; --guide_uncond w is the paper's variant.
    with torch.no_grad():  # the unconditional prediction is a fixed target-side term (no gradient)
        null_b = {k: t.expand(len(x0), *t.shape[1:]) for k, t in null.items()}
        v_u = frozen(x_t, sigma, **null_b, guidance=torch.ones_like(w) if cfg.guide_uncond == "one" else w)
    w = w[:, None, None, None]
    v_hat = (v_g.float() - (1 - w) * v_u.float()) / w  # the conditional velocity implied by v_g
    return F.mse_loss(v_hat, v.float())


@torch.no_grad()
def validate(raw, cache: LatentCache, cfg: Config, device) -> float:
    """Flow-matching loss of the conditional velocity (guidance w = 1 for guidance-distilled models) on every row of
    a held-out cache, with the same noise and noise levels at every call: comparable across steps and runs."""
    keys, total = [cfg.latent, *sorted(cache.null)], 0.0
    cfg = dataclasses.replace(cfg, drop_text=0.0)
    for start in range(0, len(cache), cfg.batch_size):
        idx = torch.arange(start, min(len(cache), start + cfg.batch_size))
        batch = {k: v.to(device) for k, v in cache.get(idx, keys).items()}
        x0 = batch.pop(cfg.latent).float()
        p = raw.params.patch_size
        r = shift_factor(cfg.shift, x0.shape[2] * x0.shape[3] // p**2, x0.shape[1] * p**2, cfg.shift_value)
        x_t, sigma, v, _, _ = draw(x0, torch.Generator().manual_seed(start), len(idx), 0, r, cfg)
        w = {"guidance": torch.ones_like(sigma)} if getattr(raw.params, "guidance_embed", False) else {}
        total += F.mse_loss(raw(x_t, sigma, **batch, **w).float(), v.float(), reduction="sum").item()
    return total / (len(cache) * math.prod(cache.shape(cfg.latent)))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor of t (FSDP shards are gathered: every rank must call this)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


@torch.no_grad()
def preview(raw, ae, cond, null, latent_shape, cfg, path):
    """Fixed captions, fixed noise, the current weights: a grid to watch training by."""
    B = cond["txt"].shape[0]
    C, h, w = latent_shape
    x = get_noise((B, C, h, w), seed=cfg.seed).to(null["txt"].device)
    p = raw.params.patch_size
    r = shift_factor(cfg.shift, (h // p) * (w // p), C * p * p, cfg.shift_value)
    if getattr(raw.params, "guidance_embed", False):  # embedded guidance (whatever the training loss)
        v = guided_velocity(raw, cond, guidance=cfg.sample_guidance)
    else:
        v = guided_velocity(raw, cond, null, cfg=cfg.sample_guidance)
    x = denoise(v, x, get_schedule(cfg.sample_steps, r))
    if ae is not None:
        save_image_grid(ae.decode(x.to(next(ae.parameters()).dtype)), path, nrow=B)


def full_layers(model: torch.nn.Module) -> tuple[str, ...]:
    """The modules trained in full beside LoRA (DC-Gen: x_embedder and proj_out), by name."""
    names = {n.rpartition(".")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    return tuple(sorted(names))


def with_shift(cfg: Config) -> Config:
    """cfg with --shift resolved: given, or the --init folder's own, so that a run trains at the noise levels its model
    samples at (SANA a constant 3.0, FLUX mu(L)) unless told otherwise. Resolved before config.json is written."""
    if cfg.shift:
        assert cfg.shift in SHIFTS, f'--shift {cfg.shift!r}: choose one of {SHIFTS} (or "": the model folder\'s own)'
        return cfg
    shift, value = read_shift(cfg.init) if cfg.init else ("flux", cfg.shift_value)
    return dataclasses.replace(cfg, shift=shift, shift_value=value)


def check_loaded(result, model: torch.nn.Module, source) -> None:
    """A checkpoint holds a run's trainable tensors only: it must name no unknown tensor and miss no trainable one."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unknown, missing = sorted(result.unexpected_keys), sorted(set(result.missing_keys) & trainable)
    if unknown or missing:
        raise ValueError(f"{source} does not fit the model its config builds: unknown tensors {unknown[:4]}, missing "
                         f"trainable tensors {missing[:4]}; was it written by another run or version?")  # fmt: skip


def merge(cfg: Config, build=None) -> Path:
    """Fold a checkpoint's (EMA) trainable weights into its base and write a model folder to out_dir, in the dtype
    the run trained in (bf16 for --dtype bf16, as the released DC-Gen weights). `build` must be the model builder
    the run used (default: this script's)."""
    ckpt = load_ckpt(cfg.merge)
    run = type(cfg)(**{**ckpt["config"], "merge": "", "resume": False})
    cache = LatentCache(run.cache)
    dtype = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    model = (build or build_model)(run, cache, dtype)  # frozen weights in dtype, trainable ones fp32
    weights = ckpt["ema"] if cfg.merge_ema and ckpt["ema"] else ckpt["model"]
    check_loaded(model.load_state_dict(weights, strict=False), model, cfg.merge)  # the trainable tensors only
    model = unload_lora(model) if lora_layers(model) else model  # W + (alpha / r)·B·A, in W's dtype
    ae, text = cache.meta[f"{run.latent}_ae"], cache.meta["text"]
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}  # the fp32-trained layers join the base's dtype
    write_pipeline(cfg.out_dir, model, ae, text, run.shift, run.shift_value, state_dict=sd)
    print(f"merged {'EMA' if weights is ckpt['ema'] else 'raw'} weights of {cfg.merge} (step {ckpt['step']}) into "
          f"{run.init or run.preset}; model folder {cfg.out_dir}")  # fmt: skip
    return Path(cfg.out_dir)


# ----------------------------------------------------------------------------------------------------------------
# main


def main(cfg: Config | None = None, build=None, loss_fn=None):
    """Train. `build(cfg, cache, dtype) -> model` and `loss_fn(model, frozen, x0, cond, null, g, batch, rank, r)`
    replace stage 3's model and loss (distill.py passes its student and the distillation loss)."""
    cfg = cfg or parse_config(Config)
    if cfg.merge:
        return merge(cfg, build)
    cfg = with_shift(cfg)
    assert loss_fn or cfg.loss in ("auto", "fm", "guide"), f"--loss {cfg.loss!r}: choose auto, fm or guide"
    assert cfg.guide_uncond in ("one", "w"), f"--guide_uncond {cfg.guide_uncond!r}: choose one (code) or w (paper)"
    assert cfg.dtype in ("fp32", "bf16"), f"--dtype {cfg.dtype!r}: choose fp32 or bf16"

    # --- distributed init ---
    d = init_dist(cfg.device)
    out = Path(cfg.out_dir)
    log = out / "log.txt"
    if d.master:
        save_config(cfg, out)
        print0(f"run {run_info(d.world_size)}", log_file=log)
    assert cfg.batch_size % d.world_size == 0, f"batch_size {cfg.batch_size} not divisible by {d.world_size} ranks"
    b = cfg.batch_size // d.world_size  # this rank's share
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32

    # --- models: the frozen base, then the trainable parts ---
    cache = LatentCache(cfg.cache)
    sampler = StepSampler(len(cache), b, d.rank, d.world_size, cfg.seed)  # this rank's rows of every step
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards them; it does not broadcast)
    raw = (build or build_model)(cfg, cache, dtype)
    guide = cfg.loss == "guide" or (cfg.loss == "auto" and getattr(raw.params, "guidance_embed", False))
    assert not guide or raw.params.guidance_embed, "--loss guide needs a model with a guidance embedding"
    loss_fn = loss_fn or partial(diffusion_loss, cfg=cfg, guide=guide)
    # diffusers' LoRA file, rewritten at every checkpoint: LoRA A/B plus the layers trained in full, written as
    # their changes from the --init weights, which are kept here before training or resuming moves them
    full = full_layers(raw)
    linear = all(type(raw.get_submodule(n)) is torch.nn.Linear for n in full)  # SANA's conv embedder has no LoRA form
    lora_file = bool(cfg.init and lora_layers(raw)) and linear
    init_full = {}
    for n in full if lora_file else ():
        for k, v in raw.get_submodule(n).state_dict().items():
            init_full[f"{n}.{k}"] = v.detach().float().cpu().clone()
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in raw.parameters())
    name = getattr(loss_fn, "__name__", "guide" if guide else "flow matching")
    print0(f"model {cfg.init or cfg.preset}: {n_all / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trainable; "
           f"loss {name}", log_file=log)  # fmt: skip
    if cfg.dry_run:
        return cleanup_dist()
    seed_everything(cfg.seed + d.rank)  # per-rank streams from here on (the loss draws from step_generator)
    raw.grad_checkpointing = cfg.grad_checkpointing
    raw.to(d.device)
    model = wrap_model(raw, d, cfg.fsdp)  # DDP or FSDP2; `raw` stays the plain module (FSDP2 shards it in place)
    text_keys = sorted(cache.null)
    null = {k: v.to(d.device) for k, v in cache.null.items()}

    # --- optimizer and schedule ---
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    ema = {n: p.detach().float().clone() for n, p in raw.named_parameters() if p.requires_grad} if cfg.ema else {}
    sd_opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    step = 0
    ckpt_path = max(out.glob("ckpt_*.pt"), default=None) if cfg.resume else None
    if ckpt_path is not None:  # every rank reads the file; FSDP re-shards what it loads
        ckpt = load_ckpt(ckpt_path)
        opts = StateDictOptions(full_state_dict=True, strict=False)  # the trainable tensors only
        check_loaded(set_model_state_dict(model, ckpt["model"], options=opts), raw, ckpt_path)
        set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
        for n, p in raw.named_parameters():
            if n in ema:  # EMA tensors live like their parameters: sharded under FSDP
                v = ckpt["ema"][n].to(d.device)
                ema[n] = distribute_tensor(v, p.device_mesh, p.placements) if isinstance(p, DTensor) else v
        step = ckpt["step"]
        print0(f"resumed from {ckpt_path} at step {step}", log_file=log)

    def save(step: int) -> Path:
        """Atomically write the trainable tensors, EMA, optimizer; every rank takes part (FSDP gathers shards)."""
        finite = torch.tensor(float(all(torch.isfinite(p).all() for p in params)))  # this rank's shards
        if d.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:  # an update diverged after the loss was computed: never let it replace a good checkpoint
            raise RuntimeError(f"non-finite weights after step {step}; last good checkpoint: {last_good}")
        state = {
            "model": get_model_state_dict(model, options=sd_opts),
            "optimizer": get_optimizer_state_dict(model, opt, options=sd_opts),
            "ema": {n: full_tensor(t) for n, t in ema.items()},
            "step": step,
            "config": dataclasses.asdict(cfg),
        }
        path = out / f"ckpt_{step:07d}.pt"
        if d.master:
            save_ckpt(state, path)
        if d.master and lora_file:  # the EMA weights when there are, as --merge folds in
            weights = state["ema"] or state["model"]
            save_diffusers_lora(raw, out, full=full, base=init_full, state_dict=weights, dtype=dtype)
        return path

    # --- data and previews ---
    latent_shape = cache.shape(cfg.latent)
    n_prev = min(cfg.sample_count, len(cache))
    preview_cond = {k: v.to(d.device) for k, v in cache.get(torch.arange(n_prev), text_keys).items()}
    ae = None
    if cfg.sample_every and d.master:  # the AE only decodes previews; training reads cached latents
        ae = load_autoencoder(cache.meta[f"{cfg.latent}_ae"], device=d.device).eval()
    candidates = [c for c in cfg.aug_channels if c < latent_shape[0]]
    if cfg.aug_channels and not candidates:
        raise SystemExit(f"--aug_channels {cfg.aug_channels}: no prefix shorter than the latent's {latent_shape[0]} "
                         "channels, so augmented training would be off; give prefix lengths below it")  # fmt: skip
    if candidates and not cfg.aug_full:
        candidates.append(latent_shape[0])
    raw.adaptive_channels = bool(candidates)  # the model takes the channel prefixes
    val = LatentCache(cfg.val_cache) if cfg.val_cache else None
    amp = partial(torch.autocast, d.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")

    # --- training loop ---
    last_good = ckpt_path
    t0 = time.perf_counter()
    while step < cfg.steps:
        g = step_generator(cfg.seed, step)
        idx = sampler.batch_of(step)
        batch = {k: v.to(d.device) for k, v in cache.get(idx, [cfg.latent, *text_keys]).items()}
        x0 = batch.pop(cfg.latent).float()  # (b, C, h, w)
        # DC-AE 1.5 augmented training: the full latent plus aug_k - 1 channel prefixes, each its own loss term.
        # NOTE(deviation): the official trainer draws the prefixes from a per-GPU generator; here every rank draws the
        # same ones (from the step's generator), so N ranks train exactly as one process and a resumed run replays.
        prefixes = [x0.shape[1]] if cfg.aug_full or not candidates else []
        if candidates:
            n = cfg.aug_k - len(prefixes)
            prefixes += [candidates[i] for i in torch.randint(len(candidates), (n,), generator=g)]
        loss = 0.0
        with amp():
            for c in prefixes:
                p = raw.params.patch_size
                r = shift_factor(cfg.shift, (x0.shape[2] // p) * (x0.shape[3] // p), c * p * p, cfg.shift_value)
                term = loss_fn(model, raw, x0[:, :c], batch, null, g, cfg.batch_size, d.rank, r=r)
                loss = loss + term / len(prefixes)
        lr = lr_at(step, cfg.lr, cfg.warmup, steps=cfg.steps, decay=cfg.decay)
        for group in opt.param_groups:
            group["lr"] = lr
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else math.inf)
        loss_value = loss.detach().clone()
        if d.world_size > 1:
            dist.all_reduce(loss_value, op=dist.ReduceOp.AVG)
        if not math.isfinite(loss_value.item()):
            raise RuntimeError(f"loss is {loss_value.item()} at step {step + 1}; last good checkpoint: {last_good}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            update_ema(ema, raw, cfg.ema)
        step += 1

        if step % cfg.log_every == 0 or step == cfg.steps:
            dt = (time.perf_counter() - t0) / cfg.log_every
            mem = torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda" else 0.0
            print0(f"step {step:07d}/{cfg.steps:07d} | loss {loss_value.item():.4f} | grad {grad_norm.item():.3f} | "
                   f"lr {lr:.2e} | dt {dt * 1e3:.0f}ms | "
                   f"samples/s {cfg.batch_size / dt:.1f} | mem {mem:.1f}GB", log_file=log)  # fmt: skip
            t0 = time.perf_counter()
        if cfg.sample_every and step % cfg.sample_every == 0 and d.master and not cfg.fsdp:
            raw.eval()
            with amp():  # under --dtype bf16 the frozen weights are bf16 and the trainable ones fp32, as in training
                preview(raw, ae, preview_cond, null, latent_shape, cfg, out / "samples" / f"{step:07d}.png")
            raw.train()
            t0 = time.perf_counter()  # stop the clock: previews are not training time
        if (
            val is not None
            and ((cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps)
            and (d.master or cfg.fsdp)
        ):
            raw.eval()
            with amp():
                val_loss = validate(raw, val, cfg, d.device)
            print0(f"step {step:07d}/{cfg.steps:07d} | val_loss {val_loss:.5f}", log_file=log)
            raw.train()
            t0 = time.perf_counter()
        if step % cfg.save_every == 0 or step == cfg.steps:
            last_good = save(step)
            t0 = time.perf_counter()

    # --- cleanup ---
    print0(f"done: {step} steps, last checkpoint {last_good}", log_file=log)
    cleanup_dist()
    return last_good


if __name__ == "__main__":
    main()
