"""Stages 1 and 2 of DC-Gen, embedding alignment (DC-Gen §3.2, Eq. (1)): move a pretrained DiT from
its autoencoder's latent (the teacher AE, e.g. FLUX's f8c16 VAE) to a deeply compressed one (the student AE, DC-AE
f32c32 or DC-AE 1.5 f64c128) without collapsing it. Only the two layers that touch the latent change:

  --stage cache  the latent cache every later stage trains on (no AE or text encoder runs per step): an image set
                 encoded by both AEs, or (--prompts: DC-Gen's data) the teacher's images of prompts; in buckets.
  --stage embed  a fresh patch embedder for the student latent (xavier, bias 0) learns to reproduce the frozen base
                 embedder's output on the teacher latent of the same image, compared as 2-D maps:
                   --align upsample    student map bilinearly upsampled to the teacher grid (official code default)
                   --align downsample  teacher map average-pooled to the student grid (DC-Gen Eq. (1))
                 then assembles the student: base backbone + new embedder + a fresh head (xavier, bias 0).
  --stage head   embedder and head trained with the model's own loss (guide loss for FLUX, flow matching for
                 SANA, DiT's for a learned-sigma DiT), backbone frozen: stage 3's loop without LoRA, as the
                 official stage 2 runs its stage-3 trainer. Writes the complete student model folder for lora.py.

Without alignment, fine-tuning on the new latent collapses (DC-Gen §3.2: DiT-XL FID 456, SANA 259, FLUX 15.8 with
artifacts); with it, LoRA fine-tuning starts from a model that already sees the new tokens almost as the old ones.

Run:    python align.py --stage cache --data images/ --resolution 512 --teacher_ae FLUX.1-Krea-dev/vae \
            --student_ae dc-ae-f32c32/ --text FLUX.1-Krea-dev --max_length 256 --out_dir out/cache-512
        torchrun --standalone --nproc_per_node=8 align.py --stage embed --base FLUX.1-Krea-dev \
            --cache out/cache-512 --out_dir out/embed
        torchrun --standalone --nproc_per_node=8 align.py --stage head --init out/embed/model \
            --cache out/cache-512 --out_dir out/head --dtype bf16 --grad_checkpointing
        python align.py --stage cache --prompts prompts.txt --teacher FLUX.1-Krea-dev --buckets ms ...
Input:  cache: images (+ captions) and the two AEs; embed: a base model folder and a cache with both latents;
        head: the embed stage's model folder and the cache. Output: out_dir/ckpt_{step:07d}.pt (only the new layers),
        config.json, log.txt; cache: shard_*.safetensors + meta.json; embed and head: out_dir/model (model folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

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
    save_ckpt,
    save_config,
    seed_everything,
    wrap_model,
)
from data import (
    BucketSampler,
    ImageFolder,
    LatentCache,
    PromptItems,
    bucket_sizes,
    encode_items,
    finish_cache,
    write_shards,
)
from models.autoencoder import load_autoencoder
from models.c2i import eps_objective, gaussian_loss
from models.dit import DiT, positions_map
from models.loading import staged_folder
from models.pipeline import load_pipeline, read_shift, write_pipeline
from models.text import drop_text, load_text_encoder
from plan import check_run
from toy.classes import ClassDataset, LabelEncoder
from toy.shapes import ShapesDataset
from training import (
    check_latent,
    draw,
    flow_matching_loss,
    guide_loss,
    latest_checkpoint,
    merged_state_dict,
    open_cache,
    prepare,
    train,
    with_shift,
)

# ----------------------------------------------------------------------------------------------------------------
# config

# One dataclass per stage, each with its real defaults: `python align.py --stage head --help` lists
# the head stage's flags only. The optimisation defaults are the official DC-Gen-FLUX recipe
# (`projects/DC-Gen/flux_t2i.md` in the official repository): embed 20k steps, AdamW (0.9, 0.95),
# constant lr 1e-4; head 5k steps, AdamW (0.9, 0.999), 1000 warm-up steps, clip 0.1; neither keeps
# an EMA.


@dataclass
class CacheConfig:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    stage: str = "cache"  # cache, embed or head (each has its own flags: align.py --stage X --help)
    out_dir: str = "out/cache"  # shard_*.safetensors, null.safetensors, meta.json, config.json
    data: str = "shapes"  # image folder (captions: .txt or captions.jsonl), "shapes" or "classes" (labels, no --text)
    prompts: str = ""  # a prompt file, one a line: --teacher generates each item instead of --data (DC-Gen's data)
    teacher: str = ""  # with --prompts: the model folder that samples them (its AE is the teacher AE; its text
    # encoders the text unless --text), with its own shift, --sample_steps and --guidance / --cfg
    sample_steps: int = 20  # with --prompts: the teacher's Euler steps
    guidance: float = 3.5  # with --prompts: embedded guidance of a guidance-distilled teacher
    cfg: float = 0.0  # with --prompts: CFG scale (0: 1 for guidance-distilled teachers, 4.5 for CFG ones)
    save_images: bool = False  # with --prompts: keep the teacher's images as out_dir/images (an image folder)
    buckets: str = "square"  # aspect-ratio buckets at --resolution: square, f64ms, f32ms, ms (the official lists)
    # or height/width ratios "0.6,1,1.67"; each image goes to the nearest (docs/data.md)
    bucket_multiple: int = 64  # bucket sides are multiples of this (AE factor x patch of every model on the cache)
    upscale: bool = False  # image folders: enlarge images smaller than their bucket (else skipped and counted)
    max_shards: int = 0  # write at most this many shards per rank, then stop (0: all; run again to resume)
    count: int = 10_000  # images to cache from "shapes" (an image folder caches all of its images)
    split: str = "train"  # "shapes": train captions, or test (held-out captions: a validation cache)
    resolution: int = 512  # image size in px (resized, center-cropped), the base of the buckets
    teacher_resolution: int = 0  # px of the teacher's copy of each image (0: --resolution), area-downsampled; pairs
    # a student at a large size with the base at its own size on the same token grid (the toy 4K model: README)
    teacher_ae: str = ""  # the base model's AE folder (e.g. FLUX.1-Krea-dev/vae); "" skips the teacher latents
    student_ae: str = ""  # the deep-compression AE folder (DC-AE); "" skips the student latents
    student_channels: int = 0  # DC-AE 1.5: keep only the first c latent channels (its structured prefix); 0: all
    text: str = ""  # folder with the text encoders (the base model folder)
    max_length: int = 256  # FLUX: T5 tokens (official training: 256, "t5-256"; sampling 512); SANA: Gemma tokens
    # kept (its own 300 unless given); 0: the encoder's default (T5 512)
    tile_px: int = 0  # encode in overlapping tiles of this many px (0: one pass, as the official code); tiles bound
    # the AE's memory but their seams differ from one pass (README: differences)
    shard_size: int = 256  # rows per shard file
    batch_size: int = 64  # images encoded at once
    device: Device = "auto"  # auto, cuda or cpu
    dtype: Dtype = "fp32"  # fp32 or bf16 (the AEs encode under bf16 autocast)
    seed: int = 0  # "shapes": which scenes; --prompts: each item's noise and bucket
    log_every: int = 10  # batches between progress lines
    # fmt: on


@dataclass
class EmbedConfig:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    stage: str = "embed"  # cache, embed or head (each has its own flags: align.py --stage X --help)
    out_dir: str = "out/embed"  # checkpoints, log.txt, config.json, model/ (the assembled student)
    base: str = ""  # the base model folder (its transformer and its patch embedder)
    cache: str = "out/cache"  # the latent cache, with both latents
    align: Literal["upsample", "downsample"] = "upsample"  # loss: upsample (official default) or downsample (Eq. (1))
    positions: bool = True  # DiT: compare embeddings plus fixed positions, each on its own grid (official code)
    patch_size: int = 1  # patch size of the student model (DC-Gen: 1)
    shift: Shift = ""  # noise-level shift written to the model folder: "" the base folder's own (what sample.py uses
    # for it), flux, dcgen or constant (common.shift_factor)
    shift_value: float = 3.0  # r of --shift constant
    steps: int = 20_000  # optimizer steps
    batch_size: int = 64  # global batch
    lr: float = 1e-4  # learning rate (constant)
    beta2: float = 0.95  # AdamW beta2 (beta1 0.9)
    clip_grad: float = 0.0  # max gradient norm (0: none)
    device: Device = "auto"  # auto, cuda or cpu
    dtype: Dtype = "fp32"  # fp32 or bf16 (the frozen base in bf16)
    seed: int = 0  # the fresh embedder's init and the data order
    log_every: int = 10  # steps between log lines
    save_every: int = 1000  # steps between checkpoints
    resume: bool = False  # continue from the newest checkpoint in out_dir
    dry_run: bool = False  # print the config and parameter counts, then exit
    # fmt: on


@dataclass
class HeadConfig:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    stage: str = "head"  # cache, embed or head (each has its own flags: align.py --stage X --help)
    out_dir: str = "out/head"  # checkpoints, log.txt, config.json, model/ (the complete student)
    init: str = ""  # the embed stage's model folder
    cache: str = "out/cache"  # the latent cache, with student latents and text states
    loss: Literal["auto", "fm", "guide", "gaussian"] = "auto"  # auto: guide / gaussian (learned-sigma DiT) / fm
    shift: Shift = ""  # training noise-level shift: "" the --init folder's own, flux, dcgen or constant
    shift_value: float = 3.0  # r of --shift constant
    steps: int = 5000  # optimizer steps
    batch_size: int = 64  # global batch, split over the ranks
    lr: float = 1e-4  # peak learning rate
    warmup: int = 1000  # linear warm-up steps, then constant
    beta2: float = 0.999  # AdamW beta2 (beta1 0.9)
    clip_grad: float = 0.1  # max global gradient norm (0: none)
    device: Device = "auto"  # auto, cuda or cpu
    dtype: Dtype = "fp32"  # fp32 or bf16 (frozen weights in bf16, autocast; the two trained layers fp32)
    fsdp: bool = False  # shard the model (FSDP2, per block) instead of DDP
    grad_checkpointing: bool = False  # recompute block activations in backward
    seed: int = 0  # data order and draws
    log_every: int = 10  # steps between log lines
    save_every: int = 1000  # steps between checkpoints
    sample_every: int = 0  # steps between preview grids (0: never)
    resume: bool = False  # continue from the newest checkpoint in out_dir
    dry_run: bool = False  # print the config and parameter counts, then exit
    # fmt: on


STAGES = {"cache": CacheConfig, "embed": EmbedConfig, "head": HeadConfig}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def embed_map(layer: nn.Module, z: torch.Tensor, p: int, base: int | None = None) -> torch.Tensor:
    """A patch embedder applied to a latent z (B, C, H, W), as a 2-D map of token embeddings (B, D,
    H/p, W/p); plus DiT's fixed positions laid out for a grid of side `base`, if given."""
    # DiT, SANA: conv with kernel = stride = p (DDP-wrapped)
    if isinstance(getattr(layer, "module", layer), nn.Conv2d):
        e = layer(z)
        return e + positions_map(e, base)
    # FLUX: linear on p×p patches
    tokens = rearrange(z, "b c (h p1) (w p2) -> b h w (c p1 p2)", p1=p, p2=p)
    return layer(tokens).permute(0, 3, 1, 2)


