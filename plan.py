"""plan.py: does a DC-Gen-FLUX stage fit on my GPUs, with which micro-batch, and how long does it take? Memory per
rank and FLOPs per step for every stage of runs/pipeline.sh (DC-Gen §3.2-3.3: embed, head, LoRA; the latent cache
and DC-AE 1.5's augmented LoRA; merge, SVDQuant calibration, sampling), with no GPU and no weights.

How: the stage's model is built as lora.py / align.py build it (LoRA, fp32 trainable tensors beside a bf16 base),
on fake tensors (no memory, no compute), and one steady-state training step (forward(s), loss, backward, clip,
AdamW, EMA) runs under a dispatch mode that follows every tensor storage from allocation to release. The live-byte
peak is the activation memory exactly as autograd keeps it (grad checkpointing's recompute included), and every
matmul / attention kernel's FLOPs are counted as executed. Multi-GPU terms are analytic: FSDP2 divides parameters,
gradients and optimizer states by the world size and holds about two all-gathered blocks; DDP adds a gradient
bucket copy. Depth enters linearly: traces at 1+1, 2+1 and 1+2 blocks give the per-block terms
(tests/test_plan.py checks the extrapolation against a direct trace, and the peaks against a real CPU run).

Run:    python plan.py --gpus 8 --gpu h100                      # the pipeline's stages on 8 H100s
        python plan.py --gpus 8 --gpu h100 --markdown           # the same, as a README table
        python plan.py --gpus 1 --gpu rtx5090 --no-fsdp --out out/plan.json
Smoke:  python plan.py --gpus 8 --stages embed sample-1k         # two rows, under a minute on a CPU
In code: predict(...) gives one stage's numbers; check_fits(...) is for lora.py / align.py to call at start.
Input:  nothing (model shapes from models/flux.py, models/dcae.py, models/vae.py). Output: a table, --out JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from common import parse_config, update_ema
from models.dcae import DCAE, DCAEParams
from models.dcae import PRESETS as DCAE_PRESETS
from models.flux import PRESETS, Flux, FluxParams, flux_flops
from models.text import drop_text
from models.vae import PRESETS as VAE_PRESETS
from models.vae import VAE
from training import draw, flow_matching_loss, guide_loss, prepare

# ----------------------------------------------------------------------------------------------------------------
# config

# Dense bf16 tensor-core peaks (no 2:4 sparsity) and memory. H100 SXM: 989 TFLOP/s, 80 GB (NVIDIA
# H100 datasheet); H200: the same GH100 compute, 141 GB; RTX 5090: 209.5 TFLOP/s dense bf16 with
# fp32 accumulate, 32 GB (NVIDIA RTX Blackwell GPU architecture whitepaper, appendix table "GeForce
# RTX 5090").
GPUS = {"h100": (989e12, 80e9), "h200": (989e12, 141e9), "rtx5090": (209.5e12, 32e9)}
# DC-Gen-FLUX.1-Krea training cost, H100 GPU-days: the paper, the later official README
PAPER_GPU_DAYS = (40, 31)
# T5-v1.1-XXL encoder, 4.76 B (FLUX text_encoder_2)
T5_XXL = 24 * (4 * 4096**2 + 3 * 4096 * 10240) + 32128 * 4096
CLIP_L = 123_060_480  # CLIP ViT-L/14 text model (FLUX text_encoder)


@dataclass
class Config:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    gpus: int = 8  # ranks of every torchrun stage (runs/pipeline.sh uses 8)
    gpu: str = "h100"  # h100, h200 or rtx5090: memory per GPU and dense bf16 peak
    mfu: float = 0.4  # fraction of the GPU's dense bf16 peak that a step reaches
    dtype: str = "bf16"  # fp32 or bf16 (frozen weights in bf16, trainable fp32, autocast), as the stages' --dtype
    grad_checkpointing: bool = True  # head and LoRA stages: recompute block activations in backward
    fsdp: bool = True  # head and LoRA stages: FSDP2 shards over the ranks (else DDP replicas)
    depth: int = -1  # double-stream blocks (-1: the preset's 19); smaller for quick looks
    depth_single: int = -1  # single-stream blocks (-1: the preset's 38)
    preset: str = ""  # FLUX preset planned for every stage ("": dcgen-flux-1k for 1K, dcgen-flux-4k for 4K)
    txt_len: int = 256  # T5 tokens in training (the official recipe's max_length)
    sample_txt_len: int = 512  # T5 tokens at sampling (FLUX's default)
    stages: tuple[str, ...] = ()  # only these rows (e.g. lora-512 sample-4k); empty: every stage
    out: str = ""  # also write the rows as JSON here
    markdown: bool = False  # print a markdown table (README) instead of plain text
    # fmt: on


# ----------------------------------------------------------------------------------------------------------------
# helpers: following storages and FLOPs through one step


class Tracker(TorchDispatchMode):
    """Every storage an op allocates: its bytes, the phase it was born and released in and when (a
    weakref finaliser), and the FLOPs of each matmul, convolution and attention kernel. Outputs that
    alias an input (views, in-place ops) and storages that existed before (parameters, optimizer
    states) are not counted."""

    def __init__(self):
        super().__init__()
        # [bytes, time born, phase born, time released, phase released] of every storage
        self.rows = []
        self.live = {}  # storage id -> its row, while it lives
        self.clock, self.phase, self.flops = 0, "forward", 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.flops += op_flops(func, args, kwargs, out)
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for storage in (
            t.untyped_storage() for t in tree_leaves(out) if isinstance(t, torch.Tensor)
        ):
            if storage._cdata in inputs or storage._cdata in self.live:
                continue
            self.clock += 1
            self.live[storage._cdata] = len(self.rows)
            self.rows.append([storage.nbytes(), self.clock, self.phase, math.inf, None])
            weakref.finalize(storage, self.free, storage._cdata)
        return out

    def free(self, key):
        self.clock += 1
        self.rows[self.live.pop(key)][3:] = [self.clock, self.phase]

    def peaks(self, weight) -> dict[str, float]:
        """The most bytes alive at once in each phase, a storage counting weight(row, phase born) x
        its bytes."""
        events = []
        for row, (n, born, phase, released, phase_released) in enumerate(self.rows):
            w = weight(row, phase) * n
            events += [(born, w, phase), (released, -w, phase_released)]
        live, peak = 0.0, {}
        for _, delta, phase in sorted(events, key=lambda e: e[0]):
            live += delta
            peak[phase] = max(peak.get(phase, 0.0), live)
        return peak


def op_flops(func, args, kwargs, out) -> float:
    """FLOPs of one aten op: torch.utils.flop_counter's formulas, plus CPU flash attention (what
    SDPA runs on a CPU and on these fake CPU tensors; the same math as CUDA flash attention, whose
    backward recomputes QKᵀ: 2.5x)."""
    name = func._overloadpacket.__name__
    if "scaled_dot_product" in name and "for_cpu" in name:
        if name.endswith("backward"):
            return sdpa_backward_flop_count(*(a.shape for a in args[:4]))
        return sdpa_flop_count(*(a.shape for a in args[:3]))
    formula = flop_registry.get(func._overloadpacket)
    return formula(*args, **kwargs, out_val=out) if formula else 0.0


@contextlib.contextmanager
def cuda_autocast_norms():
    """CUDA autocast's float32 list on top of CPU autocast (the trace runs on CPU fake tensors). The
    two agree on matmuls and attention (bf16); CUDA also runs normalisations in fp32 (ATen
    autocast_mode.h, AT_FORALL_FP32), so their outputs, and the activations saved after them, are
    fp32 on a GPU where a CPU keeps bf16. Patched at the functional level, so that grad
    checkpointing's recompute inside backward sees it too."""
    saved = {name: getattr(F, name) for name in ("layer_norm", "rms_norm", "group_norm")}

    def fp32(fn):
        def wrapped(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                args, kwargs = tree_map_only(
                    torch.Tensor,
                    lambda t: t.float() if t.is_floating_point() else t,
                    (args, kwargs),
                )
            return fn(*args, **kwargs)

        return wrapped

    for name, fn in saved.items():
        setattr(F, name, fp32(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


def to_fake(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Swap a meta-built module's parameters for fake CPU tensors of the same shapes, dtypes and
    requires_grad."""
    memo = {}
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and id(p) not in memo:
                fake = mode.fake_tensor_converter.from_meta_and_device(mode, p, torch.device("cpu"))
                memo[id(p)] = nn.Parameter(fake, requires_grad=p.requires_grad)
            if p is not None:
                m._parameters[name] = memo[id(p)]
        for name, t in list(m._buffers.items()):
            if t is not None:
                m._buffers[name] = mode.fake_tensor_converter.from_meta_and_device(
                    mode, t, torch.device("cpu")
                )
    return module


# ----------------------------------------------------------------------------------------------------------------
# helpers: a stage's model and step, as the stage scripts build and run them (traced here, measured in the tests)


def build_model(
    stage: str, params: FluxParams, dtype: torch.dtype, lora_rank: int, teacher_in: int = 64
) -> nn.Module:
    """The module a stage puts on the GPU, dtypes and requires_grad as the stages set them
    (training.prepare)."""
    # align.py: the frozen base embedder (teacher_in: FLUX's f8c16 latent in 2x2 patches)
    if stage == "embed":
        teacher = nn.Linear(teacher_in, params.hidden_size).to(dtype)
        # fp32, trained
        student = nn.Linear(params.in_channels * params.patch_size**2, params.hidden_size)
        return nn.ModuleDict({"teacher": teacher.requires_grad_(False), "student": student})
    model = Flux(params).to(dtype)
    if stage in ("sample", "quantize"):
        return model.requires_grad_(False)
    if stage == "head":  # align.py --stage head: only the latent layers train
        return prepare(model, 1, 1.0, (), model.latent_layers)
    # lora.py
    return prepare(model, lora_rank, float(lora_rank), model.lora_targets, model.latent_layers)


def make_batch(
    stage: str, params: FluxParams, b: int, latent_hw, txt_len: int, teacher=(64, 2)
) -> dict:
    """One rank's batch: latents and text states as the latent cache holds them (fp32). Embed: the
    teacher latent of the same images, in 2x2 patches of teacher[0] / 4 channels, on a token grid
    teacher[1] times the student's."""
    h, w = latent_hw
    if stage == "embed":
        t = 2 * teacher[1]
        return {
            "teacher": torch.randn(b, teacher[0] // 4, t * h, t * w),
            "student": torch.randn(b, params.in_channels, h, w),
        }
    return {
        "x0": torch.randn(b, params.in_channels, h, w),
        "txt": torch.randn(b, txt_len, params.context_in_dim),
        "y": torch.randn(b, params.vec_in_dim),
    }


def make_optimizer(model: nn.Module, stage: str, foreach: bool):
    """AdamW over the trainable tensors (fp32 states) and, for LoRA, the fp32 EMA copy lora.py
    keeps."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:  # sampling
        return None, {}
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, foreach=foreach)
    # a step on zero gradients creates the states, as the first real step does (weights unchanged)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema = {
        n: p.detach().float().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and stage == "lora"
    }
    return opt, ema


def embed_map(layer: nn.Module, z: torch.Tensor, p: int) -> torch.Tensor:
    """align.embed_map: a patch embedder on a latent (B, C, H, W) as a map (B, D, H/p, W/p)."""
    tokens = rearrange(z, "b c (h p1) (w p2) -> b h w (c p1 p2)", p1=p, p2=p)
    return layer(tokens).permute(0, 3, 1, 2)


def diffusion_loss(model, x0, cond, null, g, guide: bool) -> torch.Tensor:
    """lora.py's loss term: training.draw (text dropout 10%, w ~ U(1, 14)), then the guide loss
    (DC-Gen §3.3, a no-grad unconditional pass beside the one with gradient) or flow matching."""
    x_t, sigma, v, drop, w = draw(x0, g, x0.shape[0], 0, 1.0, 0.1, 1.0, 14.0)
    cond = drop_text(cond, null, drop)
    if guide:
        return guide_loss(model, model, x_t, sigma, v, cond, null, w)
    return flow_matching_loss(model, x_t, sigma, v, cond)


def train_step(
    stage, model, opt, ema, batch, null, amp, guide: bool, aug_k: int, mark=lambda phase: None
):
    """One optimizer step as the stage scripts run it: training.train's loop body (loss terms on
    aug_k channel prefixes under autocast, backward, clip, AdamW, EMA), or align.py's embed step
    (the frozen embedder without grad, the fresh one trained on its bilinearly upsampled map, the
    official default)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if stage == "embed":
        dtype = model["teacher"].weight.dtype
        with torch.no_grad():
            # (b, D, *teacher grid)
            e_t = embed_map(model["teacher"], batch["teacher"].to(dtype), 2).float()
        # (b, D, *student grid)
        e_s = embed_map(model["student"], batch["student"].to(dtype).float(), 1)
        loss = F.mse_loss(
            e_t, F.interpolate(e_s, scale_factor=e_t.shape[-1] // e_s.shape[-1], mode="bilinear")
        )
    else:
        x0, cond, loss = batch["x0"], {"txt": batch["txt"], "y": batch["y"]}, 0.0
        g = torch.Generator().manual_seed(0)
        # DC-AE 1.5 channel prefixes (e.g. 96 of 128)
        prefixes = [x0.shape[1]] + [x0.shape[1] * 3 // 4] * (aug_k - 1)
        with amp():
            for c in prefixes:
                loss = loss + diffusion_loss(model, x0[:, :c], cond, null, g, guide) / len(prefixes)
    mark("backward")
    loss.backward()
    mark("optimizer")
    if stage != "embed":  # the embed recipe has no clipping (align.RECIPES)
        # foreach on a GPU
        torch.nn.utils.clip_grad_norm_(params, 0.1, foreach=opt.defaults["foreach"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema:
        update_ema(ema, model, 0.999)


# ----------------------------------------------------------------------------------------------------------------
# helpers: prediction


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def trace(stage: str, params: FluxParams, *args) -> dict:
    """trace_step, memoised (FluxParams is not hashable; its fields are)."""
    return trace_step(stage, tuple(dataclasses.asdict(params).items()), *args)


@lru_cache(maxsize=512)
def trace_step(
    stage, fields, b, latent_hw, txt_len, dtype, ckpt, shards, rank, guide, aug_k, teacher, device
) -> dict:
    """Build the stage's model on fake tensors and trace one steady-state step (the optimizer states
    exist). shards: FSDP world size: gradients, optimizer states and the optimizer's temporaries
    count 1/shards."""
    params = FluxParams(**dict(fields))
    mode = FakeTensorMode()
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    with torch.device("meta"):
        model = build_model(stage, params, torch_dtype, rank, teacher[0])
    model = to_fake(model, mode)
    model.grad_checkpointing, model.adaptive_channels = ckpt, aug_k > 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    shim = (
        cuda_autocast_norms() if device == "cuda" and dtype == "bf16" else contextlib.nullcontext()
    )

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    marks = {"grads": set()}

    def mark(phase):
        tracker.phase = phase
        if phase == "optimizer":  # the gradients, now complete: they are sharded under FSDP
            marks["grads"] = {tracker.live[p.grad.untyped_storage()._cdata] for p in trainable}

    with mode, shim:
        null = {
            "txt": torch.randn(1, txt_len, params.context_in_dim),
            "y": torch.randn(1, params.vec_in_dim),
        }
        # with its states: a steady-state step
        opt, ema = make_optimizer(model, stage, foreach=device == "cuda")
        tracker = Tracker()
        with tracker:
            batch = make_batch(stage, params, b, latent_hw, txt_len, teacher)
            # one denoising step of sample.py: the bf16 model, no autocast, no graph
            if stage == "sample":
                with torch.no_grad():
                    w = {"guidance": torch.full((b,), 3.5)} if params.guidance_embed else {}
                    model(batch["x0"], torch.full((b,), 0.5), batch["txt"], batch["y"], **w)
            else:
                train_step(stage, model, opt, ema, batch, null, amp, guide, aug_k, mark)
            del batch
    sharded = lambda key, phase: (
        1 / shards if key in marks["grads"] or phase == "optimizer" else 1.0
    )  # noqa: E731
    activation = lambda key, phase: 0.0 if key in marks["grads"] or phase == "optimizer" else 1.0  # noqa: E731
    blocks = [
        *getattr(model, "transformer_blocks", []),
        *getattr(model, "single_transformer_blocks", []),
    ]
    states = opt.state.values() if opt else []
    # exp_avg, exp_avg_sq (not step)
    state = [t for s in states for t in s.values() if t.numel() > 1]
    peaks = tracker.peaks(sharded)
    return {
        "weights": nbytes(model.parameters()),
        "grads": nbytes(trainable),
        "optimizer": nbytes(state) + nbytes(ema.values()),
        "blocks": sum(nbytes(b.parameters()) for b in blocks),
        "block": max((nbytes(b.parameters()) for b in blocks), default=0),
        "block_grads": max(
            (nbytes(p for p in b.parameters() if p.requires_grad) for b in blocks), default=0
        ),
        "flops": tracker.flops,
        "activations": max(tracker.peaks(activation).get(p, 0.0) for p in ("forward", "backward")),
        "peak_step": max(peaks.get("forward", 0.0), peaks.get("backward", 0.0)),
        "peak_optimizer": peaks.get("optimizer", 0.0),
    }


def merge_estimate(params: FluxParams, rank: int, dtype: torch.dtype) -> dict:
    """lora.py --merge, on the host: the model in the run's dtype with its fp32 LoRA and latent
    layers, the checkpoint's four copies of the trainable tensors (weights, EMA, AdamW's two
    states), and merge_lora's fp32 B·A then scale·(B·A) of one layer at a time."""
    with torch.device("meta"):
        model = build_model("lora", params, dtype, rank)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    largest = max((m.in_features * m.out_features for m in layers), default=0)
    return {
        "weights": nbytes(model.parameters()),
        "optimizer": 4 * nbytes(p for p in model.parameters() if p.requires_grad),
        "activations": 2 * 4 * largest,
        "flops": sum(2.0 * m.rank * m.in_features * m.out_features for m in layers),
    }


def forward_flops(
    params: FluxParams, img_tokens: int, txt_tokens: int, lora_rank: int
) -> dict[str, float]:
    """One forward: flux_flops (token linears and attention) plus the LoRA branches, 2·r·(in +
    out) FLOPs per token per adapted linear (with rank 0 or in the head stage there are none)."""
    flops = flux_flops(params, img_tokens, txt_tokens)
    D, mlp, L = (
        params.hidden_size,
        int(params.hidden_size * params.mlp_ratio),
        img_tokens + txt_tokens,
    )
    # per token of its stream: q, k, v, out; MLP in, out
    double = 4 * (D + D) + (D + mlp) + (mlp + D)
    single = 3 * (D + D) + (D + mlp) + (D + mlp + D)  # q, k, v; proj_mlp; fused proj_out
    flops["lora"] = 2.0 * lora_rank * L * (params.depth * double + params.depth_single * single)
    return flops


def trace_at_depth(step: str, params: FluxParams, args: tuple, embed: bool) -> dict:
    """trace() at the model's depth: directly up to 7 blocks, else from the per-block terms of traces
    at 1+1, 2+1 and 1+2 blocks, scaled to the real depth (memory and FLOPs are affine in depth)."""
    if embed or params.depth + params.depth_single <= 7:
        return trace(step, params, *args)
    base = trace(step, dataclasses.replace(params, depth=1, depth_single=1), *args)
    d = trace(step, dataclasses.replace(params, depth=2, depth_single=1), *args)
    s = trace(step, dataclasses.replace(params, depth=1, depth_single=2), *args)
    n_d, n_s = params.depth - 1, params.depth_single - 1
    return {k: base[k] + n_d * (d[k] - base[k]) + n_s * (s[k] - base[k]) for k in base}


def predict(
    stage: str,
    params: FluxParams,
    *,
    micro_batch: int,
    latent_hw: tuple[int, int],
    txt_len: int = 256,
    dtype: str = "bf16",
    grad_checkpointing: bool = False,
    fsdp_world: int = 1,
    lora_rank: int = 256,
    guide: bool | None = None,
    aug_k: int = 1,
    ddp: bool = False,
    teacher: FluxParams | None = None,
    ae_factor: int | None = None,
    device: str = "cuda",
) -> dict:
    """Bytes per rank ("weights", "grads", "optimizer" (AdamW states + EMA), "activations", "peak")
    and "flops" of one optimizer step on this rank (forward + backward + recompute, as executed;
    "sample"/"quantize": one denoising forward; "merge": folding every LoRA, on the host). ddp: DDP
    replicas (a gradient-bucket copy). Embed only: teacher, the base model (default: FLUX.1's f8c16
    latent, 2x2 patches) and ae_factor, the student AE's factor (default: 32 up to 32 latent
    channels, DC-AE f32c32, else 64, DC-AE 1.5 f64c128). device "cpu" traces CPU autocast and
    AdamW's per-tensor loop instead of CUDA's (the tests measure on a CPU)."""
    valid = ("embed", "head", "lora", "merge", "sample", "quantize")
    if stage not in valid:
        raise ValueError(f"unknown stage {stage!r}; choose from {valid}")
    assert dtype in ("fp32", "bf16"), f"dtype {dtype!r}: choose fp32 or bf16"
    train = stage in ("embed", "head", "lora")
    rank = lora_rank if stage in ("lora", "merge") else 0
    img_tokens = latent_hw[0] * latent_hw[1] // params.patch_size**2
    fwd = forward_flops(params, img_tokens, txt_len, rank if stage == "lora" else 0)
    if stage == "merge":
        est = merge_estimate(params, rank, torch.bfloat16 if dtype == "bf16" else torch.float32)
        peak = est["weights"] + est["optimizer"] + est["activations"]
        return {**est, "grads": 0.0, "peak": peak, "host": True}
    # align.py's embed stage replicates its two embedders
    shards = fsdp_world if stage in ("head", "lora") else 1
    guide = (params.guidance_embed if guide is None else guide) and stage in ("head", "lora")
    step = stage if train else "sample"
    args = (micro_batch, tuple(latent_hw), txt_len, dtype, grad_checkpointing and train)
    args += (shards, rank, guide)
    teacher = teacher or dataclasses.replace(params, in_channels=16, patch_size=2)
    ae_factor = ae_factor or (32 if params.in_channels <= 32 else 64)
    # the teacher's f8 VAE token grid / the student's
    teacher_grid = ae_factor // (8 * teacher.patch_size)
    args += (
        aug_k if stage == "lora" else 1,
        (teacher.in_channels * teacher.patch_size**2, teacher_grid),
        device,
    )
    est = trace_at_depth(step, params, args, embed=stage == "embed")
    out = {
        "weights": est["weights"] / shards,
        "grads": est["grads"] / shards,
        "optimizer": est["optimizer"] / shards,
        "activations": est["activations"],
        "flops": est["flops"],
        "forward_flops": micro_batch * (fwd["linear"] + fwd["attention"] + fwd["lora"]),
        "host": False,
    }
    # FSDP2 gathers about two blocks at once (the running one and the prefetched next), holds one
    # block's full gradients until their reduce-scatter, and keeps the root's own layers (embedders,
    # head) gathered all step.
    root = est["weights"] - est["blocks"]
    out["fsdp_gathered"] = (
        2 * est["block"] + est["block_grads"] + root * (1 - 1 / shards) if shards > 1 else 0.0
    )
    # DDP's flat gradient buckets
    out["ddp_buckets"] = est["grads"] if ddp and train and shards == 1 else 0.0
    persistent = out["weights"] + out["optimizer"] + out["ddp_buckets"]
    out["peak"] = persistent + max(est["peak_step"] + out["fsdp_gathered"], est["peak_optimizer"])
    return out


def largest_micro_batch(
    stage: str, params: FluxParams, budget: float, anchor: int = 1, exact: bool = True, **kw
):
    """The largest micro-batch whose predicted peak fits `budget` bytes (0: none). Memory is affine
    in the micro-batch (every activation scales with it), so anchor and 2·anchor give it; exact:
    confirmed (or bisected) by tracing."""
    peak = lambda b: predict(stage, params, micro_batch=b, **kw)["peak"]  # noqa: E731
    a, a2 = peak(anchor), peak(2 * anchor)
    slope = max((a2 - a) / anchor, 1.0)
    guess = max(0, anchor + math.floor((budget - a) / slope))
    if not exact:
        return guess
    lo, hi = (guess, 4 * guess + 8) if guess and peak(guess) <= budget else (0, max(guess - 1, 0))
    while lo < hi:  # invariant: lo fits (or is 0)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid - 1)
    return lo


def check_fits(
    stage: str, model: nn.Module, *, micro_batch: int, device: torch.device, **kw
) -> None:
    """Stop a CUDA run at start, in one line, when its predicted peak exceeds the card (5% kept for
    the CUDA context and allocator slack): the predicted and the card's GB, the largest micro-batch
    that fits, and single-flag changes with their predicted peaks, cheapest first. kw: predict's
    (latent_hw, txt_len, dtype, grad_checkpointing, fsdp_world, lora_rank, guide, aug_k). Any
    FLUX-shaped model: only model.params is read."""
    if torch.device(device).type != "cuda":
        return
    total = torch.cuda.mem_get_info(device)[1]
    budget = 0.95 * total
    peak = predict(stage, model.params, micro_batch=micro_batch, **kw)["peak"]
    if peak <= budget:
        return
    world = int(os.environ.get("WORLD_SIZE", 1))
    best = largest_micro_batch(stage, model.params, budget, 1, False, **kw)
    # cheapest first: one more forward, then communication, then fewer samples, then precision
    changes = {
        "--grad_checkpointing": {**kw, "grad_checkpointing": True}
        if not kw["grad_checkpointing"]
        else None,
        "--fsdp": {**kw, "fsdp_world": world} if kw["fsdp_world"] == 1 and world > 1 else None,
        f"--batch_size {best * world}": {**kw, "micro_batch": best} if best else None,
        "--dtype bf16": {**kw, "dtype": "bf16"} if kw["dtype"] == "fp32" else None,
    }
    tried = []
    for flag, change in changes.items():
        if change is not None:
            gb = (
                predict(stage, model.params, **{"micro_batch": micro_batch, **change})["peak"] / 1e9
            )
            tried.append(f"{flag} {gb:.1f} GB" + ("" if gb * 1e9 <= budget else " (not enough)"))
    raise SystemExit(
        f"{stage}: predicted peak {peak / 1e9:.1f} GB per GPU > {budget / 1e9:.1f} GB usable of the GPU's "
        f"{total / 1e9:.1f} GB at micro-batch {micro_batch}; largest micro-batch that fits: {best}; predicted with "
        f"{'; '.join(tried) or 'no single flag: use more GPUs with --fsdp'} (python plan.py for every stage)"
    )


def check_run(
    stage: str, model: nn.Module, cfg, cache, latent: str, d, guide: bool, aug_k: int = 1
):
    """check_fits for a training script: the shapes from its latent cache, the micro-batch, dtype,
    checkpointing, FSDP and LoRA rank from its Config (`rank`, 0 when it has none). FLUX-shaped models
    only: the planner does not model SANA."""
    if not isinstance(model, Flux):
        return
    _, h, w = cache.shape(latent)
    check_fits(
        stage,
        model,
        micro_batch=cfg.batch_size // d.world_size,
        device=d.device,
        latent_hw=(h, w),
        txt_len=cache.shape("txt")[0],
        dtype=cfg.dtype,
        grad_checkpointing=cfg.grad_checkpointing,
        fsdp_world=d.world_size if cfg.fsdp else 1,
        lora_rank=getattr(cfg, "rank", 0),
        guide=guide,
        aug_k=aug_k,
    )


def ae_estimate(
    preset: str, size_px: int, micro_batch: int, dtype: torch.dtype, tile_px: int | None
) -> dict:
    """Peak memory and FLOPs of one AE encode and one decode at size_px (no grad), traced on fake
    tensors; tile_px None is one pass, else the overlapping tiles the AEs use by default
    (models/autoencoder.py)."""
    params = DCAE_PRESETS.get(preset) or VAE_PRESETS[preset]
    mode = FakeTensorMode()
    with torch.device("meta"):
        ae = (
            (DCAE if isinstance(params, DCAEParams) else VAE)(params, tile_px=tile_px)
            .to(dtype)
            .eval()
        )
    ae = to_fake(ae, mode)
    out = {"weights": nbytes(ae.parameters())}
    f = ae.spatial_factor
    with mode, torch.no_grad():
        for what, shape in (
            ("encode", (micro_batch, 3, size_px, size_px)),
            ("decode", (micro_batch, ae.latent_channels, size_px // f, size_px // f)),
        ):
            tracker = Tracker()
            with tracker:
                x = torch.randn(shape, dtype=dtype)
                (ae.encode if what == "encode" else ae.decode)(x)
                del x
            out[f"{what}_activations"] = max(tracker.peaks(lambda row, phase: 1.0).values())
            out[f"{what}_flops"] = tracker.flops
    return out


# ----------------------------------------------------------------------------------------------------------------
# main: runs/pipeline.sh, stage by stage


# runs/pipeline.sh: (row, stage, 1K or 4K model, image px, global batch, steps, aug_k). Merges,
# quantize and sampling run as one process; quantize calibrates with 64 prompts x 20 sampler steps
# at batch 2.
PIPELINE = [
    ("embed", "embed", "1k", 512, 64, 20_000, 1),
    ("head", "head", "1k", 512, 512, 5000, 1),
    ("lora-512", "lora", "1k", 512, 512, 10_000, 1),
    ("merge-512", "merge", "1k", 512, 1, 1, 1),
    ("lora-1024", "lora", "1k", 1024, 256, 10_000, 1),
    ("embed4k", "embed", "4k", 1024, 64, 20_000, 1),
    ("head4k", "head", "4k", 1024, 64, 5000, 1),
    ("lora4k-1024", "lora", "4k", 1024, 64, 10_000, 2),
    ("lora4k-4096", "lora", "4k", 4096, 64, 5000, 1),
    ("merge-4k", "merge", "4k", 4096, 1, 1, 1),
    ("quantize", "quantize", "4k", 4096, 2, 640, 1),
    ("sample-1k", "sample", "1k", 1024, 1, 20, 1),
    ("sample-2k", "sample", "4k", 2048, 1, 20, 1),
    ("sample-4k", "sample", "4k", 4096, 1, 20, 1),
]
# align.py --stage cache: (row, AEs, image px, batch per rank); one pass, T5-XXL and CLIP-L on the
# GPU too. The released FLUX VAE is bf16, the DC-AEs fp32 (the cache keeps the stored dtype).
CACHES = [
    ("cache-512", ("flux-vae", "dc-ae-f32c32-in-1.0"), 512, 32),
    ("cache-1024", ("dc-ae-f32c32-in-1.0",), 1024, 16),
    ("cache4k-1024", ("flux-vae", "dc-ae-1.5-f64c128"), 1024, 16),
    ("cache4k-4096", ("dc-ae-1.5-f64c128",), 4096, 1),
]
TEXT_BYTES = 2 * (T5_XXL + CLIP_L)  # bf16 text encoders


# align.py --stage cache --prompts: (row, teacher preset, image px, sampler steps, batch). The teacher
# (FLUX.1-Krea-dev: flux-dev shapes, 12B) samples each image with embedded guidance (one pass per
# step) from T5 states of 512 tokens; the FLUX VAE decodes it once and the student DC-AE encodes it.
GENERATE = [("generate-1k", "flux-dev", 1024, 28, 4)]


def generate_row(cfg: Config, name, preset, px, steps, b, rate) -> dict:
    """GPU-hours per million teacher images: steps transformer forwards, one VAE decode, one DC-AE
    encode and the text encoders, per image; memory of the largest of them beside all weights."""
    params, kw = PRESETS[preset], dict(dtype=cfg.dtype, txt_len=cfg.sample_txt_len)
    est = predict("sample", params, micro_batch=b, latent_hw=(px // 8, px // 8), **kw)  # f8 VAE
    dec = ae_estimate("flux-vae", px, b, torch.bfloat16, None)
    enc = ae_estimate("dc-ae-f32c32-in-1.0", px, b, torch.float32, None)
    text = 2 * b * (T5_XXL * cfg.sample_txt_len + CLIP_L * 77)
    flops = steps * est["flops"] + dec["decode_flops"] + enc["encode_flops"] + text
    weights = est["weights"] + TEXT_BYTES + dec["weights"] + enc["weights"]
    act = max(est["activations"], dec["decode_activations"], enc["encode_activations"])
    hours = 1e6 / b * flops / rate / 3600
    return dict(
        name=name,
        stage="cache",
        micro_batch=b,
        weights=weights,
        activations=act,
        peak=weights + act,
        flops=flops,
        seconds=est["flops"] / rate,  # one sampler step of the batch
        steps=steps,
        gpu_hours=hours,
    )


def cache_row(name, aes, px, b, rate) -> dict:
    est = [
        ae_estimate(ae, px, b, torch.bfloat16 if ae == "flux-vae" else torch.float32, None)
        for ae in aes
    ]
    weights = TEXT_BYTES + sum(e["weights"] for e in est)
    act = max(e["encode_activations"] for e in est)
    flops = sum(e["encode_flops"] for e in est)
    hours = 1e6 / b * flops / rate / 3600  # per million images
    return dict(
        name=name,
        stage="cache",
        micro_batch=b,
        weights=weights,
        activations=act,
        peak=weights + act,
        flops=flops,
        gpu_hours=hours,
    )


def stage_row(cfg: Config, name, stage, size, px, batch, steps, aug_k, rate, budget) -> dict:
    params = PRESETS[cfg.preset or f"dcgen-flux-{size}"]
    depth = params.depth if cfg.depth < 0 else cfg.depth
    params = dataclasses.replace(
        params,
        depth=depth,
        depth_single=params.depth_single if cfg.depth_single < 0 else cfg.depth_single,
    )
    f = 32 if params.in_channels <= 32 else 64  # DC-AE f32c32 (1K) or DC-AE 1.5 f64c128 (4K)
    train = stage in ("embed", "head", "lora")
    world = cfg.gpus if train else 1
    b = max(1, batch // world)
    sampling = stage in ("sample", "quantize")
    kw = dict(
        latent_hw=(px // f, px // f),
        txt_len=cfg.sample_txt_len if sampling else cfg.txt_len,
        dtype=cfg.dtype,
        grad_checkpointing=cfg.grad_checkpointing,
        aug_k=aug_k,
        fsdp_world=world if cfg.fsdp else 1,
        ddp=world > 1 and (not cfg.fsdp or stage == "embed"),
    )
    est = predict(stage, params, micro_batch=b, **kw)
    # sampling: the whole pipeline on the GPU, text encoders and the AE (sample.py decodes in 1024
    # px
    extra = 0.0
    if sampling:  # tiles; quantize's calibration only denoises)
        ae = ae_estimate(
            "dc-ae-f32c32-in-1.0" if f == 32 else "dc-ae-1.5-f64c128", px, b, torch.bfloat16, 1024
        )
        extra = TEXT_BYTES + ae["weights"]
        est["weights"] += extra
        decode = ae["decode_activations"] if stage == "sample" else 0.0
        est["peak"] = est["weights"] + max(est["activations"], decode)
    best = (
        None
        if est.get("host")
        else largest_micro_batch(stage, params, budget - extra, b, False, **kw)
    )
    seconds = est["flops"] / rate
    return dict(
        name=name,
        stage=stage,
        micro_batch=b,
        **{k: est[k] for k in ("weights", "grads", "optimizer", "activations", "peak", "flops")},
        host=est.get("host", False),
        best=best,
        seconds=seconds,
        steps=steps,
        gpu_hours=steps * seconds * world / 3600 if train else None,
    )


def format_table(rows: list[dict], budget: float, markdown: bool) -> str:
    """The planner's table, one row per stage: plain text, or markdown for the README."""
    head = [
        "stage",
        "micro-batch",
        "weights GB",
        "grads GB",
        "optim GB",
        "activ. GB",
        "peak GB",
        "fits",
        "max micro-batch",
        "TFLOP/step",
        "s/step",
        "steps",
        "GPU-h",
    ]
    table = []
    for r in rows:
        fits = "host" if r.get("host") else "yes" if r["peak"] <= budget else "NO"
        gb = [
            f"{r.get(k, 0.0) / 1e9:.1f}"
            for k in ("weights", "grads", "optimizer", "activations", "peak")
        ]
        hours = (
            "-"
            if r["gpu_hours"] is None
            else f"{r['gpu_hours']:.0f}" + (" /1M img" if r["stage"] == "cache" else "")
        )
        seconds = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        table.append(
            [
                r["name"],
                str(r["micro_batch"]),
                *gb,
                fits,
                str(r.get("best") or "-"),
                f"{r['flops'] / 1e12:.1f}",
                seconds,
                str(r.get("steps") or "-"),
                hours,
            ]
        )
    if markdown:
        return "\n".join(
            "| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *table]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in [head, *table]
    )


def advice(r: dict, cfg, budget: float) -> str:
    """For a stage that does not fit: the flag to change, cheapest first (as check_fits says it)."""
    if r["stage"] == "cache":
        return "--tile_px 1024 (bounded AE memory) or a smaller --batch_size"
    if not cfg.grad_checkpointing:
        return "--grad_checkpointing"
    if not cfg.fsdp and cfg.gpus > 1:
        return "--fsdp"
    if r.get("best"):
        return f"--batch_size {r['best'] * cfg.gpus} (micro-batch {r['best']})"
    return "more GPUs with --fsdp, or --dtype bf16"


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(Config, argv)
    if cfg.gpu not in GPUS:
        raise ValueError(f"--gpu {cfg.gpu!r}: choose from {sorted(GPUS)}")
    flops_peak, memory = GPUS[cfg.gpu]
    # 5% for the CUDA context and allocator slack
    rate, budget = cfg.mfu * flops_peak, 0.95 * memory
    rows = [cache_row(*c, rate) for c in CACHES if not cfg.stages or c[0] in cfg.stages]
    rows += [generate_row(cfg, *g, rate) for g in GENERATE if not cfg.stages or g[0] in cfg.stages]
    rows += [
        stage_row(cfg, *p, rate, budget) for p in PIPELINE if not cfg.stages or p[0] in cfg.stages
    ]
    print(format_table(rows, budget, cfg.markdown))
    misfits = [r for r in rows if not r.get("host") and r["peak"] > budget]
    notes = [
        f"{r['name']} does not fit ({r['peak'] / 1e9:.0f} GB): {advice(r, cfg, budget)}"
        for r in misfits
    ]
    train_hours = sum(r["gpu_hours"] for r in rows if r["stage"] in ("embed", "head", "lora"))
    summary = (
        f"{cfg.gpus} x {cfg.gpu} ({memory / 1e9:.0f} GB, {flops_peak / 1e12:.0f} TFLOP/s dense bf16 at "
        f"{cfg.mfu:.0%}), {cfg.dtype}, grad checkpointing {cfg.grad_checkpointing}, FSDP {cfg.fsdp}: training "
        f"(embed + head + LoRA) {train_hours / 24:.1f} GPU-days; the paper: {PAPER_GPU_DAYS[0]} H100 GPU-days "
        f"({PAPER_GPU_DAYS[1]} in the official README)"
    )
    print("\n".join(["", *notes, summary]))
    if cfg.out:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        with open(cfg.out, "w") as f:
            json.dump(
                {"config": dataclasses.asdict(cfg), "rows": rows, "summary": summary}, f, indent=2
            )
    return rows


if __name__ == "__main__":
    main()
