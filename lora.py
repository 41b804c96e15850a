"""Stage 3 of DC-Gen: LoRA fine-tuning of the aligned model, end to end (DC-Gen §3.3; the official trainer
`dc_ai/t2icore/trainer.py`).

The same loop trains all weights (--rank 0), a base model from scratch (--rank 0 --preset, no --init: the toy
zoo's CFG base), and DC-AE 1.5's augmented diffusion training (--prefixes; official
`dc_gen/c2icore/trainer.py`). --merge folds a LoRA's EMA weights into its --init model and writes a full model
folder, so the resolution ladder 512 -> 1K is: train, merge, train a fresh LoRA at the next size.

The loss, on x_t = (1 - sigma)·x0 + sigma·noise with sigma logit-normal and shifted (common.sample_sigmas) and the
target velocity v = noise - x0 (training.draw), is chosen in `main`:
  * CFG models (SANA, the toy base): flow matching; the caption is replaced by the empty prompt 10% of the time so
    that classifier-free guidance works at sampling.
  * guidance-distilled models (FLUX.1-Krea; chosen when the model has a guidance embedding): DC-Gen's guide loss
    (training.guide_loss, DC-Gen §3.3 Eqs. (3)-(7) as the official code computes it): w ~ U(1, 14),
    v_g = model(x_t, c, w), v_u = model(x_t, null, 1) without gradient, and v_hat = (v_g - (1 - w)·v_u) / w
    regressed on v. A distilled model's output is v_g ≈ v_u + w·(v_c - v_u), so v_hat ≈ v_c: the loss asks the
    *conditional* velocity inside it to be right, which keeps the embedded guidance meaningful while the model
    moves to the new latent space.

Run:    python lora.py --init out/head/model --cache out/cache-512 --out_dir out/lora-512
        torchrun --standalone --nproc_per_node=8 lora.py --init out/head/model --cache out/cache-512 \
            --fsdp --grad_checkpointing --dtype bf16 --batch_size 512
        python lora.py --merge out/lora-512/ckpt_0010000.pt --out_dir out/lora-512/model
Smoke:  python lora.py --preset tiny --rank 0 --cache out/cache-tiny --latent teacher --steps 2 --out_dir out/smoke
Input:  a model folder (align.py --stage head, a released base, or a merged stage) and a latent cache (align.py
        --stage cache). Output: out_dir/ckpt_{step:07d}.pt (trainable tensors, their EMA, optimizer, step, config),
        config.json, log.txt, samples/{step:07d}.png, pytorch_lora_weights.safetensors (diffusers' LoRA file, for
        `pipe.load_lora_weights(out_dir)` on the --init folder: README). --merge needs only the checkpoint and its
        --init folder, and writes a model folder (transformer/ + linked vae/, text encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from common import (
    Device,
    Dtype,
    Shift,
    cleanup_dist,
    init_dist,
    load_ckpt,
    parse_config,
    print0,
    run_info,
    run_main,
    save_config,
    seed_everything,
)
from data import LatentCache
from models.c2i import C2I_PRESETS, build_c2i, eps_objective, gaussian_loss
from models.flux import PRESETS, Flux
from models.loading import staged_folder
from models.pipeline import load_pipeline, write_pipeline
from models.text import drop_text
from plan import check_run
from training import (
    check_latent,
    draw,
    flow_matching_loss,
    guide_loss,
    merged_state_dict,
    open_cache,
    prepare,
    run_config,
    train,
    with_shift,
)

# ----------------------------------------------------------------------------------------------------------------
# config


Loss = Literal["auto", "fm", "guide", "gaussian"]  # fm: flow matching; gaussian: DiT's own


@dataclass
class Config:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    # what to train
    init: str = ""  # model folder to start from; "" trains --preset from scratch (with --rank 0)
    preset: str = ""  # FLUX preset (models/flux.py), or dit-*/usit-* (models/c2i.py), of a model trained from scratch
    cache: str = "out/cache"  # latent cache written by align.py --stage cache
    latent: Literal["student", "teacher"] = "student"  # cached latent: of the deep-compression AE, or of the base AE
    out_dir: str = "out/lora"  # checkpoints, log.txt, samples/
    rank: int = 256  # LoRA rank; 0 trains all weights
    alpha: float = 256.0  # LoRA alpha: the update is (alpha / rank)·B·A
    lora_targets: tuple[str, ...] | None = None  # regexes of the LoRA layers (default: the model's); empty: no LoRA
    trainable: tuple[str, ...] | None = None  # modules trained in full beside LoRA (default: the model's latent layers)
    # loss
    loss: Loss = "auto"  # auto: guide (guidance embedded), gaussian (learned-sigma DiT), else fm
    drop_text: float = 0.1  # probability of training a sample on the empty prompt
    w_min: float = 1.0  # guide loss: smallest guidance scale w
    w_max: float = 14.0  # guide loss: largest guidance scale w
    guide_uncond: Literal["one", "w"] = "one"  # guide loss: v_u at guidance 1 (official code) or at w (paper)
    shift: Shift = ""  # noise-level shift: "" the --init folder's own (sample.py's; flux for --preset), flux (mu linear
    # in tokens), dcgen (sqrt(C·p²·L/4096)) or constant
    shift_value: float = 3.0  # r of --shift constant (with --shift "", the folder's own value)
    prefixes: tuple[int, ...] = ()  # DC-AE 1.5 augmented diffusion training: candidate channel prefixes c' (empty: off)
    num_prefixes: int = 2  # K: loss terms per step, one per channel prefix drawn (common.draw_prefixes)
    always_max: bool = True  # one of the K terms is always the full latent (official always_sample_max_channel)
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
    device: Device = "auto"  # auto, cuda or cpu
    dtype: Dtype = "fp32"  # fp32, or bf16 (frozen weights stored in bf16, autocast; trainable weights fp32)
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
    # fmt: on


# ----------------------------------------------------------------------------------------------------------------
# helpers


def build_model(cfg: Config, dtype: torch.dtype) -> torch.nn.Module:
    """The model to train: --init's transformer (frozen weights in dtype) or a fresh --preset, LoRA
    injected on the model's targets (or --lora_targets), requires_grad set and trainable tensors in
    fp32 (training.prepare)."""
    if cfg.init:
        model = load_pipeline(cfg.init, dtype=dtype, parts=("transformer",)).transformer
    elif cfg.preset in C2I_PRESETS:  # a class-conditional DiT or USiT (models/c2i.py)
        # the preset's network on this cache's latent and classes (its null row is the null class)
        cache = LatentCache(cfg.cache)
        (C, h, _), n = cache.shape(cfg.latent), int(cache.null["label"][0])
        model = build_c2i(cfg.preset, in_channels=C, sample_size=h, num_classes=n).to(dtype)
    else:
        known = sorted(PRESETS) + sorted(C2I_PRESETS)
        assert cfg.preset in PRESETS, f"without --init, give --preset: one of {known}"
        model = Flux(PRESETS[cfg.preset]).to(dtype)
    trainable = model.latent_layers if cfg.trainable is None else cfg.trainable
    targets = model.lora_targets if cfg.lora_targets is None else cfg.lora_targets
    return prepare(model, cfg.rank, cfg.alpha, targets, trainable)


def merge(cfg: Config) -> Path:
    """Fold a checkpoint's (EMA) trainable weights into its --init model and write a model folder to
    out_dir, in the dtype the run trained in, with the --init folder's AE and text encoders: the
    cache is not needed. A model trained from a --preset has no folder: its cache's AE and text
    encoders are taken."""
    ckpt = load_ckpt(cfg.merge)
    run = run_config(Config, ckpt["config"], merge="", resume=False)
    dtype = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    model = build_model(run, dtype)  # frozen weights in dtype, trainable ones fp32
    use_ema = cfg.merge_ema and bool(ckpt["ema"])
    sd = merged_state_dict(model, ckpt["ema"] if use_ema else ckpt["model"], dtype, cfg.merge)
    if run.init:
        ae, text = Path(run.init) / "vae", Path(run.init)
    else:
        meta = LatentCache(run.cache).meta
        ae, text = meta[f"{run.latent}_ae"], meta["text"]
    id2label = None if run.init else LatentCache(run.cache).meta.get("id2label")
    with staged_folder(cfg.out_dir) as tmp:  # renamed into place once complete
        write_pipeline(
            tmp, model, ae, text, run.shift, run.shift_value, state_dict=sd, id2label=id2label
        )
    which = "EMA" if use_ema else "raw"
    print(
        f"merged {which} weights of {cfg.merge} (step {ckpt['step']}) into {run.init or run.preset}; model folder "
        f"{cfg.out_dir}"
    )
    return Path(cfg.out_dir)


# ----------------------------------------------------------------------------------------------------------------
# main


def main(cfg: Config | None = None) -> Path | None:
    cfg = cfg or parse_config(Config)
    if cfg.merge:
        return merge(cfg)
    cfg = with_shift(cfg)
    # checked before out_dir is written: a missing or empty cache leaves no run folder behind
    cache = open_cache(cfg.cache, cfg.latent)

    # --- distributed init ---
    d = init_dist(cfg.device)
    out = Path(cfg.out_dir)
    log = out / "log.txt"
    if d.master:
        save_config(cfg, out)
        print0(f"run {run_info(d.world_size)}", log_file=log)
    assert cfg.batch_size % d.world_size == 0, (
        f"batch_size {cfg.batch_size} not divisible by {d.world_size} ranks"
    )
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32

    # --- models: the frozen base with LoRA and the trainable latent layers ---
    # the same initial weights on every rank (FSDP shards them; it does not broadcast)
    torch.manual_seed(cfg.seed)
    raw = build_model(cfg, dtype)
    check_latent(raw, cache.shape(cfg.latent), f"the cache {cfg.cache} ({cfg.latent})")
    # an ε/Σ DiT (released DiT-XL/2) trains with DiT's own loss (models/c2i.py gaussian_loss)
    gaussian = eps_objective(cfg.loss, raw)
    guide = cfg.loss == "guide" or (
        cfg.loss == "auto" and getattr(raw.params, "guidance_embed", False)
    )
    assert not guide or raw.params.guidance_embed, (
        "--loss guide needs a model with a guidance embedding"
    )
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in raw.parameters())
    print0(
        f"model {cfg.init or cfg.preset}: {n_all / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trainable; "
        f"loss {'guide' if guide else 'gaussian' if gaussian else 'flow matching'}",
        log_file=log,
    )
    # on CUDA: the planner's peak against the card, before hours are spent
    if cfg.rank > 0:  # on CUDA: the planner's peak against the card, before hours are spent
        aug_k = cfg.num_prefixes if cfg.prefixes else 1
        check_run("lora", raw, cfg, cache, cfg.latent, d, guide, aug_k)
    if cfg.dry_run:
        return cleanup_dist()
    # per-rank streams from here on (the loss draws from the step's generator)
    seed_everything(cfg.seed + d.rank)
    null = {k: v.to(d.device) for k, v in cache.null.items()}

    # --- the loss: DC-Gen stage 3's objective on this rank's latents ---
    def loss_fn(model, x0, text, g, r):
        x_t, sigma, v, drop, w = draw(
            x0, g, cfg.batch_size, d.rank, r, cfg.drop_text, cfg.w_min, cfg.w_max
        )
        # the empty prompt for 10%: the model keeps its unconditional velocity
        cond = drop_text(text, null, drop)
        if gaussian:
            return gaussian_loss(model, x0, cond, g)
        if guide:
            return guide_loss(model, raw, x_t, sigma, v, cond, null, w, cfg.guide_uncond)
        return flow_matching_loss(model, x_t, sigma, v, cond)

    # --- training loop (training.train: optimizer, EMA, checkpoints, previews, validation) ---
    last = train(cfg, d, raw, cache, cfg.latent, loss_fn, log)

    # --- cleanup ---
    cleanup_dist()
    return last


if __name__ == "__main__":
    run_main(main)
