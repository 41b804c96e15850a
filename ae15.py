"""ae15.py: train a DC-AE with DC-AE 1.5's structured latent space (arXiv 2508.00413: channel-prefix masking), or a
DC-AE 1.0-style AE (`--mask none`), or the toy zoo's KL VAE; and `--eval` any AE folder (PSNR / SSIM per prefix).

Each step encodes the batch once and decodes K channel prefixes c' of the latent, c' drawn from a candidate set
(as the official DC-Gen code's dc_gen/aecore/trainer.py; with --always_max one of them is c' = C). Decoding the first
c' channels is exactly decoding the latent with channels >= c' zeroed, the paper's mask. Loss = mean over the prefixes
of L1 (+ LPIPS, + GAN when asked).

Run:    python ae15.py --model dc-ae-1.5-f64c128 --data /path/to/images --size_px 256 --batch_size 16 --steps 200000
        torchrun --standalone --nproc_per_node=8 ae15.py --model dc-ae-1.5-f64c128 --data /path/to/images \
            --size_px 256 --dtype bf16
Toy:    bash runs/ae15_ablation.sh   (two toy f32 AEs on procedural shapes, masked vs not, on a 2-core CPU)
Eval:   python ae15.py --eval --init out/ae15/ae --data shapes --size_px 256
Smoke:  python ae15.py --model tiny-1.5 --size_px 32 --batch_size 2 --steps 2 --device cpu --out_dir out/ae15-smoke
Input:  a fresh --model preset (models/dcae.py or models/vae.py PRESETS), or --init: a diffusers-format AE folder
        (ours or released); images from an image folder or "shapes" (data.py's procedural set).
Output: out_dir/config.json, log.txt, ckpt_{step:07d}.pt (AE + optimizer, --resume), samples/{step:07d}.png (rows:
        input, then each eval prefix), ae/ (diffusers layout, measured latent scale; models.autoencoder reads it),
        eval.json + eval.png with --eval.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (
    Device,
    Dtype,
    UsageError,
    atomic_write,
    cleanup_dist,
    draw_prefixes,
    init_dist,
    parse_config,
    print0,
    run_info,
    run_main,
    save_ckpt,
    save_config,
    save_image_grid,
    save_pretrained,
    seed_everything,
    step_generator,
)
from data import ImageFolder, StepSampler
from models import vae
from models.ae_losses import LPIPS, Reconstruct, patch_discriminator, psnr, ssim
from models.autoencoder import PRESETS as AE_PRESETS
from models.autoencoder import autoencoder_params, build_autoencoder, load_autoencoder
from models.loading import staged_folder
from toy.score import score
from toy.shapes import ShapesDataset
from training import latest_checkpoint

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass
class Config:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    model: str = "toy-f32c16"  # preset of a fresh AE (models/dcae.py or models/vae.py PRESETS); ignored with --init
    init: str = ""  # diffusers-format AE folder to fine-tune, or to evaluate with --eval
    data: str = "shapes"  # "shapes" (procedural captioned shapes, data.py) or an image folder
    size_px: int = 128  # training / eval image size (square)
    zoom: tuple[float, float] = (1.0, 1.0)  # shapes only: train on size_px crops of scenes rendered up to x zoom
    mask: Literal["prefix", "none"] = "prefix"  # prefix: DC-AE 1.5 channel masking; none: DC-AE 1.0, full latent
    prefixes: tuple[int, ...] = ()  # candidate c' set; empty: 16, 20, ..., C when C >= 64, else C/8, 2C/8, ..., C
    num_prefixes: int = 2  # K: channel prefixes decoded per step (one encoder pass)
    always_max: bool = True  # for K >= 2, one of the K prefixes is always c' = C (official always_sample_max_channel)
    steps: int = 1500  # optimizer steps in total
    batch_size: int = 16  # images per rank per step
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay to 10%)
    warmup: int = 100  # warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm
    l1_weight: float = 1.0  # weight of the L1 reconstruction loss (the paper's pixel loss)
    l2_weight: float = 0.0  # weight of an MSE term (the toy runs use 1: see "NOTE(deviation)" in the loop)
    kl_weight: float = 1e-4  # KL VAE only: weight of the KL term (per-element mean) against the pixel loss
    lpips_weight: float = 0.0  # LPIPS weight; needs --lpips_path (no weights can be downloaded here)
    lpips_path: str = ""  # folder with torchvision's vgg16-397923af.pth and the lpips package's v0.1 vgg.pth
    gan_weight: float = 0.0  # hinge-GAN generator weight (PatchGAN trained from scratch); 0 = off
    gan_start: int = 0  # step from which the GAN terms are on
    eval: bool = False  # evaluate --init (or the fresh --model) and exit: PSNR / SSIM per prefix
    eval_n: int = 64  # images evaluated (held-out procedural scenes, or the first of the folder; 0: none)
    eval_prefixes: tuple[int, ...] = ()  # c' evaluated and sampled; empty: C/8, C/4, C/2, C (adaptive) or C
    log_every: int = 10  # steps between log lines
    sample_every: int = 250  # steps between reconstruction grids (0: none)
    save_every: int = 500  # steps between checkpoints (0: the last step only, which is always saved)
    out_dir: str = "out/ae15"  # where everything goes
    resume: bool = False  # continue from the newest out_dir/ckpt_*.pt
    seed: int = 0  # base seed (rank r uses seed + r; prefixes and data are shared-seeded per step)
    device: Device = "auto"  # "auto", "cpu" or "cuda"
    dtype: Dtype = "fp32"  # fp32, or bf16: autocast over fp32 weights (faster on GPUs and on CPUs with AVX512-BF16)
    num_workers: int = 0  # DataLoader workers per rank
    dry_run: bool = False  # print the config and parameter counts, then exit
    # fmt: on


# ----------------------------------------------------------------------------------------------------------------
# helpers


def check_flags(cfg: Config) -> None:
    if cfg.dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be fp32 or bf16, got {cfg.dtype!r}")
    if cfg.mask not in ("prefix", "none"):
        raise ValueError(
            f"--mask must be 'prefix' (DC-AE 1.5) or 'none' (DC-AE 1.0-style), got {cfg.mask!r}"
        )
    if cfg.eval and cfg.eval_n < 1:
        raise ValueError(f"--eval needs images to evaluate: --eval_n {cfg.eval_n}; give 1 or more")
    if cfg.lpips_weight > 0 and not cfg.lpips_path:
        raise ValueError(
            "--lpips_weight needs --lpips_path: LPIPS/VGG weights cannot be downloaded here and are not bundled; "
            "put torchvision's vgg16-397923af.pth and lpips' v0.1 vgg.pth in a folder and pass it"
        )


def load_ae(cfg: Config, ckpt: dict | None) -> nn.Module:
    """The AE: the --resume checkpoint's (own config), the --init folder's, or a --model preset."""
    if ckpt is not None:
        ae = build_autoencoder(autoencoder_params(ckpt["ae_config"]), tile_px=None)
        ae.load_state_dict(ckpt["model"])
    elif cfg.init:
        ae = load_autoencoder(cfg.init, dtype=torch.float32, tile_px=None)
    elif cfg.model in AE_PRESETS:
        ae = build_autoencoder(AE_PRESETS[cfg.model], tile_px=None)
    else:
        raise ValueError(f"unknown --model {cfg.model!r}; choose from {list(AE_PRESETS)}")
    if cfg.mask == "prefix" and not ae.adaptive:
        name = cfg.init or cfg.model
        raise ValueError(
            f"--mask prefix needs an adaptive AE (DC-AE 1.5: no latent shortcuts); {name!r} is not one: "
            "train it with --mask none"
        )
    return ae


def candidate_prefixes(C: int, given: tuple[int, ...]) -> list[int]:
    """The c' candidates: `given`, or every multiple of 4 from 16 (owl-wms#65's; C >= 64) or of C/8
    (toy latents)."""
    assert all(1 <= c <= C for c in given), f"--prefixes {given} must lie in 1..{C}"
    step = 4 if C >= 64 else max(1, C // 8)
    default = range(16 if C >= 64 else step, C + 1, step)
    return sorted(set(given or default) | {C})  # always including C


def describe(ae: nn.Module, prefixes: list[int]) -> str:
    """One line: the AE's type, factor, channels, parameter counts and trained prefixes."""
    n_enc, n_dec = (sum(p.numel() for p in m.parameters()) for m in (ae.encoder, ae.decoder))
    return (
        f"AE {type(ae).__name__} f{ae.spatial_factor}c{ae.latent_channels} | encoder {n_enc / 1e6:.3f}M"
        f" | decoder {n_dec / 1e6:.3f}M | adaptive {ae.adaptive} | prefixes {prefixes}"
    )