def new_layer_like(
    old: nn.Module, c_in: int | None = None, c_out: int | None = None, patch: int = 1
) -> nn.Module:
    """A fresh layer of old's kind and width for the student latent: xavier-uniform weight, zero
    bias (official). A conv embedder gets kernel = stride = the student's patch size."""
    if isinstance(old, nn.Conv2d):
        new = nn.Conv2d(c_in, old.out_channels, patch, stride=patch)
    else:
        new = nn.Linear(c_in or old.in_features, c_out or old.out_features)
    nn.init.xavier_uniform_(new.weight)
    nn.init.zeros_(new.bias)
    return new


def align_loss(e_t: torch.Tensor, e_s: torch.Tensor, mode: str) -> torch.Tensor:
    """MSE between teacher and student embedding maps, compared on one grid (s = teacher grid /
    student grid)."""
    s = e_t.shape[-1] // e_s.shape[-1]
    # NOTE(deviation): DC-Gen Eq. (1) average-pools the teacher map; the official code's default
    # bilinearly upsamples the student map instead. We follow the code; --align downsample is the
    # paper's variant.
    if mode == "upsample":  # at the teacher's resolution
        up = F.interpolate(e_s, scale_factor=s, mode="bilinear") if s > 1 else e_s
        return F.mse_loss(e_t, up)
    # DC-Gen Eq. (1): e' = AvgPool(e)
    return F.mse_loss(F.avg_pool2d(e_t, s) if s > 1 else e_t, e_s)


