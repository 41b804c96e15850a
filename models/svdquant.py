"""SVDQuant W4A4 (Li et al., ICLR 2025, arXiv 2411.05007) numerics and modules in plain PyTorch, emulated.

DC-Gen's last step runs DC-Gen-FLUX with NVFP4 SVDQuant in Nunchaku. SVDQuant writes a linear layer as

    y = x·Wᵀ + b = (x/λ)·(Ŵ)ᵀ + b,  Ŵ = W·diag(λ)                          smoothing migrates activation outliers into W
      ≈ Q((x + s)/λ)·Q(R)ᵀ  +  x·(L_down/λ)ᵀ·L_upᵀ  +  b',  R = Ŵ - L_up·L_down    4-bit GEMM + 16-bit rank-r branch

where Q is 4-bit quantisation of both operands (NVFP4 or INT4), s a shift that makes post-GELU inputs non-negative
(INT4 only) and b' the bias with the shift compensated. This file is the numerics, bit for bit where it matters:

  NVFP4  E2M1 values {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}, one FP8-E4M3 scale per 16 inputs (max 448) and, for weights,
         one per-tensor scale that puts the largest micro-scale at 448.
  INT4   symmetric [-8, 7] (unsigned [0, 15] for shifted post-GELU activations), one 16-bit scale per 64 inputs.

Weights are quantised offline as DeepCompressor does (its codes are what Nunchaku loads); activations on the fly as
Nunchaku's CUDA kernel does (`src/kernels/zgemm/gemm_w4a4.cuh`). The modules store unpacked 4-bit codes and scales, so
they run on any device (numerically the method, not a speed path) and export losslessly to Nunchaku's packed format
(models/nunchaku.py). Last, the search that produces them for one smoothing group (DeepCompressor's algorithm:
the (α, β) smoothing grid, the low-rank refinement); quantize.py calibrates and runs it group by group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.flux import Flux
from models.loading import load_weights, read_config, read_state_dict

# FP4 magnitudes; a 4-bit code is sign·8 + index here
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn (S.1111.110 = 1.75·2^8)
# INT4 runs post-GELU inputs unsigned: GELU-tanh(x) >= -0.1700, so x + 11/64 >= 0 fits [0, 15] with
# twice the resolution of [-8, 7]. Nunchaku's SHIFT_GELU
# (src/kernels/zgemm/gemm_w4a4_launch_impl.cuh); NVFP4 uses no shift.
GELU_SHIFT = 0.171875


# ----------------------------------------------------------------------------------------------------------------
# rounding to a small float format


def round_float(
    x: Tensor, mantissa_bits: int, min_exponent: int, max_value: float, ties_even: bool
) -> Tensor:
    """Round to the nearest value of a float format with `mantissa_bits` explicit mantissa bits,
    subnormals below 2^min_exponent and saturation at ±max_value. Within a binade [2^e, 2^(e+1)) the
    values are a uniform grid of step 2^(e - mantissa_bits), so rounding is x/step -> integer ->
    ·step (exact in float32).

    Ties: `ties_even` rounds half to even (= even mantissa), as the GPU's cvt.rn.satfinite does (Nunchaku's activation
    quantiser); otherwise half up, towards +inf, as DeepCompressor's codebook rounding `nearest_neighbor`
    (csrc/quantize/quantize.cu: `x + x < lo + hi ? lo : hi`) does for weights and their FP8 micro-scales.
    """
    x = x.float().clamp(-max_value, max_value)
    _, e = torch.frexp(x)  # |x| = m·2^e with m in [0.5, 1), so the binade exponent is e - 1
    step = torch.ldexp(torch.ones_like(x), (e - 1).clamp(min=min_exponent) - mantissa_bits)
    r = x / step
    return (torch.round(r) if ties_even else torch.floor(r + 0.5)) * step


def round_e2m1(x: Tensor, ties_even: bool) -> Tensor:
    return round_float(x, mantissa_bits=1, min_exponent=0, max_value=6.0, ties_even=ties_even)


def round_e4m3(x: Tensor, ties_even: bool) -> Tensor:
    return round_float(
        x, mantissa_bits=3, min_exponent=-6, max_value=FP8_E4M3_MAX, ties_even=ties_even
    )


def e2m1_encode(q: Tensor) -> Tensor:
    """E2M1 values -> 4-bit codes (int8): magnitude index, plus 8 if negative. A -0 becomes code 0,
    as DeepCompressor's `fp_quantize` argmin (backend/utils.py) picks the first of the two zeros."""
    grid = torch.tensor(E2M1_GRID, device=q.device)
    return (torch.searchsorted(grid, q.abs().contiguous()) + 8 * (q < 0)).to(torch.int8)