def training_modules(cfg: Config, ae: nn.Module, dist):
    """The training forward Reconstruct(ae), DDP-wrapped over several ranks; LPIPS (frozen, from
    --lpips_path) and the PatchGAN with its DDP wrapper, each None when its weight is 0."""
    model = Reconstruct(ae)
    if dist.world_size > 1:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    lpips = LPIPS.load(cfg.lpips_path).to(dist.device) if cfg.lpips_weight > 0 else None
    disc = patch_discriminator().to(dist.device) if cfg.gan_weight > 0 else None
    disc_ddp = DDP(disc) if disc is not None and dist.world_size > 1 else disc
    return model, lpips, disc, disc_ddp


def make_dataset(cfg: Config, train: bool):
    # training scenes from the train captions; eval on held-out captions and seeds
    if cfg.data == "shapes":
        if not train:
            return ShapesDataset(cfg.size_px, seed=cfg.seed + 10_000, split="test")
        return ShapesDataset(cfg.size_px, seed=cfg.seed, split="train", zoom=cfg.zoom)
    return ImageFolder(cfg.data, cfg.size_px, captions=False)


def eval_batch(cfg: Config, n: int) -> torch.Tensor:
    """The first n evaluation images, (n, 3, H, W)."""
    ds = make_dataset(cfg, train=False)
    return torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])