# ----------------------------------------------------------------------------------------------------------------
# stages


def cache_source(cfg: CacheConfig, sizes: list[tuple[int, int]]):
    """The items to cache: load(i) -> {"image" or "seed", "caption", "bucket"} or a skip reason."""
    if cfg.prompts:
        prompts = [ln.strip() for ln in Path(cfg.prompts).read_text().splitlines() if ln.strip()]
        return PromptItems(prompts, len(sizes), cfg.seed)
    if cfg.data not in ("shapes", "classes"):
        return ImageFolder(cfg.data, cfg.resolution, buckets=sizes, upscale=cfg.upscale)
    assert sizes == [(cfg.resolution,) * 2], "procedural images are square: --buckets square"
    kind = ShapesDataset if cfg.data == "shapes" else ClassDataset  # scenes, or one object a class
    shapes = kind(cfg.resolution, cfg.seed, cfg.split, cfg.count)
    shapes.load = lambda i: shapes[i] | {"bucket": 0}
    return shapes


def cache_stage(cfg: CacheConfig, d) -> None:
    """Encode images (or the teacher's samples of prompts) with both AEs and captions with the text
    encoders into safetensors shards per aspect-ratio bucket (data.py). Each rank writes the shards k =
    rank (mod world); a finished shard is skipped; the master writes meta.json once all are done."""
    assert cfg.teacher_ae or cfg.student_ae, "give --teacher_ae and/or --student_ae"
    assert not cfg.prompts or cfg.teacher, "--prompts needs --teacher (the model that samples them)"
    r_t = cfg.teacher_resolution or cfg.resolution
    assert r_t <= cfg.resolution, f"--teacher_resolution {r_t} > --resolution {cfg.resolution}"
    teacher = None
    if cfg.prompts:  # its latents are sampled, not encoded: no --teacher_ae
        dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        teacher = load_pipeline(cfg.teacher, dtype, d.device, parts=("transformer", "vae"))
        cfg = dataclasses.replace(
            cfg, teacher_ae=str(Path(cfg.teacher) / "vae"), text=cfg.text or cfg.teacher
        )
    sizes = bucket_sizes(cfg.buckets, cfg.resolution, cfg.bucket_multiple)
    data = cache_source(cfg, sizes)
    tile = cfg.tile_px or None  # None: one pass
    sources = (("teacher", "" if cfg.prompts else cfg.teacher_ae), ("student", cfg.student_ae))
    aes = {k: load_autoencoder(p, device=d.device, tile_px=tile).eval() for k, p in sources if p}
    flux_text = (Path(cfg.text) / "text_encoder_2").is_dir()  # FLUX: CLIP + T5; SANA: Gemma-2
    max_length = (cfg.max_length or None) if flux_text else None  # SANA keeps its own 300
    labels = LabelEncoder() if cfg.data == "classes" else None  # names -> {"label": class ids}
    text = labels or load_text_encoder(cfg.text, device=d.device, max_length=max_length)
    encode = lambda items, b: encode_items(cfg, items, sizes[b], aes, text, teacher, d.device)  # noqa: E731
    n_shards = write_shards(cfg, d, data, sizes, encode)
    if d.world_size > 1:
        dist.barrier()
    if d.master:
        finish_cache(cfg, n_shards, sizes, text)