def e2m1_decode(codes: Tensor) -> Tensor:
    grid = torch.tensor(E2M1_GRID, device=codes.device)
    v = grid[(codes & 7).long()]
    return torch.where(codes & 8 != 0, -v, v)


# ----------------------------------------------------------------------------------------------------------------
# quantisers


def quantize_weight(w: Tensor, fp4: bool) -> tuple[Tensor, Tensor, Tensor]:
    """4-bit weight quantisation as DeepCompressor does it (quantizer/impl/scale.py;
        configs/svdquant/nvfp4|int4.yaml).

    w (out, in) -> q (out, in) values on the 4-bit grid, group scales (out, in/g), tensor scale (),
        all float32; the dequantised weight is q · group scale · tensor scale, and `encode` turns q into
        the stored 4-bit codes.

    NVFP4 (g = 16): the ideal micro-scale is s = amax/6 per group; the tensor scale t = bf16(max s /
        448) (DeepCompressor quantises this level to the model dtype, and Nunchaku stores it as bf16
        `wtscale`); micro-scales are fp8(s / t) <= 448 (saturating). INT4 (g = 64): s = bf16(amax / 7),
        q = round(w / s) in [-8, 7] (half to even, torch.round); the tensor scale is 1. A zero scale is
        replaced by 1 (QuantScale.remove_zero)."""
    out, inp = w.shape
    g = 16 if fp4 else 64
    assert inp % g == 0, f"in_features {inp} is not a multiple of the group size {g}"
    wg = w.float().reshape(out, inp // g, g)  # (out, G, g)
    amax = wg.abs().amax(-1)  # (out, G)
    one = lambda s: torch.where(s == 0, torch.ones_like(s), s)
    if fp4:
        s = amax / 6.0
        t = one((s.max() / FP8_E4M3_MAX).to(torch.bfloat16).float())
        sg = one(round_e4m3(s / t, ties_even=False))
        q = round_e2m1(wg / (sg * t)[..., None], ties_even=False)
        return q.reshape(out, inp), sg, t
    s = one((amax / 7.0).to(torch.bfloat16).float())
    q = torch.round(wg / s[..., None]).clamp(-8, 7)
    return q.reshape(out, inp), s, torch.ones((), device=w.device)


def encode(q: Tensor, fp4: bool) -> Tensor:
    """Grid values -> int8 4-bit codes (NVFP4: E2M1 code; INT4: the integer itself)."""
    return e2m1_encode(q) if fp4 else q.to(torch.int8)


def dequantize_weight(codes: Tensor, wscales: Tensor, wcscales: Tensor, fp4: bool) -> Tensor:
    """codes (out, in), group scales (out, G), per-output-channel scales (out,) -> float32 weight
    (out, in)."""
    q = e2m1_decode(codes) if fp4 else codes.float()
    g = codes.shape[1] // wscales.shape[1]
    return q * wscales.float().repeat_interleave(g, dim=1) * wcscales.float()[:, None]


def quantize_act(x: Tensor, fp4: bool, unsigned: bool = False) -> Tensor:
    """Fake-quantise activations per token and group of inputs, as Nunchaku's kernel does on the fly
        (gemm_w4a4.cuh: quantize_w4a4_fp4_from_fpsum_warp / quantize_w4a4_from_fpsum_warp). (..., in) ->
        float32 (..., in).

    NVFP4 (g = 16): s = min(amax/6, 448); codes = rne_e2m1(x / s); dequantised with fp8(s) (the
        kernel divides by the float scale and hands the MMA its rounded FP8 copy). INT4 (g = 64): s =
        amax/7 (amax/15 unsigned); codes = round(x / s) clamped to [-8, 7] ([0, 15]); dequantised with
        the scale stored in 16 bits (bf16)."""
    g = 16 if fp4 else 64
    xg = x.float().unflatten(-1, (-1, g))  # (..., G, g)
    amax = xg.abs().amax(-1, keepdim=True)
    if fp4:
        s = (amax / 6.0).clamp(max=FP8_E4M3_MAX)
        q, s_mma = round_e2m1(xg / s, ties_even=True), round_e4m3(s, ties_even=True)
    else:
        qmax = 15.0 if unsigned else 7.0
        s = amax / qmax
        q, s_mma = (
            torch.round(xg / s).clamp(0.0 if unsigned else -8.0, qmax),
            s.to(torch.bfloat16).float(),
        )
    return torch.where(s > 0, q * s_mma, torch.zeros_like(q)).flatten(-2)


# ----------------------------------------------------------------------------------------------------------------
# modules


class SVDQuantLinear(nn.Module):
    """The emulated SVDQuant W4A4 linear (Nunchaku's SVDQW4A4Linear): a 4-bit GEMM on smoothed,
    quantised inputs plus a 16-bit low-rank branch on the raw input. Buffers (unpacked;
    models/nunchaku.py packs them):

        qweight  (out, in) int8     4-bit codes of the residual R (NVFP4: sign·8 + E2M1 index; INT4: value in [-8, 7])
        wscales  (out, in/g)        group scales: float8_e4m3fn (NVFP4, g = 16) or bfloat16 (INT4, g = 64)
        wcscales (out,) bf16        per-output-channel scale: the NVFP4 tensor scale (q, k, v have one each); 1 for INT4
        smooth   (in,) bf16         λ, the smoothing divisor of the input
        proj_down (r, in), proj_up (out, r)   low-rank branch L_up·(L_down/λ), applied to the raw input x
        bias     (out,)             with the INT4 GELU shift already compensated
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        fp4: bool,
        act_shift: float = 0.0,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.fp4 = (
            in_features,
            out_features,
            rank,
            fp4,
        )
        self.group_size = 16 if fp4 else 64
        # s added to the input before smoothing: GELU_SHIFT for INT4 post-GELU inputs
        self.act_shift = act_shift
        assert in_features % self.group_size == 0, (
            f"in_features {in_features} % group size {self.group_size} != 0"
        )
        groups, kw = in_features // self.group_size, dict(device=device)
        scale_dtype = torch.float8_e4m3fn if fp4 else torch.bfloat16
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, **kw)
        )
        self.register_buffer("wscales", torch.ones(out_features, groups, **kw).to(scale_dtype))
        self.register_buffer("wcscales", torch.ones(out_features, dtype=torch.bfloat16, **kw))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.bfloat16, **kw))
        self.register_buffer("proj_down", torch.zeros(rank, in_features, dtype=dtype, **kw))
        self.register_buffer("proj_up", torch.zeros(out_features, rank, dtype=dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))

    def dequantized_weight(self) -> Tensor:
        # (out, in) float32
        return dequantize_weight(self.qweight, self.wscales, self.wcscales, self.fp4)

    def forward(self, x: Tensor) -> Tensor:
        # Shift and smoothing in the activation dtype, like the kernel's `dst += shift; h2div(dst,
        # smooth)`.
        xs = (x + self.act_shift) / self.smooth.to(x.dtype)
        # (..., in) float32, on the 4-bit grid
        xq = quantize_act(xs, self.fp4, unsigned=self.act_shift > 0)
        # NOTE(deviation): the kernel multiplies codes and applies scales per 64-wide k tile; we
        # multiply dequantised operands: the same products, float32 accumulation in another order.
        y = xq @ self.dequantized_weight().T  # 4-bit GEMM
        # 16-bit low-rank branch
        y = y + (x.float() @ self.proj_down.float().T) @ self.proj_up.float().T
        return (y + self.bias.float()).to(x.dtype)

    def extra_repr(self) -> str:
        fmt = "nvfp4" if self.fp4 else "int4"
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, {fmt}, act_shift={self.act_shift}"


class W4A16Linear(nn.Module):
    """4-bit weights (INT4, group 64, bf16 scales), 16-bit activations: Nunchaku runs the AdaLN
    linears this way (AWQW4A16Linear; DeepCompressor's `extra_wgts` sint4 g64 for transformer_norm /
    transformer_add_norm)."""

    def __init__(
        self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16, device=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "wscales",
            torch.ones(out_features, in_features // 64, dtype=torch.bfloat16, device=device),
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        w = dequantize_weight(self.qweight, self.wscales, torch.ones_like(self.bias), fp4=False)
        return F.linear(x.float(), w, self.bias.float()).to(x.dtype)


class SplitLinear(nn.Module):
    """One linear over concatenated inputs, run as one linear per input slice and summed: y = Σ_i
    linears[i](x_i). The single-stream block's proj_out is [attention out | MLP fc2]; Nunchaku
    quantises the parts separately (`attn.to_out`, `mlp_fc2`) and DeepCompressor keeps the bias in
    the last part (ConcatLinear)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.linears = nn.ModuleList(parts)

    @staticmethod
    def from_linear(linear: nn.Linear, in_splits: list[int]) -> SplitLinear:
        assert sum(in_splits) == linear.in_features, (
            f"splits {in_splits} do not cover {linear.in_features} inputs"
        )
        parts, start = [], 0
        for i, n in enumerate(in_splits):
            last = i == len(in_splits) - 1
            part = nn.Linear(
                n, linear.out_features, bias=last and linear.bias is not None, device="meta"
            )
            part.weight = nn.Parameter(
                linear.weight[:, start : start + n].clone(), requires_grad=False
            )
            if part.bias is not None:
                part.bias = nn.Parameter(linear.bias.clone(), requires_grad=False)
            parts.append(part)
            start += n
        return SplitLinear(parts)

    def forward(self, x: Tensor) -> Tensor:
        xs = x.split([m.in_features for m in self.linears], dim=-1)
        return sum(m(xi) for m, xi in zip(self.linears, xs))


# ----------------------------------------------------------------------------------------------------------------
# which FLUX linears become what (Nunchaku's NunchakuFluxTransformer2DModelV2._patch_model; DeepCompressor's
# backend/nunchaku/convert.py name maps and app/diffusion/quant/smooth.py smoothing groups)
#
# A smoothing group shares one λ; inside it, a *layer* is one Nunchaku W4A4 linear (linears fused along the output:
# one input, one activation quantisation, one low-rank branch). Everything not listed stays 16-bit: embedders,
# norm_out, proj_out (the head), the RMS/LayerNorms.

DOUBLE_GROUPS = (
    (("attn.to_q", "attn.to_k", "attn.to_v"),),  # -> attn.to_qkv
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),),  # -> attn.add_qkv_proj
    # one λ for both attention outputs (smooth_diffusion_out_proj)
    (("attn.to_out.0",), ("attn.to_add_out",)),
    (("ff.net.0.proj",),),
    (("ff.net.2",),),
    (("ff_context.net.0.proj",),),
    (("ff_context.net.2",),),
)
SINGLE_GROUPS = (
    (
        ("attn.to_q", "attn.to_k", "attn.to_v"),
        ("proj_mlp",),
    ),  # same input: one λ (smooth_diffusion_parallel_qkv_up_proj)
    (("proj_out.linears.0",),),  # -> attn.to_out
    (("proj_out.linears.1",),),  # -> mlp_fc2
)
# inputs shifted to unsigned under INT4
POST_GELU = ("ff.net.2", "ff_context.net.2", "proj_out.linears.1")
DOUBLE_W4A16 = ("norm1.linear", "norm1_context.linear")  # AdaLN-Zero linears: W4A16
SINGLE_W4A16 = ("norm.linear",)