def train_batches(cfg: Config, ds, dist, start: int):
    """Each rank's slice of every global batch, indexed by step from `start` (exact resume)."""
    sampler = StepSampler(
        len(ds), cfg.batch_size, dist.rank, dist.world_size, cfg.seed, start, cfg.data != "shapes"
    )
    return iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers))


def make_optimizers(cfg: Config, ae: nn.Module, disc: nn.Module | None, ckpt: dict | None):
    """AdamW for the AE (and the discriminator), restored with the discriminator from --resume."""
    opt = torch.optim.AdamW(
        ae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
    )
    disc_opt = (
        torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        if disc is not None
        else None
    )
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        if disc is not None:
            disc.load_state_dict(ckpt["disc"])
            disc_opt.load_state_dict(ckpt["disc_opt"])
    return opt, disc_opt


def lr_at(step: int, cfg: Config) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))  # cosine from lr to lr/10


def step_prefixes(cfg: Config, step: int, cands: list[int], C: int) -> list[int]:
    """The channel prefixes c' decoded at `step`: K drawn from `cands`, or [C] with --mask none."""
    # DC-AE 1.5 channel masking: K channel prefixes c' this step (common.draw_prefixes), each
    # decoded from one encoding. NOTE(deviation): every rank draws the same c' from the step's
    # generator (the official trainer seeds one per rank, so 8 GPUs decode up to 8·K different
    # prefixes a step): N ranks train as one; a resume replays.
    g = step_generator(cfg.seed, step)
    return (
        draw_prefixes(g, cands, cfg.num_prefixes, cfg.always_max, C)
        if cfg.mask == "prefix"
        else [C]
    )


