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
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import lora
from common import parse_config
from models.pipeline import load_pipeline
from models.text import drop_text

# ----------------------------------------------------------------------------------------------------------------
# config: lora.py's, with distillation's defaults


@dataclass
class Config(lora.Config):
    init: str = ""  # the CFG model to distill: a model folder without a guidance embedding
    out_dir: str = "out/distill"  # checkpoints, log.txt, samples/, model/ (the distilled model folder)
    rank: int = 0  # 0: train all weights of the student; > 0: LoRA of that rank (plus the guidance embedder)
    trainable: tuple[str, ...] | None = ()  # with LoRA: modules trained in full (the guidance embedder always is)
    w_min: float = 1.0  # smallest guidance scale distilled (w = 1: the conditional velocity)
    w_max: float = 14.0  # largest guidance scale distilled (the range DC-Gen's guide loss samples)
    loss: str = "distill"  # (fixed)
    warmup: int = 100  # linear warm-up steps
    ema: float = 0.999  # EMA decay of the student's trainable weights


# ----------------------------------------------------------------------------------------------------------------
# helpers


def load_teacher(cfg: Config, dtype: torch.dtype) -> torch.nn.Module:
    teacher = load_pipeline(cfg.init, dtype=dtype, parts=("transformer",)).transformer.eval().requires_grad_(False)
    if teacher.params.guidance_embed:
        raise ValueError(f"{cfg.init} already embeds guidance: distill a CFG model (no guidance embedding)")
    return teacher


def build_student(cfg: Config, cache, dtype: torch.dtype, teacher: torch.nn.Module) -> torch.nn.Module:
    """The teacher plus a guidance embedder whose output starts at zero: student(x, t, c, w) = teacher(x, t, c)."""
    with torch.device("meta"):
        student = type(teacher)(dataclasses.replace(teacher.params, guidance_embed=True))
    # SANA's guidance layout (SANA-Sprint) keeps the timestep MLP one level up; FLUX only adds guidance_embedder.
    sd = {k.replace("time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder."): v.clone() for k, v in
          teacher.state_dict().items()}  # fmt: skip
    for name, t in student.state_dict().items():
        if "guidance_embedder" in name:  # fresh: xavier-free default init, then the last layer zeroed below
            sd[name] = torch.empty_like(t, device="cpu", dtype=dtype)
    student.load_state_dict(sd, strict=True, assign=True)
    for name, module in student.named_modules():
        if name.endswith("guidance_embedder"):
            torch.nn.init.normal_(module.linear_1.weight, std=0.02), torch.nn.init.zeros_(module.linear_1.bias)
            torch.nn.init.zeros_(module.linear_2.weight), torch.nn.init.zeros_(module.linear_2.bias)
            guidance = name
    C, h, w = cache.shape(cfg.latent)
    if C != student.params.in_channels:
        raise ValueError(f"{cfg.init} takes {student.params.in_channels}-channel latents; the cache holds {(C, h, w)}")
    if cfg.rank == 0:
        return student.float().requires_grad_(True)
    lora.inject_lora(student, cfg.rank, cfg.alpha, targets=cfg.lora_targets, trainable=(*cfg.trainable, guidance))
    for module in student.modules():  # trainable tensors in fp32 beside a bf16 base
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.float()
    return student


def distill_loss(student, frozen, x0, cond, null, g, batch, rank, r, cfg, teacher):
    """|| student(x_t, c, w) - [v_u + w·(v_c - v_u)] ||² with v_c, v_u from the frozen teacher in one batched pass."""
    x_t, sigma, _, drop, w = lora.draw(x0, g, batch, rank, r, cfg)  # the data's velocity is not the target here
    cond = drop_text(cond, null, drop)
    teacher.to(x0.device)
    with torch.no_grad():
        both = {k: torch.cat([cond[k], null[k].expand_as(cond[k])]) for k in cond}  # [caption, empty prompt]
        v_c, v_u = teacher(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), **both).float().chunk(2)
        target = v_u + w[:, None, None, None] * (v_c - v_u)  # classifier-free guidance at scale w
    return F.mse_loss(student(x_t, sigma, **cond, guidance=w).float(), target)


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None):
    cfg = parse_config(Config, argv)
    teacher = load_teacher(cfg, torch.bfloat16 if cfg.dtype == "bf16" else torch.float32)
    build = partial(build_student, teacher=teacher)
    if cfg.merge:  # write the model folder of any checkpoint of a distillation run
        return lora.merge(cfg, build)
    last = lora.main(cfg, build=build, loss_fn=partial(distill_loss, cfg=cfg, teacher=teacher))
    if last is not None and int(os.environ.get("RANK", 0)) == 0:  # the master writes the model folder
        lora.merge(dataclasses.replace(cfg, merge=str(last), out_dir=str(Path(cfg.out_dir) / "model")), build)


if __name__ == "__main__":
    main()