def flux_layers(model: Flux) -> tuple[list[list[list[str]]], list[str]]:
    """Full module names: (smoothing groups of W4A4 layers, W4A16 linears)."""
    groups, w4a16 = [], []
    for blocks, group_spec, w4a16_spec in (
        ("transformer_blocks", DOUBLE_GROUPS, DOUBLE_W4A16),
        ("single_transformer_blocks", SINGLE_GROUPS, SINGLE_W4A16),
    ):
        for i in range(len(getattr(model, blocks))):
            p = f"{blocks}.{i}."
            groups += [[[p + n for n in layer] for layer in group] for group in group_spec]
            w4a16 += [p + n for n in w4a16_spec]
    return groups, w4a16


def act_shift(name: str, fp4: bool) -> float:
    return GELU_SHIFT if not fp4 and name.endswith(POST_GELU) else 0.0


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def split_proj_out(model: Flux) -> None:
    """In place, function-preserving: every single-stream proj_out -> SplitLinear([attention part,
    MLP part])."""
    for block in model.single_transformer_blocks:
        if isinstance(block.proj_out, nn.Linear):
            hidden = block.proj_mlp.out_features
            block.proj_out = SplitLinear.from_linear(
                block.proj_out, [block.proj_out.in_features - hidden, hidden]
            )


