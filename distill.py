"""Guidance distillation: a student with a guidance embedding learns, in one pass, what a classifier-free-guided
teacher computes in two: v_w = v_u + w·(v_c - v_u) (Meng et al., arXiv 2210.03142; how FLUX.1-dev comes from a CFG
model). It makes the toy zoo's guidance-distilled base (the toy's FLUX.1-Krea) from the toy CFG base, and turns any
CFG model (e.g. DC-Gen-SANA) into a single-pass one: a 2x sampling speed-up on top of DC-Gen's.

The student starts as the teacher plus a guidance embedder whose last layer is zero, so at step 0 it outputs the
teacher's conditional velocity for every w. Each step draws x_t from cached data latents, a scale w ~ U(w_min,
w_max), and regresses student(x_t, c, w) on the teacher's guided velocity (no gradient through the teacher). A
tenth of the captions are dropped to the empty prompt, whose target is v_u at every w: the single pass then also
knows the unconditional velocity, which DC-Gen's guide loss asks of it (v_u = model(x_t, null, w = 1)).

How this relates to lora.py's guide loss: it is the same identity read the other way. Here the teacher supplies
v_c and v_u and the student's output must equal v_u + w·(v_c - v_u). There, the model's output v_g is taken to be
such a guided velocity, so the conditional velocity it implies, (v_g - (1 - w)·v_u) / w, must equal the data's
velocity noise - x0. Distillation creates a guidance-distilled model; the guide loss fine-tunes one (on a new
latent space, in DC-Gen) without undoing its distillation.

Run:    python distill.py --init out/toy/base-cfg --cache out/cache-toy --latent teacher --out_dir out/distill
        torchrun --standalone --nproc_per_node=8 distill.py --init DC-Gen-SANA --cache out/cache-sana --dtype bf16
Smoke:  python distill.py --init out/smoke/model --cache out/cache-tiny --latent teacher --steps 2 --out_dir out/d
Input:  a CFG model folder (no guidance embedding) and a latent cache (align.py --stage cache).
Output: out_dir/ckpt_{step:07d}.pt, config.json, log.txt, samples/, and out_dir/model: the distilled model folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

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
from models.loading import staged_folder
from models.pipeline import load_pipeline, write_pipeline
from models.text import drop_text
from training import (
    check_latent,
    draw,
    merged_state_dict,
    open_cache,
    prepare,
    run_config,
    train,
    with_shift,
)

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    # what to train
    init: str = ""  # the CFG model to distill: a model folder without a guidance embedding
    cache: str = "out/cache"  # latent cache written by align.py --stage cache
    latent: Literal["student", "teacher"] = "student"  # cached latent: of the deep-compression AE, or of the base AE
    out_dir: str = "out/distill"  # checkpoints, log.txt, samples/, model/ (the distilled model folder)
    rank: int = 0  # 0: train all weights of the student; > 0: LoRA of that rank (plus the guidance embedder)
    alpha: float = 256.0  # LoRA alpha: the update is (alpha / rank)·B·A
    lora_targets: tuple[str, ...] | None = None  # regexes of the LoRA layers (default: the model's); empty: no LoRA
    trainable: tuple[str, ...] = ()  # with LoRA: modules trained in full (the guidance embedder always is)
    # loss
    drop_text: float = 0.1  # probability of training a sample on the empty prompt (its target: v_u at every w)
    w_min: float = 1.0  # smallest guidance scale distilled (w = 1: the conditional velocity)
    w_max: float = 14.0  # largest guidance scale distilled (the range DC-Gen's guide loss samples)
    shift: Shift = ""  # noise-level shift: "" the --init folder's own, flux, dcgen or constant
    shift_value: float = 3.0  # r of --shift constant (with --shift "", the folder's own value)
    # optimisation
    steps: int = 10_000  # optimizer steps
    batch_size: int = 64  # global batch, split over the ranks
    lr: float = 1e-4  # peak learning rate
    warmup: int = 100  # linear warm-up steps, then constant
    decay: int = 0  # linear decay to 0 over the last `decay` steps (0: none)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    weight_decay: float = 0.0  # AdamW weight decay
    clip_grad: float = 0.1  # max global gradient norm (0: none; the norm is still logged)
    ema: float = 0.999  # EMA decay of the student's trainable weights (0: no EMA)
    # runtime
    device: Device = "auto"  # auto, cuda or cpu
    dtype: Dtype = "fp32"  # fp32, or bf16 (frozen weights stored in bf16, autocast; trainable weights fp32)
    fsdp: bool = False  # shard the student over the ranks (FSDP2, per block) instead of replicating it (DDP)
    grad_checkpointing: bool = False  # recompute block activations in backward (memory O(1) in depth)
    seed: int = 0  # seeds the data order and every draw of the loss
    log_every: int = 10  # steps between log lines
    sample_every: int = 1000  # steps between preview grids (0: never), with embedded guidance
    sample_count: int = 4  # previews: the first cached captions, fixed noise
    sample_steps: int = 20  # Euler steps of a preview
    sample_guidance: float = 3.5  # previews: the embedded guidance scale
    save_every: int = 1000  # steps between checkpoints
    val_cache: str = ""  # held-out latent cache: log the student's flow-matching loss at w = 1 on it
    val_every: int = 0  # steps between validations (0: at the end only, when val_cache is given)
    resume: bool = False  # continue from the newest checkpoint in out_dir
    dry_run: bool = False  # print the config and parameter counts, then exit
    merge: str = ""  # a checkpoint of this script: write its model folder (EMA weights) to out_dir
    merge_ema: bool = True  # --merge: use the EMA weights (else the raw ones)
    # fmt: on


# ----------------------------------------------------------------------------------------------------------------
# helpers


def load_teacher(cfg: Config, dtype: torch.dtype) -> torch.nn.Module:
    teacher = (
        load_pipeline(cfg.init, dtype=dtype, parts=("transformer",))
        .transformer.eval()
        .requires_grad_(False)
    )
    if teacher.params.guidance_embed:
        raise ValueError(
            f"{cfg.init} already embeds guidance: distill a CFG model (no guidance embedding)"
        )
    return teacher


def build_student(cfg: Config, dtype: torch.dtype, teacher: torch.nn.Module) -> torch.nn.Module:
    """The teacher plus a guidance embedder whose output starts at zero: student(x, t, c, w) =
    teacher(x, t, c)."""
    with torch.device("meta"):
        student = type(teacher)(dataclasses.replace(teacher.params, guidance_embed=True))
    # SANA's guidance layout (SANA-Sprint) keeps the timestep MLP one level up; FLUX only adds
    # guidance_embedder.
    sd = {}
    for k, v in teacher.state_dict().items():
        sd[k.replace("time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder.")] = (
            v.clone()
        )
    for name, t in student.state_dict().items():
        if "guidance_embedder" in name:  # fresh: default init, then the last layer zeroed below
            sd[name] = torch.empty_like(t, device="cpu", dtype=dtype)
    student.load_state_dict(sd, strict=True, assign=True)
    for name, module in student.named_modules():
        if name.endswith("guidance_embedder"):
            torch.nn.init.normal_(module.linear_1.weight, std=0.02)
            torch.nn.init.zeros_(module.linear_1.bias)
            torch.nn.init.zeros_(module.linear_2.weight)
            torch.nn.init.zeros_(module.linear_2.bias)
            guidance = name
    targets = student.lora_targets if cfg.lora_targets is None else cfg.lora_targets
    return prepare(student, cfg.rank, cfg.alpha, targets, (*cfg.trainable, guidance))


def merge(cfg: Config) -> Path:
    """Write the model folder of a checkpoint of this script: the student with its (EMA) weights, in
    the run's dtype, with the teacher folder's AE and text encoders."""
    ckpt = load_ckpt(cfg.merge)
    run = run_config(Config, ckpt["config"], merge="", resume=False)
    dtype = torch.bfloat16 if run.dtype == "bf16" else torch.float32
    student = build_student(run, dtype, load_teacher(run, dtype))
    use_ema = cfg.merge_ema and bool(ckpt["ema"])
    sd = merged_state_dict(student, ckpt["ema"] if use_ema else ckpt["model"], dtype, cfg.merge)
    init = Path(run.init)
    with staged_folder(cfg.out_dir) as tmp:  # renamed into place once complete
        write_pipeline(tmp, student, init / "vae", init, run.shift, run.shift_value, state_dict=sd)
    print(
        f"distilled model (step {ckpt['step']}, {'EMA' if use_ema else 'raw'} weights) -> {cfg.out_dir}"
    )
    return Path(cfg.out_dir)


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> Path | None:
    cfg = parse_config(Config, argv)
    if cfg.merge:  # write the model folder of any checkpoint of a distillation run
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

    # --- models: the frozen CFG teacher, then the student ---
    teacher = load_teacher(cfg, dtype).to(d.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw = build_student(cfg, dtype, teacher)
    check_latent(raw, cache.shape(cfg.latent), f"the cache {cfg.cache} ({cfg.latent})")
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    print0(
        f"student of {cfg.init}: {n_train / 1e6:.2f} M trainable parameters; loss distillation",
        log_file=log,
    )
    if cfg.dry_run:
        return cleanup_dist()
    seed_everything(cfg.seed + d.rank)
    null = {k: v.to(d.device) for k, v in cache.null.items()}

    # --- the loss: || student(x_t, c, w) - [v_u + w·(v_c - v_u)] ||², the teacher's guided velocity as target ---
    def loss_fn(student, x0, text, g, r):
        x_t, sigma, _, drop, w = draw(
            x0, g, cfg.batch_size, d.rank, r, cfg.drop_text, cfg.w_min, cfg.w_max
        )
        cond = drop_text(text, null, drop)  # the data's velocity is not the target here
        # v_c and v_u from the frozen teacher in one batched pass: [caption, empty prompt]
        with torch.no_grad():
            both = {k: torch.cat([cond[k], null[k].expand_as(cond[k])]) for k in cond}
            v_c, v_u = (
                teacher(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), **both).float().chunk(2)
            )
            # classifier-free guidance at scale w
            target = v_u + w[:, None, None, None] * (v_c - v_u)
        return F.mse_loss(student(x_t, sigma, **cond, guidance=w).float(), target)

    # --- training loop, then the distilled model folder ---
    last = train(cfg, d, raw, cache, cfg.latent, loss_fn, log)
    if d.master:
        merge(dataclasses.replace(cfg, merge=str(last), out_dir=str(out / "model")))
    cleanup_dist()
    return last


if __name__ == "__main__":
    run_main(main)