def train_step(
    model: nn.Module, ae: nn.Module, opt, x, prefixes: list[int], cfg: Config, lpips, disc
):
    """One AE update on the batch x (with the GAN's generator term when `disc` is given). Returns
    the logged values (losses, gradient norm) and the fp32 reconstructions, which the
    discriminator's step reuses."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
        recs, kl = model(x, prefixes)
    recs = [r.float() for r in recs]  # the losses in fp32
    kl = kl.float()
    # L = (1/K) Σ_k L_rec(D(z[:, :c_k]), x): every prefix must reconstruct the image on its own
    l1 = sum((r - x).abs().mean() for r in recs) / len(recs)
    l2 = sum((r - x).pow(2).mean() for r in recs) / len(recs)
    # NOTE(deviation): the paper's pixel loss is L1, with LPIPS doing the heavy lifting. Without
    # LPIPS weights, L1 alone collapses on our sparse procedural scenes (the median pixel is
    # background, so a blank canvas is a strong local minimum); the toy runs use MSE instead
    # (--l1_weight 0 --l2_weight 1), whose gradient grows with the error.
    loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl
    if lpips is not None:
        loss = loss + cfg.lpips_weight * sum(lpips(r, x).mean() for r in recs) / len(recs)
    # generator side: fool the discriminator (its weights frozen for this term)
    if disc is not None:
        disc.requires_grad_(False)
        loss = loss - cfg.gan_weight * sum(disc(r).mean() for r in recs) / len(recs)
        disc.requires_grad_(True)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
    opt.step()
    return {"loss": loss, "l1": l1, "l2": l2, "kl": kl, "gnorm": gnorm}, recs


def check_finite(loss: float, step: int, out: Path) -> None:
    """Stop at a NaN or infinite loss of step index `step` (logged as step + 1), before it is saved over the last
    good checkpoint. Images are finite, so the model diverged."""
    if not math.isfinite(loss):
        raise UsageError(
            f"loss is {loss} at step {step + 1} (the images are finite: the model diverged; lower --lr or raise "
            f"--warmup); the last good checkpoint is kept in {out}"
        )


def disc_step(
    disc: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, recs: list[torch.Tensor]
) -> None:
    """The discriminator's update: hinge loss on real images vs detached reconstructions."""
    fake = torch.cat([r.detach() for r in recs])
    d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(fake)).mean()
    opt.zero_grad(set_to_none=True)
    d_loss.backward()
    opt.step()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def log_line(cfg: Config, done: int, losses: dict, prefixes: list[int], dt: float, dist) -> str:
    """The `step | loss | ...` line of step `done`; dt: mean time of a step since the last line."""
    v = {k: t.item() for k, t in losses.items()}
    return (
        f"step {done:07d}/{cfg.steps:07d} | loss {v['loss']:.4f} | l1 {v['l1']:.4f} | l2 {v['l2']:.4f}"
        f" | kl {v['kl']:.4f} | prefixes {','.join(map(str, prefixes))} | gnorm {v['gnorm']:.3f}"
        f" | lr {lr_at(done - 1, cfg):.2e} | dt {dt * 1000:.0f}ms | img/s {cfg.batch_size * dist.world_size / dt:.1f}"
        f" | mem {peak_memory_gb(dist.device):.2f}GB"
    )


def save_samples(ae: nn.Module, fixed: torch.Tensor, show: list[int], out: Path, done: int) -> None:
    """samples/{done:07d}.png: the fixed images, then their reconstructions from each prefix."""
    grid = recon_grid(ae.eval(), fixed, show)
    save_image_grid(grid, out / "samples" / f"{done:07d}.png", nrow=4, text={"prefixes": show})
    ae.train()


def save_checkpoint(out: Path, done: int, cfg: Config, ae: nn.Module, opt, disc, disc_opt) -> None:
    """ckpt_{done:07d}.pt: the AE, its optimizer (and the discriminator's); keeps the newest two."""
    state = {
        "model": ae.state_dict(),
        "optimizer": opt.state_dict(),
        "step": done,
        "config": dataclasses.asdict(cfg),
    }
    state["ae_config"] = ae.config()
    if disc is not None:
        state.update(disc=disc.state_dict(), disc_opt=disc_opt.state_dict())
    save_ckpt(state, out / f"ckpt_{done:07d}.pt")
    for old in sorted(out.glob("ckpt_*.pt"))[:-2]:  # keep the newest two
        old.unlink()