def quantized_structure(
    model: Flux, fp4: bool, rank: int, dtype: torch.dtype = torch.bfloat16
) -> Flux:
    """In place: the quantised model's module tree with empty quantised layers on the model's device
    (meta works), so a saved quantised state dict loads strictly into it."""
    split_proj_out(model)
    groups, w4a16 = flux_layers(model)
    for name in [n for group in groups for layer in group for n in layer]:
        lin = model.get_submodule(name)
        q = SVDQuantLinear(
            lin.in_features,
            lin.out_features,
            rank,
            fp4,
            act_shift(name, fp4),
            dtype,
            lin.weight.device,
        )
        set_module(model, name, q)
    for name in w4a16:
        lin = model.get_submodule(name)
        set_module(
            model, name, W4A16Linear(lin.in_features, lin.out_features, dtype, lin.weight.device)
        )
    return model


def is_quantized(folder: str | Path) -> bool:
    """True for a transformer folder written by quantize.py (its config.json carries `_svdquant`)."""
    return (Path(folder) / "config.json").is_file() and "_svdquant" in read_config(
        folder, "FLUX transformer"
    )


def load_quantized(folder: str | Path, device: str | torch.device = "cpu") -> Flux:
    """The emulated SVDQuant FLUX written by quantize.py (`out_dir/transformer`): a Flux whose block
    linears are SVDQuantLinear / W4A16Linear / SplitLinear. Called exactly like Flux: model(x, t,
    txt, y, guidance)."""
    cfg = read_config(folder, "quantized FLUX transformer")
    if "_svdquant" not in cfg:
        raise ValueError(
            f"{folder} is not a quantize.py output: its config.json has no `_svdquant` entry"
        )
    q = cfg["_svdquant"]
    with torch.device("meta"):
        model = Flux(Flux.params_from_diffusers(cfg))
    quantized_structure(model, fp4=q["precision"] == "nvfp4", rank=q["rank"])
    return load_weights(
        model, read_state_dict(folder, device=device), f"quantized FLUX {folder}"
    ).eval()


