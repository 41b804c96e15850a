"""Class-conditional sampling: DiT's Gaussian diffusion (DDIM as diffusers' DiTPipeline runs it, DDPM with the
learned variance as DiT's own sample.py runs it) and flow / SiT Euler sampling for velocity models, each with
classifier-free guidance against the null class; plus the class names of a folder's `id2label`.

    DDPM/DDIM (DiT, arXiv 2212.09748 §3; Improved DDPM Eq. 15 for the learned Σ): ε-prediction on a linear β schedule
        of 1000 steps; CFG on ε only (the first `cfg_channels` output channels: the latent's C in diffusers'
        DiTPipeline; the original DiT's forward_with_cfg guides 3 of SD-VAE's 4, the official c2icore
        `cfg_channels` makes it a setting); Σ is taken from the conditional half.
    flow (models trained here): x_t = (1 - σ)·x0 + σ·noise, v = noise - x0, Euler from σ = 1 to 0 (common.denoise).
    SiT (official USiT, `sit_sampler/transport.py` Linear/velocity): x_t = t·x1 + (1 - t)·x0, t from 0 (noise) to 1,
        v = x1 - x0: the same path with t = 1 - σ and the opposite sign, so it is sampled by the same Euler loop, or
        by adaptive Dormand-Prince steps (`dopri5`, as the official USiT evaluation's ODE sampler).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from common import denoise, get_schedule
from models.dit import PRESETS as DIT_PRESETS
from models.dit import DiT
from models.uvit import PRESETS as UVIT_PRESETS
from models.uvit import UViT

# every class-conditional preset, by prefixed name: `lora.py --preset dit-toy --rank 0` trains one
C2I_PRESETS = {
    (k if k.startswith(("dit", "dcgen")) else f"dit-{k}"): (DiT, p) for k, p in DIT_PRESETS.items()
} | {
    (k if k.startswith(("usit", "uvit")) else f"usit-{k}"): (UViT, p)
    for k, p in UVIT_PRESETS.items()
}


def build_c2i(name: str, **overrides):
    """A fresh class-conditional model of a C2I_PRESETS name (fields replaced by `overrides`)."""
    cls, params = C2I_PRESETS[name]
    return cls(dataclasses.replace(params, **overrides))


# ----------------------------------------------------------------------------------------------------------------
# the Gaussian-diffusion schedule of a scheduler_config.json (DDPMScheduler / DDIMScheduler keys)


def alphas_cumprod(sched: dict) -> Tensor:
    """ᾱ_t, float32 like diffusers' schedulers: linear β (DiT), scaled_linear (SD) or
    squaredcos_cap_v2."""
    T, kind = sched.get("num_train_timesteps", 1000), sched.get("beta_schedule", "linear")
    b0, b1 = sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02)
    if kind == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)])
    else:
        raise ValueError(f"beta_schedule {kind!r}: linear, scaled_linear or squaredcos_cap_v2")
    return torch.cumprod(1.0 - betas, dim=0)


def timesteps(sched: dict, steps: int, spacing: str | None = None) -> list[int]:
    """The steps visited, high to low: diffusers' "leading" (its default), "trailing", "linspace",
    or DiT's own respacing "dit" (gaussian_diffusion space_timesteps: round(i·(T-1)/(n-1)))."""
    T, off = sched.get("num_train_timesteps", 1000), sched.get("steps_offset", 0)
    spacing = spacing or sched.get("timestep_spacing", "leading")
    if spacing == "leading":
        ts = [i * (T // steps) + off for i in range(steps)]
    elif spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)][::-1]
    elif spacing == "linspace":
        ts = [int(round(float(x))) for x in torch.linspace(0, T - 1, steps, dtype=torch.float64)]
    elif spacing == "dit":
        ts = [round(i * (T - 1) / (steps - 1)) for i in range(steps)] if steps > 1 else [0]
    else:
        raise ValueError(f"timestep spacing {spacing!r}: leading, trailing, linspace or dit")
    return ts[::-1]


def guided_eps(model, x: Tensor, t: int, labels: Tensor, cfg: float, cfg_channels: int | None):
    """The model's output at step t with CFG on its first cfg_channels channels (ε), batched as
    [cond, null] like DiTPipeline; returns (B, C_out, H, W) with Σ from the conditional rows."""
    B = x.shape[0]
    if cfg == 1.0:
        return model(x, torch.full((B,), t, device=x.device), label=labels)
    null = torch.full_like(labels, model.null_label)
    out = model(
        torch.cat([x, x]), torch.full((2 * B,), t, device=x.device), label=torch.cat([labels, null])
    )
    k = cfg_channels or x.shape[1]
    cond, uncond = out[:B], out[B:]
    eps = uncond[:, :k] + cfg * (cond[:, :k] - uncond[:, :k])
    return torch.cat([eps, cond[:, k:]], dim=1)