@torch.no_grad()
def evaluate(ae: nn.Module, cfg: Config, prefixes: list[int], device: torch.device) -> dict:
    """Mean PSNR / SSIM of the reconstruction of cfg.eval_n held-out images for each channel prefix
    c'; on the shapes set also the scorer's accuracy on the reconstructions (can a downstream
    model's output still be read?)."""
    ae.eval()
    x_all = eval_batch(cfg, cfg.eval_n)
    stats = {c: {"psnr": 0.0, "ssim": 0.0, "acc": 0.0} for c in prefixes}
    specs = (
        [make_dataset(cfg, train=False).scene(i).spec for i in range(len(x_all))]
        if cfg.data == "shapes"
        else []
    )
    for i, x in enumerate(x_all.split(cfg.batch_size)):
        z = ae.encode(x.to(device))  # (B, C, h, w); z[:, :c] is exactly encode(x, channels=c)
        for c in prefixes:
            rec = ae.decode(z[:, :c]).float().cpu()
            stats[c]["psnr"] += psnr(rec, x).sum().item() / len(x_all)
            stats[c]["ssim"] += ssim(rec, x).sum().item() / len(x_all)
            batch_specs = specs[i * cfg.batch_size : i * cfg.batch_size + len(x)]
            correct = sum(score(r, s)["correct"] for r, s in zip(rec, batch_specs))
            stats[c]["acc"] += correct / len(x_all)
    return {c: s if specs else {k: v for k, v in s.items() if k != "acc"} for c, s in stats.items()}


@torch.no_grad()
def recon_grid(ae: nn.Module, x: torch.Tensor, prefixes: list[int]) -> torch.Tensor:
    """Rows: the inputs, then their reconstructions from each prefix. (n·(1 + P), 3, H, W)."""
    z = ae.encode(x)
    return torch.cat([x.cpu()] + [ae.decode(z[:, :c]).float().cpu() for c in prefixes])


def run_eval(ae: nn.Module, cfg: Config, show: list[int], dist, out: Path) -> None:
    """--eval: PSNR / SSIM per prefix on stdout, eval.json, a reconstruction grid eval.png."""
    res = evaluate(ae, cfg, show, dist.device)
    for c, r in res.items():
        print0(f"channels {c:4d} | " + " | ".join(f"{k} {v:.4f}" for k, v in r.items()))
    if dist.master:
        report = json.dumps({"init": cfg.init or cfg.model, "n": cfg.eval_n, **res}, indent=2)
        atomic_write(out / "eval.json", lambda f: f.write(report.encode()))
        save_image_grid(
            recon_grid(ae, eval_batch(cfg, 4).to(dist.device), show), out / "eval.png", nrow=4
        )


@torch.no_grad()
def measure_latent_scale(ae: nn.Module, x: torch.Tensor) -> None:
    """Latent normalisation from data: DC-AE s = 1/RMS (diffusers'); VAE shift = mean, s = 1/std."""
    p = ae.params
    # undo the current normalisation
    raw = ae.encode(x) / p.scaling_factor + getattr(p, "shift_factor", 0.0)
    if isinstance(ae, vae.VAE):
        ae.params = dataclasses.replace(
            p, shift_factor=raw.mean().item(), scaling_factor=1 / raw.std().item()
        )
    else:
        ae.params = dataclasses.replace(p, scaling_factor=1 / raw.pow(2).mean().sqrt().item())


def export(
    ae: nn.Module, ds, cfg: Config, show: list[int], device: torch.device, out: Path, log: Path
) -> None:
    """Measure the latent scale, write the diffusers-format out/ae, report held-out quality."""
    ae.eval()
    measure_latent_scale(
        ae, torch.stack([ds[i]["image"] for i in range(min(64, len(ds)))]).to(device)
    )
    with staged_folder(out / "ae") as tmp:  # renamed into place once complete
        save_pretrained(tmp, {k: v.detach().cpu() for k, v in ae.state_dict().items()}, ae.config())
    for c, r in (evaluate(ae, cfg, show, device) if cfg.eval_n else {}).items():
        print0(
            f"eval channels {c} | " + " | ".join(f"{k} {v:.4f}" for k, v in r.items()), log_file=log
        )
    print0(f"exported {out / 'ae'} (scaling_factor {ae.params.scaling_factor:.4f})", log_file=log)