# ----------------------------------------------------------------------------------------------------------------
# the search: SVDQuant of one smoothing group (DeepCompressor's algorithm), on calibration rows from quantize.py
#
# NOTE(deviation): the objective is the squared output error of the group's own layers on the sampled rows.
# DeepCompressor scores q/k/v candidates on the attention output and the single block's q/k/v + fc1 on the block
# output (app/diffusion/quant/smooth.py eval_module); that needs the block re-run per candidate.
# NOTE(deviation): the activations are fake-quantised as Nunchaku's kernel does at inference (ties to even, float
# scale to quantise, FP8 copy to dequantise); DeepCompressor's calibration uses its own quantiser (FP8 scale first,
# codebook ties up). The model is scored as it will run.


@dataclass
# one Nunchaku W4A4 layer: our linears fused along the output (q/k/v), sharing input and low rank
class Layer:
    names: list[str]
    splits: list[int]  # output sizes of the fused linears (each has its own NVFP4 tensor scale)
    w: Tensor  # (Σout, in) float32
    b: Tensor  # (Σout,)
    x: Tensor  # (N, in) calibration rows
    y: Tensor  # (N, Σout) = x·Wᵀ, the reference output
    xmax: Tensor  # (in,) max |x + shift| over all calibration rows
    shift: float  # INT4 post-GELU shift, else 0