def check_grids(base, cache: LatentCache, p_s: int) -> str:
    """In every bucket the student's token grid must divide the teacher's by one integer s in both
    directions (the same s in all buckets)."""
    p_t, found = base.params.patch_size, set()
    for b in range(len(cache.buckets)):
        (C_t, h_t, w_t), (C_s, h_s, w_s) = cache.shape("teacher", b), cache.shape("student", b)
        grid_t, grid_s = (h_t // p_t, w_t // p_t), (h_s // p_s, w_s // p_s)
        s = grid_t[0] // max(grid_s[0], 1)
        found.add(s)
        bad = h_t % p_t or w_t % p_t or h_s % p_s or w_s % p_s
        fits = grid_s[0] * s == grid_t[0] and grid_s[1] * s == grid_t[1]
        if bad or C_t != base.params.in_channels or not fits:
            raise ValueError(
                f"teacher latents {(C_t, h_t, w_t)} (base model: {base.params.in_channels} channels, "
                f"patch {p_t} -> grid {grid_t}) and student latents {(C_s, h_s, w_s)} (patch {p_s} -> "
                f"grid {grid_s}): the student grid must divide the teacher grid by the same integer in "
                "both directions"
            )
    assert len(found) == 1, f"the buckets' teacher/student grid ratios differ: {sorted(found)}"
    return f"teacher grid {grid_t} -> student grid {grid_s} (x{s}), {len(cache.buckets)} bucket(s)"


def assemble(base, name: str, student: nn.Module, cache: LatentCache, cfg: EmbedConfig, dtype):
    """The student model (the official `flux_assemble.py`): the base's backbone, the aligned embedder
    and a fresh head, built on the meta device and given the base's tensors (no second copy of 12B),
    written as a model folder with the student AE and the base's shift."""
    C_s = cache.shape("student")[0]
    # DiT: its fixed 2-D positions on the student's own grid (official: input_size / patch_size)
    grid = {"sample_size": cache.shape("student")[1]} if hasattr(base.params, "sample_size") else {}
    with torch.device("meta"):
        new = type(base)(
            dataclasses.replace(base.params, in_channels=C_s, patch_size=cfg.patch_size, **grid)
        )
    layers = base.latent_layers
    sd = {k: v for k, v in base.state_dict().items() if not k.startswith(layers)}
    sd |= {f"{name}.{k}": v.to(dtype) for k, v in student.state_dict().items()}
    out_features = new.get_submodule(layers[1]).out_features
    fresh = new_layer_like(base.get_submodule(layers[1]), c_out=out_features)
    sd |= {f"{layers[1]}.{k}": v.to(dtype) for k, v in fresh.state_dict().items()}
    new.load_state_dict(sd, strict=True, assign=True)
    shift, value = (cfg.shift, cfg.shift_value) if cfg.shift else read_shift(cfg.base)
    out = Path(cfg.out_dir) / "model"
    ae, text, labels = cache.meta["student_ae"], cache.meta["text"], cache.meta.get("id2label")
    with staged_folder(out) as tmp:  # renamed into place once complete
        write_pipeline(tmp, new, ae, text, shift, value, id2label=labels)
    print0(
        f"student model (new embedder, fresh head) -> {out}", log_file=Path(cfg.out_dir) / "log.txt"
    )


def embed_stage(cfg: EmbedConfig, d) -> None:
    out, log = Path(cfg.out_dir), Path(cfg.out_dir) / "log.txt"
    cache = LatentCache(cfg.cache)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    base = load_pipeline(cfg.base, dtype=dtype, parts=("transformer",)).transformer
    base = base.eval().requires_grad_(False)
    # the frozen base embedder: FLUX's x_embedder is a Linear, SANA's patch_embed wraps a Conv2d
    name = base.latent_layers[0]
    name += ".proj" if hasattr(base.get_submodule(name), "proj") else ""
    teacher = base.get_submodule(name).to(d.device)
    grids = check_grids(base, cache, cfg.patch_size)
    p_t, p_s, C_s = base.params.patch_size, cfg.patch_size, cache.shape("student")[0]
    torch.manual_seed(cfg.seed)  # the same fresh embedder on every rank
    c_in = C_s if isinstance(teacher, nn.Conv2d) else C_s * p_s * p_s
    student = new_layer_like(teacher, c_in=c_in, patch=p_s).to(d.device)
    n_params = sum(p.numel() for p in student.parameters())
    # DiT adds fixed positions to its patch embeddings; the official alignment compares the sums
    # (dc_ai/dc_adapt/models/dit.py), each on its own grid, so the student learns the difference too
    dit = isinstance(base, DiT) and cfg.positions
    bases = (base.pos_embed.base, cache.shape("student")[1] // p_s) if dit else (None, None)
    what = f"{cfg.align} loss{' of embeddings + positions' if dit else ''}"
    print0(f"embed: {grids}, {what}; {n_params} trainable parameters", log_file=log)
    if cfg.dry_run:
        return
    seed_everything(cfg.seed + d.rank)
    model = wrap_model(student, d)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=0.0)
    step = 0
    # the newest readable checkpoint (a truncated newer one is named and skipped)
    ckpt, state = latest_checkpoint(out, log) if cfg.resume else (None, None)
    if ckpt is not None:
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        print0(f"resumed from {ckpt} at step {step}", log_file=log)
    if cfg.batch_size % d.world_size:
        raise ValueError(
            f"--batch_size {cfg.batch_size} must be a multiple of the {d.world_size} ranks"
        )
    # ranks get disjoint shares of a step, all from the step's bucket
    sampler = BucketSampler(
        cache.counts(), cfg.batch_size // d.world_size, d.rank, d.world_size, cfg.seed
    )
    other = "downsample" if cfg.align == "upsample" else "upsample"
    t0 = time.perf_counter()
    while step < cfg.steps:
        bucket, rows = sampler.batch_of(step)
        batch = cache.get(rows, ["teacher", "student"], bucket)
        batch = {k: v.to(d.device, dtype) for k, v in batch.items()}
        with torch.no_grad():  # what the backbone expects: (b, D, *teacher grid)
            e_t = embed_map(teacher, batch["teacher"], p_t, bases[0]).float()
        e_s = embed_map(model, batch["student"].float(), p_s, bases[1])  # (b, D, *student grid)
        loss = align_loss(e_t, e_s, cfg.align)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_other = align_loss(e_t, e_s.detach(), other)  # the other variant, for comparison
            dt = (time.perf_counter() - t0) / cfg.log_every
            line = f"step {step:07d}/{cfg.steps:07d} | loss {loss.item():.5f}"
            line += f" | other {loss_other.item():.5f} | dt {dt * 1e3:.0f}ms"
            print0(line + f" | samples/s {cfg.batch_size / dt:.1f}", log_file=log)
            t0 = time.perf_counter()
        if (step % cfg.save_every == 0 or step == cfg.steps) and d.master:
            state = {"model": student.state_dict(), "ema": {}, "optimizer": opt.state_dict()}
            state |= {"step": step, "config": dataclasses.asdict(cfg)}
            save_ckpt(state, out / f"ckpt_{step:07d}.pt")
    if d.master:  # --- assemble the student: base backbone + the new embedder + a fresh head ---
        assemble(base, name, student, cache, cfg, dtype)


def head_stage(cfg: HeadConfig, d) -> None:
    """DC-Gen stage 2: the new embedder and a fresh head trained with the model's own loss, backbone
    frozen (the official stage 2 runs its stage-3 trainer with the backbone frozen), then the
    complete student model folder."""
    out, log = Path(cfg.out_dir), Path(cfg.out_dir) / "log.txt"
    cache = LatentCache(cfg.cache)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    torch.manual_seed(cfg.seed)

    def build() -> nn.Module:  # frozen weights in dtype, the two latent layers trainable in fp32
        model = load_pipeline(cfg.init, dtype=dtype, parts=("transformer",)).transformer
        return prepare(model, rank=1, alpha=1.0, targets=(), trainable=model.latent_layers)

    raw = build()
    check_latent(raw, cache.shape("student"), f"the cache {cfg.cache} (student)")
    distilled = getattr(raw.params, "guidance_embed", False)  # DiT, USiT: none
    guide = cfg.loss == "guide" or (cfg.loss == "auto" and distilled)
    assert not guide or distilled, "--loss guide needs a guidance embedding"
    eps = eps_objective(cfg.loss, raw)  # a learned-sigma DiT (DiT-XL/2): DiT's own loss
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    kind = "guide" if guide else "gaussian" if eps else "flow matching"
    what = f"{raw.latent_layers} trainable ({n_train / 1e6:.2f} M parameters), backbone frozen"
    print0(f"head: {what}; loss {kind}", log_file=log)
    check_run("head", raw, cfg, cache, "student", d, guide)  # on CUDA: does it fit the card?
    if cfg.dry_run:
        return
    seed_everything(cfg.seed + d.rank)
    null = {k: v.to(d.device) for k, v in cache.null.items()}

    # stage 3's objective (official recipe: text dropout 0.1, w ~ U(1, 14))
    def loss_fn(model, x0, text, g, r):
        x_t, sigma, v, drop, w = draw(x0, g, cfg.batch_size, d.rank, r, 0.1, 1.0, 14.0)
        cond = drop_text(text, null, drop)
        if eps:
            return gaussian_loss(model, x0, cond, g)
        if guide:
            return guide_loss(model, raw, x_t, sigma, v, cond, null, w)
        return flow_matching_loss(model, x_t, sigma, v, cond)

    last = train(cfg, d, raw, cache, "student", loss_fn, log)
    # the trained layers, from the checkpoint (FSDP leaves only shards in `raw`), in the run's dtype
    if d.master:
        model = build()
        sd = merged_state_dict(model, load_ckpt(last)["model"], dtype, last)
        init = Path(cfg.init)
        with staged_folder(out / "model") as tmp:  # renamed into place once complete
            write_pipeline(
                tmp, model, init / "vae", init, cfg.shift, cfg.shift_value, state_dict=sd
            )
        print0(f"student model (aligned embedder and head) -> {out / 'model'}", log_file=log)


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None):
    stage = argparse.ArgumentParser(add_help=False)
    stage.add_argument("--stage", default="embed", choices=sorted(STAGES))
    # this stage's flags only
    cfg = parse_config(STAGES[stage.parse_known_args(argv)[0].stage], argv)
    if cfg.stage == "head":  # train at the noise levels the model folder samples at
        cfg = with_shift(cfg)
    # checked before out_dir is written: a missing or empty cache leaves no run folder behind
    if cfg.stage != "cache":
        open_cache(cfg.cache, "student", *(["teacher"] if cfg.stage == "embed" else []))
    d = init_dist(cfg.device)
    if d.master:
        save_config(cfg, cfg.out_dir)
        print0(f"run {run_info(d.world_size)}", log_file=Path(cfg.out_dir) / "log.txt")
    {"cache": cache_stage, "embed": embed_stage, "head": head_stage}[cfg.stage](cfg, d)
    cleanup_dist()


if __name__ == "__main__":
    run_main(main)