@torch.no_grad()
def ddim_sample(
    model,
    noise: Tensor,
    labels: Tensor,
    sched: dict,
    steps: int,
    cfg: float = 4.0,
    cfg_channels: int | None = None,
) -> Tensor:
    """DDIM with η = 0 (diffusers' DDIMScheduler on the folder's config, as DiTPipeline calls it):
    x0 = (x - √(1-ᾱ_t)·ε)/√ᾱ_t, x_prev = √ᾱ_prev·x0 + √(1-ᾱ_prev)·ε. A learned Σ is unused."""
    ac = alphas_cumprod(sched)
    final = torch.tensor(1.0) if sched.get("set_alpha_to_one", True) else ac[0]
    ts = timesteps(sched, steps)
    T, C, x = sched.get("num_train_timesteps", 1000), noise.shape[1], noise
    for t in ts:
        eps = guided_eps(model, x, t, labels, cfg, cfg_channels)[:, :C].float()
        prev = t - T // steps
        a_t, a_prev = ac[t], ac[prev] if prev >= 0 else final
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if sched.get("clip_sample", False):
            r = sched.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-r, r)
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


@torch.no_grad()
def ddpm_sample(
    model,
    noise: Tensor,
    labels: Tensor,
    sched: dict,
    steps: int,
    cfg: float = 4.0,
    cfg_channels: int | None = None,
    spacing: str = "dit",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral DDPM on the respaced chain (β'_t = 1 - ᾱ_t/ᾱ_prev) with DiT's learned variance:
    log Σ = f·log β'_t + (1-f)·log β̃_t, f = (v + 1)/2 (Improved DDPM Eq. 15), posterior mean from
    x0. DiT's sample.py runs 250 steps with spacing "dit"; "leading" visits diffusers'
    DDPMScheduler steps (tests/test_dit.py compares the two step by step)."""
    assert model.params.learn_sigma, "ddpm_sample needs a learned-sigma model (2C outputs)"
    ac, C, x = alphas_cumprod(sched), noise.shape[1], noise
    ts = timesteps(sched, steps, spacing)
    for i, t in enumerate(ts):
        out = guided_eps(model, x, t, labels, cfg, cfg_channels).float()
        eps, v = out[:, :C], out[:, C : 2 * C]
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        beta = 1 - a_t / a_prev
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + (
            (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)
        ) * x
        if i + 1 == len(ts):
            return mean
        post = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
        frac = (v + 1) / 2
        log_var = frac * torch.log(beta) + (1 - frac) * torch.log(post)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = mean + torch.exp(0.5 * log_var) * z
    return x


# Dormand-Prince 5(4) (Hairer, Nørsett & Wanner, Solving ODEs I, Table II.5.2): nodes, stage weights, and the
# 5th-order weights minus the embedded 4th-order ones (the error estimate). The 5th-order solution is also the 7th
# stage's input, so that stage's slope starts the next step ("first same as last").
DOPRI_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DOPRI_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DOPRI_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def dopri5(f, x: Tensor, t0: float, t1: float, atol: float = 1e-6, rtol: float = 1e-3) -> tuple:
    """Solve dx/dt = f(t, x) from t0 to t1 > t0 with adaptive Dormand-Prince 5(4) steps, the
    `dopri5` of torchdiffeq that SiT's ODE sampler calls: a step is kept when the RMS of its error
    estimate over atol + rtol·max(|x|, |x_new|) is at most 1, and the next step is scaled by
    0.9·err^(-1/5), clamped to [0.2, 10]; the first step as Hairer & Wanner's starting-step rule.
    Returns x(t1) and the number of f evaluations."""

    def rms(v: Tensor) -> float:
        return v.float().pow(2).mean().sqrt().item()

    k, scale = f(t0, x), atol + rtol * x.abs()
    d0, d1 = rms(x / scale), rms(k / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    d2 = rms((f(t0 + h0, x + h0 * k) - k) / scale) / h0
    h = min(100 * h0, max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2)
    t, nfe = t0, 2
    while t1 - t > 1e-12 * max(1.0, abs(t1)):
        h = min(h, t1 - t)
        ks = [k]
        for c, a in zip(DOPRI_C[1:], DOPRI_A[1:]):
            ks.append(f(t + c * h, x + h * sum(ai * ki for ai, ki in zip(a, ks) if ai)))
        x_new = x + h * sum(ai * ki for ai, ki in zip(DOPRI_A[-1], ks) if ai)  # 5th order
        err = h * sum(e * ki for e, ki in zip(DOPRI_E, ks) if e)
        ratio = rms(err / (atol + rtol * torch.maximum(x.abs(), x_new.abs())))
        nfe += 6
        if ratio <= 1:
            t, x, k = t + h, x_new, ks[-1]
        h *= 10.0 if ratio == 0 else min(10.0, max(0.2, 0.9 * ratio**-0.2))
    return x, nfe


@torch.no_grad()
def flow_sample(
    model,
    noise: Tensor,
    labels: Tensor,
    steps: int,
    cfg: float = 1.0,
    r: float = 1.0,
    sit: bool = False,
    solver: str = "euler",
) -> Tensor:
    """Euler from σ = 1 to 0 on the time-shifted schedule of `r` (common.get_schedule), or, with
    solver "dopri5", the same ODE by adaptive Dormand-Prince steps (the official USiT evaluation's
    ODE solver, at SiT's default tolerances atol 1e-6, rtol 1e-3; `steps` and `r` play no part).
    A model trained here takes σ and predicts noise - x0; an official SiT/USiT (`sit`) takes
    t = 1 - σ and predicts x1 - x0, so its output is negated. CFG: v_u + cfg·(v_c - v_u)."""

    def velocity(x: Tensor, sigma: float) -> Tensor:
        B = x.shape[0]
        t = torch.full((B,), 1.0 - sigma if sit else sigma, device=x.device)
        if cfg == 1.0:
            v = model(x, t, label=labels)
        else:
            null = torch.full_like(labels, model.null_label)
            v_c, v_u = model(torch.cat([x, x]), t.repeat(2), label=torch.cat([labels, null])).chunk(
                2
            )
            v = v_u + cfg * (v_c - v_u)
        return -v if sit else v

    if solver == "dopri5":  # in t = 1 - σ, forward: dx/dt = -v(x, σ)
        return dopri5(lambda t, x: -velocity(x, 1.0 - t), noise.float(), 0.0, 1.0)[0]
    return denoise(velocity, noise.float(), get_schedule(steps, r))


# ----------------------------------------------------------------------------------------------------------------
# DiT's training objective (official c2icore DiT: train_scheduler "GaussianDiffusion", DiT's gaussian_diffusion.py)


def normal_kl(m1: Tensor, logv1: Tensor, m2: Tensor, logv2: Tensor) -> Tensor:
    return 0.5 * (
        -1.0 + logv2 - logv1 + torch.exp(logv1 - logv2) + (m1 - m2) ** 2 * torch.exp(-logv2)
    )


def discretized_nll(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """-log p(x) of a Gaussian discretized to 255 bins on [-1, 1] (the t = 0 term of the VLB)."""

    def cdf(v):  # tanh approximation of the standard normal CDF, as DiT
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    inner = torch.where(x > 0.999, log_one_minus_min, log_delta)
    return -torch.where(x < -0.999, log_plus, inner)


def eps_objective(loss: str, model) -> bool:
    """Whether a model trains with DiT's ε (and Σ) objective: asked for (--loss gaussian), or, with
    --loss auto, implied by a learned Σ (the released DiT-XL/2). Its previews then sample with DDIM
    and its validation loss is this objective's."""
    return loss == "gaussian" or (loss == "auto" and getattr(model.params, "learn_sigma", False))


def gaussian_loss(model, x0: Tensor, cond: dict, g: torch.Generator, sched: dict | None = None):
    """DiT's loss for an ε- and Σ-predicting model: t ~ U{0..T-1}, x_t = √ᾱ·x0 + √(1-ᾱ)·ε,
    mse(ε̂, ε) + L_vlb, where L_vlb (bits per dim) is KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t)) with
    the mean from a detached ε̂ (only Σ learns from it; Improved DDPM §3.1), the discretized
    decoder NLL at t = 0. Without learned Σ: the ε MSE alone."""
    sched = sched or {}
    ac = alphas_cumprod(sched).to(x0.device)
    B, C = x0.shape[:2]
    t = torch.randint(0, len(ac), (B,), generator=g).to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0)
    a = ac[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = model(x_t, t.float(), **cond).float()
    eps = out[:, :C]
    mse = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
    if out.shape[1] == C:
        return mse.mean()
    a_prev = torch.cat([torch.ones(1, device=ac.device), ac[:-1]])[t].view(-1, 1, 1, 1)
    beta = 1 - a / a_prev
    post_var = beta * (1 - a_prev) / (1 - a)
    # DiT clips the log variance at t = 0 to t = 1's
    post_var_1 = (1 - ac[1] / ac[0]) * (1 - ac[0]) / (1 - ac[1])
    log_post = torch.log(torch.where(t.view(-1, 1, 1, 1) == 0, post_var_1, post_var))
    c1, c2 = a_prev.sqrt() * beta / (1 - a), (1 - beta).sqrt() * (1 - a_prev) / (1 - a)
    x0_hat = (x_t - (1 - a).sqrt() * eps.detach()) / a.sqrt()
    frac = (out[:, C:] + 1) / 2
    log_var = frac * torch.log(beta) + (1 - frac) * log_post
    mean_q, mean_p = c1 * x0 + c2 * x_t, c1 * x0_hat + c2 * x_t
    kl = normal_kl(mean_q, log_post, mean_p, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = discretized_nll(x0, mean_p, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    return (mse + torch.where(t == 0, nll, kl)).mean()


# ----------------------------------------------------------------------------------------------------------------
# class names


def class_ids(classes: list[str], id2label: dict | None) -> list[int]:
    """Class ids from ids or names: a name is any comma-separated synonym of id2label (as
    DiTPipeline.get_label_ids reads it)."""
    names = {}
    for k, v in (id2label or {}).items():
        for name in v.split(","):
            names[name.strip()] = int(k)
    out = []
    for c in classes:
        if c.strip().lstrip("-").isdigit():
            out.append(int(c))
        elif c.strip() in names:
            out.append(names[c.strip()])
        else:
            raise ValueError(
                f"class {c!r} is neither an id nor a name in id2label ({len(names)} names)"
            )
    return out


# ----------------------------------------------------------------------------------------------------------------
# a class-conditional model folder, end to end (sample.py --classes)


@torch.no_grad()
def sample_classes(
    folder,
    classes: list[str],
    steps: int,
    cfg: float,
    seed: int,
    size: int = 0,
    device="cpu",
    solver: str = "euler",
) -> tuple[Tensor, list[str], dict]:
    """Images (B, 3, H, W) in [-1, 1] of a class-conditional folder (DiT or USiT), one per class (ids
    or id2label names), from seeded noise (common.get_noise): DDIM / DDPM when the folder's scheduler
    is diffusers' DDIMScheduler / DDPMScheduler (released DiT), else the flow ODE by `solver`: Euler at
    the folder's shift, or adaptive dopri5. size 0: the model's native size. Returns the images, the
    class names and the recipe."""
    from common import get_noise, shift_for
    from models.pipeline import load_pipeline

    pipe = load_pipeline(folder, device=device)
    model, ae = pipe.transformer.eval(), pipe.ae.eval()
    ids = class_ids(list(classes), pipe.id2label)
    f, C = ae.spatial_factor, model.params.in_channels
    h = size // f if size else model.params.sample_size
    noise = get_noise((len(ids), C, h, h), seed).to(device)
    labels = torch.tensor(ids, device=device)
    sched_file = Path(folder) / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    kind = sched.get("_class_name", "")
    eps = kind in ("DDIMScheduler", "DDPMScheduler")  # a released ε DiT; else a flow model
    if solver != "euler" and eps:
        raise ValueError(
            f"--solver {solver} solves a flow model's ODE; {folder} is an ε model ({kind})"
        )
    if kind == "DDIMScheduler":
        z = ddim_sample(model, noise, labels, sched, steps, cfg)
    elif kind == "DDPMScheduler":
        z = ddpm_sample(
            model, noise, labels, sched, steps, cfg, generator=torch.Generator().manual_seed(seed)
        )
    else:
        r = shift_for(pipe.shift, (C, h, h), model.params.patch_size, pipe.shift_value)
        z = flow_sample(model, noise, labels, steps, cfg, r, solver=solver)
    names = [(pipe.id2label or {}).get(str(i), str(i)) for i in ids]
    meta = {
        "model": str(folder),
        "classes": ",".join(map(str, ids)),
        "steps": steps,
        "cfg": cfg,
        "sampler": kind if eps else f"flow {solver}",
        "seed": seed,
    }
    return ae.decode(z.to(next(ae.parameters()).dtype)).float().cpu(), names, meta