@dataclass
class Result:
    err: float  # Σ (y_quant - y)² over the calibration rows
    q: Tensor  # (Σout, in) R on the 4-bit grid (E2M1 values or INT4 integers)
    wscales: Tensor  # (Σout, in/g) float32
    wcscales: Tensor  # (Σout,) per-row tensor scale
    down: Tensor  # (r, in) L_down, acting on x̂ = x/λ
    up: Tensor  # (Σout, r) L_up
    iters: int


class SearchConfig(Protocol):
    """The search's settings: the fields of the same names in quantize.Config (its --help)."""

    method: str  # svdquant | rtn (λ = 1, no low-rank branch)
    rank: int  # rank r of the 16-bit low-rank branch
    num_grids: int  # α grid i/n, i = 1..n-1, of the smoothing search
    lowrank_iters: int  # at most this many refinements L <- SVD_r(Ŵ - Q(Ŵ - L))
    svd_niter: int  # power iterations of the randomised truncated SVD


def smooth_candidates(num_grids: int) -> list[tuple[float, float]]:
    """(α, β) pairs of DeepCompressor's alpha 0.5, beta -2 (calib/config/smooth.py:
    get_alpha_beta_pairs): no smoothing, activation-only (α, 0), and SmoothQuant's (α, 1 - α), α =
    i/num_grids."""
    grid = [i / num_grids for i in range(1, num_grids)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in grid] + [(a, 1 - a) for a in grid]


def smooth_scale(xmax: Tensor, wmax: Tensor, alpha: float, beta: float) -> Tensor:
    """λ = xmax^α / wmax^β (calib/smooth.py: get_smooth_scale), zeros -> 1, all ones if any inf/nan.

    NOTE(deviation): rounded to bf16 first, so the weights are smoothed with exactly the λ that
        Nunchaku's kernel divides the input by; DeepCompressor smooths with the float32 λ and stores it
        as bf16."""
    if alpha == 0 and beta == 0:
        return torch.ones_like(xmax)
    lam = xmax.pow(alpha) / (wmax.pow(beta) if beta > 0 else 1)
    lam = torch.where(lam == 0, torch.ones_like(lam), lam)
    if not lam.isfinite().all():
        lam = torch.ones_like(lam)
    return lam.to(torch.bfloat16).float()


def lowrank(w: Tensor, rank: int, niter: int) -> tuple[Tensor, Tensor]:
    """Rank-r truncation of w (out, in): L_down = V_rᵀ (r, in), L_up = U_r·S_r (out, r)
    (nn/patch/lowrank.py), both rounded to 16 bits (bf16), the branch's storage format."""
    rank = min(rank, *w.shape)
    if rank == 0:
        return w.new_zeros(0, w.shape[1]), w.new_zeros(w.shape[0], 0)
    # NOTE(deviation): DeepCompressor takes a full float64 SVD (tens of seconds per 3072 x 12288
    # matrix on CPU, x39 candidates x 570 layers); the randomised range finder (Halko et al. 2011)
    # with power iterations gives the same top singular vectors up to a tiny error at ~1% of the
    # cost.
    # same input, same branch: reproducible
    with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(w, q=min(rank + 16, *w.shape), niter=niter)
    return V[:, :rank].T.to(torch.bfloat16).float(), (U[:, :rank] * S[:rank]).to(
        torch.bfloat16
    ).float()