# ----------------------------------------------------------------------------------------------------------------
# main


def main():
    cfg = parse_config(Config)
    check_flags(cfg)
    out = Path(cfg.out_dir)

    # --- distributed init
    dist = init_dist(cfg.device)
    seed_everything(cfg.seed + dist.rank)
    log = out / "log.txt"
    # the newest readable checkpoint (a truncated newer one is named and skipped)
    resume_from, ckpt = latest_checkpoint(out, log) if cfg.resume else (None, None)
    if cfg.resume and ckpt is None:
        raise UsageError(f"--resume: no readable ckpt_*.pt in {out}")
    if not cfg.eval and not cfg.dry_run:
        save_config(cfg, out)
        print0(" ".join(f"{k} {v}" for k, v in run_info(dist.world_size).items()), log_file=log)

    # --- models: the AE (fresh preset, --init folder, or the --resume checkpoint's config), then the loss networks
    ae = load_ae(cfg, ckpt).to(dist.device)
    C = ae.latent_channels
    cands = candidate_prefixes(C, cfg.prefixes)
    show = sorted(
        set(cfg.eval_prefixes) or ({C // 8, C // 4, C // 2, C} - {0} if ae.adaptive else {C})
    )
    print0(describe(ae, cands if cfg.mask == "prefix" else [C]))
    if cfg.dry_run:
        print0(json.dumps(dataclasses.asdict(cfg), indent=2))
        return cleanup_dist()
    if cfg.eval:
        run_eval(ae, cfg, show, dist, out)
        return cleanup_dist()

    ae.train()
    model, lpips, disc, disc_ddp = training_modules(cfg, ae, dist)

    # --- data: each rank takes its own slice of every global batch, indexed by step (exact resume)
    start = ckpt["step"] if ckpt is not None else 0
    ds = make_dataset(cfg, train=True)
    batches = train_batches(cfg, ds, dist, start)
    fixed = eval_batch(cfg, 4).to(dist.device)  # the images of every sample grid

    # --- optimizer and schedule
    opt, disc_opt = make_optimizers(cfg, ae, disc, ckpt)
    if ckpt is not None:
        print0(f"resumed from {resume_from} at step {start}", log_file=log)

    # --- training loop
    # training time since the last log line (sampling and saving are not counted)
    timed, n_timed = 0.0, 0
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x = next(batches)["image"].to(dist.device)  # (B, 3, H, W) in [-1, 1]
        # DC-AE 1.5 channel masking: K channel prefixes c', all decoded from one encoding
        prefixes = step_prefixes(cfg, step, cands, C)
        gan_on = disc is not None and step >= cfg.gan_start
        losses, recs = train_step(model, ae, opt, x, prefixes, cfg, lpips, disc if gan_on else None)
        if gan_on:  # discriminator side: hinge loss on real images vs detached reconstructions
            disc_step(disc_ddp, disc_opt, x, recs)
        # .item() also waits for the device, so the timing below is honest
        check_finite(losses["loss"].item(), step, out)
        timed += time.perf_counter() - t0
        n_timed += 1

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            print0(log_line(cfg, done, losses, prefixes, timed / n_timed, dist), log_file=log)
            timed, n_timed = 0.0, 0
        if dist.master and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
            save_samples(ae, fixed, show, out, done)
        if dist.master and (done % (cfg.save_every or cfg.steps) == 0 or done == cfg.steps):
            save_checkpoint(out, done, cfg, ae, opt, disc, disc_opt)

    # --- export: measure the latent scale, write the diffusers-format folder, report held-out reconstruction quality
    if dist.master:
        export(ae, ds, cfg, show, dist.device, out, log)
    cleanup_dist()


if __name__ == "__main__":
    run_main(main)