def quantize_split(
    w: Tensor, splits: list[int], fp4: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """quantize_weight per fused part (each its own tensor scale) -> (grid values, group scales,
    per-row tensor scale, dequantised weight), all (Σout, ...) float32."""
    parts = [quantize_weight(part, fp4) for part in w.split(splits)]
    q, s = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    c = torch.cat([t.expand(n) for (_, _, t), n in zip(parts, splits)])
    return q, s, c, q * s.repeat_interleave(w.shape[1] // s.shape[1], dim=1) * c[:, None]


def refine(
    layer: Layer, lam: Tensor, rank: int, iters: int, cfg: SearchConfig, fp4: bool
) -> Result:
    """Low-rank branch and 4-bit residual for a given λ: L <- SVD_r(Ŵ - Q(Ŵ - L)) from Q = 0,
    keeping the best output error and stopping at the first increase (calib/lowrank.py, early_stop).
    iters = 1 is the one-shot split DeepCompressor's smoothing search evaluates (allow_low_rank:
    true)."""
    ws = layer.w * lam  # Ŵ = W·diag(λ)
    xs = layer.x / lam  # x̂, input of the low-rank branch
    # Q(x̂) as the kernel makes it
    xq = quantize_act((layer.x + layer.shift) / lam, fp4, unsigned=layer.shift > 0)
    qw, best = torch.zeros_like(ws), None
    for it in range(iters):
        down, up = lowrank(ws - qw, rank, cfg.svd_niter)
        q, s, c, qw = quantize_split(ws - up @ down, layer.splits, fp4)
        y = xq @ qw.T + (xs @ down.T) @ up.T  # (N, out)
        if layer.shift:  # the shift's contribution, removed through the bias (see install)
            y = y - (layer.shift / lam) @ (ws - up @ down).T
        err = (y - layer.y).square().sum().item()
        if best is not None and err > best.err:
            break
        best = Result(err, q, s, c, down, up, it + 1)
    return best


def svdquant_group(
    layers: list[Layer], cfg: SearchConfig, fp4: bool
) -> tuple[Tensor, tuple[float, float], list[Result]]:
    """One λ for the group (max over its inputs and weights), searched over the (α, β) grid by the
    summed output error of its layers, then each layer's low-rank branch refined. method rtn: λ = 1,
    no branch."""
    if cfg.method == "rtn":
        lam = torch.ones_like(layers[0].xmax)
        return lam, (0.0, 0.0), [refine(layer, lam, 0, 1, cfg, fp4) for layer in layers]
    xmax = torch.stack([layer.xmax for layer in layers]).amax(0)
    wmax = torch.cat([layer.w for layer in layers]).abs().amax(0)
    best = None
    for alpha, beta in smooth_candidates(cfg.num_grids):
        lam = smooth_scale(xmax, wmax, alpha, beta)
        err = sum(refine(layer, lam, cfg.rank, 1, cfg, fp4).err for layer in layers)
        if best is None or err < best[0]:
            best = (err, lam, (alpha, beta))
    _, lam, ab = best
    return lam, ab, [refine(layer, lam, cfg.rank, cfg.lowrank_iters, cfg, fp4) for layer in layers]


def install(model: Flux, layer: Layer, lam: Tensor, res: Result, fp4: bool) -> None:
    """Replace the layer's linears by SVDQuantLinear modules holding the result in Nunchaku's
    conventions."""
    lam64, rank, start = lam.double(), res.down.shape[0], 0
    # lora_down / smooth: the branch reads the raw x
    down = (res.down.double() / lam64).to(torch.bfloat16)
    bias = layer.b.double()
    # ShiftedLinear's b - W·s plus the converter's + L_up·(L_down/λ)·s: b - (Ŵ - L)·(s/λ)
    if layer.shift:
        bias = bias - (layer.w.double() * lam64 - res.up.double() @ res.down.double()) @ (
            layer.shift / lam64
        )
    codes = encode(res.q, fp4)
    for name, n in zip(layer.names, layer.splits):
        rows = slice(start, start + n)
        m = SVDQuantLinear(layer.w.shape[1], n, rank, fp4, layer.shift, device=layer.w.device)
        m.load_state_dict(
            dict(
                qweight=codes[rows],
                wscales=res.wscales[rows].to(m.wscales.dtype),
                wcscales=res.wcscales[rows],
                smooth=lam,
                proj_down=down,
                proj_up=res.up[rows],
                bias=bias[rows],
            )
        )
        set_module(model, name, m)
        start += n
