"""SANA's linear diffusion transformer (Xie et al., arXiv 2410.10629; SANA-1.5, arXiv 2501.18427), written from its
structure, with diffusers' `SanaTransformer2DModel` module names.

DC-Gen (arXiv 2509.25180) moves SANA-1.6B from the DC-AE f32c32 latent to DC-AE 1.5 f64c128 (DC-Gen-SANA): as for
FLUX, only the two layers that touch the latent change, the patch embedder `patch_embed` and the head `proj_out`.
So one class serves SANA (32 channels, patch 1) and DC-Gen-SANA (128 channels, patch 1). The network, top to bottom:

    timestep = 1000·t;  emb = MLP(sinusoid(timestep)) [+ MLP(sinusoid(w))];  mod = Linear(SiLU(emb))   adaLN-single
    img = patch_embed(x)                    conv k = stride = p: (B, C, H, W) -> (B, h·w, D), no position embedding
    txt = RMSNorm(MLP(Gemma-2 states))      caption projection, then a norm that tames Gemma's large activations
    20 blocks:  img += gate1 · LinearAttn(modulate(LN(img)))         ReLU linear attention, O(N) in tokens
                img += CrossAttn(img, txt, txt_mask)                 softmax attention to the text, no pre-norm
                img += gate2 · MixFFN(modulate(LN(img)))             GLU + 3×3 depthwise conv: the only positional cue
    v = unpatchify(proj_out(modulate(LN(img), emb)))                 velocity, same shape as x

SANA has no positional embedding at all ("NoPE", SANA §2.2): the 3×3 depthwise convolution of the Mix-FFN tells
tokens where they are. Nothing is tied to a grid size, so DC-Gen can shrink the token grid 4x (f32 -> f64) without
touching any position code. SANA-1.5 adds RMSNorm on queries and keys (`qk_norm`) over all heads.

Interface (the same shape as models/flux.py): `Sana(params)(x, t, txt, txt_mask)` with t the noise level sigma in
[0, 1]; the model scales it to diffusers' timestep (1000·sigma·timestep_scale), patchifies and unpatchifies itself.
State-dict keys equal diffusers', so a diffusers folder loads with strict=True (`Sana.from_pretrained`).
For DC-AE 1.5 augmented training (DC-Gen dc_gen/c2icore/trainer.py) the two latent-facing layers are plain:
`patch_embed.proj` is a Conv2d whose input channels are the latent channels, and the rows of `proj_out` are ordered
(p_row, p_col, c), so with p = 1 a channel prefix c' is simply `weight[:, :c']` of the embedder and rows `[:c']` of
the head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.loading import load_weights, read_config, read_state_dict


@dataclass
class SanaParams:
    in_channels: int = 32  # latent channels C of the autoencoder (out channels are the same)
    patch_size: int = 1  # p: a token is a p×p patch of the latent
    hidden_size: int = 2240  # D, model width
    num_heads: int = 70  # linear self-attention heads (head dim D / heads = 32)
    depth: int = 20  # transformer blocks
    cross_heads: int = 20  # cross-attention heads
    cross_head_dim: int = 112  # cross-attention head dim (cross_heads · cross_head_dim need not
    # equal D)
    caption_channels: int = 2304  # text-encoder width (Gemma-2-2B)
    mlp_ratio: float = 2.5  # Mix-FFN hidden width / D
    qk_norm: bool = True  # RMSNorm over all heads of q and k in both attentions (SANA-1.5; SANA-1.0
    # has none)
    qkv_bias: bool = False  # biases on the self-attention q, k, v projections (diffusers'
    # `attention_bias`)
    guidance_embed: bool = False  # embedded guidance scale w (SANA-Sprint layout), for
    # guidance-distilled SANA
    guidance_scale: float = 0.1  # w is embedded as sinusoid(guidance_scale · w) (diffusers'
    # guidance_embeds_scale)
    timestep_scale: float = 1.0  # the model sees timestep = 1000 · sigma · timestep_scale


PRESETS = {
    # SANA-1.5 1.6B 1024px (Sana_1600M_1024px_allqknorm): 1.605 B parameters, DC-AE f32c32 latent,
    # patch 1.
    "sana-1.6b-1024": SanaParams(),
    # SANA-1.0 1.6B 1024px: the same network without qk-norm.
    "sana-1.0-1.6b-1024": SanaParams(qk_norm=False),
    # DC-Gen-SANA: the same backbone on the DC-AE 1.5 f64c128 latent (4x fewer tokens than f32 at
    # any resolution).
    "dcgen-sana-1.6b-f64c128": SanaParams(in_channels=128),
    # For tests: every structural feature (qk-norm, cross-attention, Mix-FFN), 52 K parameters.
    "tiny": SanaParams(
        in_channels=4,
        hidden_size=32,
        num_heads=2,
        depth=2,
        cross_heads=2,
        cross_head_dim=12,
        caption_channels=24,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# embeddings


def timestep_embedding(timestep: Tensor, dim: int = 256, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding (cos half first) of a timestep on the 0..1000 scale, in float32. (B,) ->
    (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timestep.device)
        / half
    )
    args = timestep.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> act -> linear_2: SiLU for timesteps (diffusers' TimestepEmbedding), tanh-GELU for
    the caption projection (PixArt-α's, diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int, act: Callable[[Tensor], Tensor] = F.silu):
        super().__init__()
        self.act = act
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x.to(self.linear_1.weight.dtype))))


class TimestepEmbedder(nn.Module):
    """MLP(sinusoid(timestep)); a module of its own only so that the keys read
    `time_embed.emb.timestep_embedder`."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)

    def forward(self, timestep: Tensor) -> Tensor:
        return self.timestep_embedder(timestep_embedding(timestep))  # (B, D)


class AdaLNSingle(nn.Module):
    """adaLN-single (PixArt-α §2.3): ONE linear regresses the 6 modulation vectors from t for the
    whole network; each block only adds its own learned (6, D) table. DiT's per-block adaLN would
    cost 20·6·D² = 0.6 B more parameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = TimestepEmbedder(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: Tensor, guidance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        assert guidance is None, (
            "this SANA has no guidance embedding: use classifier-free guidance instead"
        )
        emb = self.emb(timestep)  # (B, D)
        return self.linear(F.silu(emb)), emb  # (B, 6D) block modulation, (B, D) for the final layer


class AdaLNSingleGuidance(nn.Module):
    """adaLN-single with an embedded guidance scale added to the timestep embedding, as FLUX.1-dev
    does (diffusers' SanaCombinedTimestepGuidanceEmbeddings, used by SANA-Sprint): one pass instead
    of CFG's two."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: Tensor, guidance: Tensor | None = None) -> tuple[Tensor, Tensor]:
        assert guidance is not None, (
            "this SANA is guidance-distilled: pass guidance (e.g. 4.5) for every sample"
        )
        emb = self.timestep_embedder(timestep_embedding(timestep)) + self.guidance_embedder(
            timestep_embedding(guidance)
        )  # (B, D)
        return self.linear(F.silu(emb)), emb


# ----------------------------------------------------------------------------------------------------------------
# attention


class RMSNorm(nn.Module):
    """x / rms(x) · weight over the last dim, statistics in float32 (diffusers' RMSNorm with a
    weight)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        ) * self.weight


class LinearAttention(nn.Module):
    """ReLU linear attention (SANA §2.2, after Katharopoulos et al. 2020), the self-attention of
    every block.

    Softmax attention costs O(N²·d) in the number of tokens N. With the kernel φ = ReLU instead of exp,
        out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j) = φ(q_i) (Σ_j φ(k_j)ᵀ v_j) / (φ(q_i) · Σ_j φ(k_j)),
    and the two sums over j are computed once for all i: O(N·d²). This is what makes 4K images affordable.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k = (
            nn.Linear(dim, dim, bias=qkv_bias),
            nn.Linear(dim, dim, bias=qkv_bias),
        )
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        # SANA-1.5: RMSNorm across all heads (one norm over D, not per head) keeps q·k bounded in
        # large models
        self.norm_q = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers keeps a Dropout at to_out.1

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)  # each (B, N, D)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        # The kernel and both sums in float32: the normaliser sums N positive terms (N = 16K tokens
        # at 4K for f32). Channel-major layout as in SANA's code: q, v (B, H, d, N) and k (B, H, N,
        # d).
        # (B, H, d, N)
        q, v = (y.float().transpose(1, 2).unflatten(1, (self.num_heads, -1)) for y in (q, v))
        # (B, H, N, d)
        k = k.float().transpose(1, 2).unflatten(1, (self.num_heads, -1)).transpose(2, 3)
        q, k = F.relu(q), F.relu(k)
        # SANA's trick: a row of ones appended to v makes one matmul give both sums, Σ_j v_j φ(k_j)ᵀ
        # and Σ_j φ(k_j)ᵀ.
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B, H, d + 1, N)
        # (B, H, d + 1, d) @ (B, H, d, N) -> (B, H, d + 1, N): numerators, then the denominator
        out = (v @ k) @ q
        # (B, H, d, N); 1e-15 (SANA's) guards all-zero kernels
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out.flatten(1, 2).transpose(1, 2)  # (B, N, D)
        return self.to_out[0](out.to(x.dtype))


class CrossAttention(nn.Module):
    """Softmax attention from image tokens (queries) to text tokens (keys, values), padding masked
    out."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: bool):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = (
            nn.Linear(dim, inner),
            nn.Linear(dim, inner),
            nn.Linear(dim, inner),
        )
        self.norm_q = RMSNorm(inner, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(inner, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, img: Tensor, txt: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self.to_q(img), self.to_k(txt), self.to_v(txt)  # (B, N, inner), (B, L, inner) ×2
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        # (B, H, *, d)
        q, k, v = (y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for y in (q, k, v))
        # mask (B, 1, 1, L) bool, True = attend. NOTE(deviation): diffusers adds a -10000 bias to
        # padded keys; a boolean mask is exactly zero weight. Identical in float32 unless a row has
        # no valid token (SDPA then returns zeros, diffusers the mean over the padding);
        # SanaTextEncoder always keeps BOS, so none has.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, d)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, N, D)


# ----------------------------------------------------------------------------------------------------------------
# blocks


class GLUMBConv(nn.Module):
    """Mix-FFN (SANA §2.2): 1×1 conv to 2·hidden, SiLU, 3×3 depthwise conv, GLU gate, 1×1 conv back
        to D.

    The depthwise conv mixes each token with its 8 neighbours: local detail that linear attention is
        weak at, and the model's only source of position information (no positional embedding anywhere)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_depth(F.silu(self.conv_inverted(x)))  # (B, 2·hidden, h, w)
        x, gate = x.chunk(2, dim=1)  # each (B, hidden, h, w)
        return self.conv_point(x * F.silu(gate))  # (B, D, h, w)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class SanaBlock(nn.Module):
    """Linear self-attention, cross-attention to the text, Mix-FFN; the first and last modulated by
    adaLN-single."""

    def __init__(self, p: SanaParams):
        super().__init__()
        D = p.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn1 = LinearAttention(D, p.num_heads, p.qk_norm, p.qkv_bias)
        # the Mix-FFN's norm (diffusers' name)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn2 = CrossAttention(D, p.cross_heads, p.cross_head_dim, p.qk_norm)
        self.ff = GLUMBConv(D, p.mlp_ratio)
        # this block's offset to the shared modulation: rows shift1, scale1, gate1, shift2, scale2,
        # gate2
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)

    def forward(
        self, img: Tensor, txt: Tensor, mask: Tensor | None, mod: Tensor, hw: tuple[int, int]
    ) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            self.scale_shift_table[None] + mod.unflatten(1, (6, -1))
        ).chunk(6, dim=1)  # each (B, 1, D)
        img = img + gate1 * self.attn1(modulate(self.norm1(img), shift1, scale1))
        img = img + self.attn2(img, txt, mask)  # no norm, no gate: as in PixArt-α
        h = modulate(self.norm2(img), shift2, scale2)  # (B, h·w, D)
        # (B, D, h, w): tokens back on their grid for the convs
        h = h.unflatten(1, hw).permute(0, 3, 1, 2)
        # views, no copies: (B, D, h·w) -> (B, h·w, D)
        return img + gate2 * self.ff(h).flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = p: every p×p patch of the latent becomes one D-dim token (module
    `proj`)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        # DC-Gen stage 1 re-learns this
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, h·w, D)


# ----------------------------------------------------------------------------------------------------------------
# the model


class Sana(nn.Module):
    # The two layers that touch the latent, which DC-Gen re-learns (stage 1: the embedder, stage 2:
    # the head).
    latent_layers = ("patch_embed", "proj_out")
    # LoRA targets: every linear of both attentions. NOTE(deviation): the official DC-Gen-SANA
    # targets are not published, and the Mix-FFN's 1×1 convolutions are Conv2d, which our LoRALinear
    # does not wrap.
    lora_targets = (r"transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)",)

    def __init__(self, params: SanaParams):
        super().__init__()
        p = self.params = params
        D = p.hidden_size
        assert D % p.num_heads == 0, f"hidden_size {D} not divisible by {p.num_heads} heads"
        self.patch_embed = PatchEmbed(p.in_channels, D, p.patch_size)
        self.time_embed = AdaLNSingleGuidance(D) if p.guidance_embed else AdaLNSingle(D)
        self.caption_projection = MLPEmbedder(
            p.caption_channels, D, partial(F.gelu, approximate="tanh")
        )
        # SANA §2.3: normalise Gemma's states, whose scale is large
        self.caption_norm = RMSNorm(D, eps=1e-5)
        self.transformer_blocks = nn.ModuleList(SanaBlock(p) for _ in range(p.depth))
        # final layer: rows shift, scale
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        # DC-Gen stage 2 re-learns this head
        self.proj_out = nn.Linear(D, p.patch_size**2 * p.in_channels)
        # recompute each block in backward: activation memory O(1) in depth
        self.grad_checkpointing = False
        # accept channel prefixes x[:, :C'] (DC-AE 1.5 augmented training)
        self.adaptive_channels = False

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        txt: Tensor,
        txt_mask: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Velocity v(x_t, t): x (B, C, H, W) noisy latent, t (B,) noise level sigma in [0, 1], txt
        (B, L, 2304) Gemma-2 states, txt_mask (B, L) 1 for real tokens and 0 for padding (None: all
        real), guidance (B,) embedded guidance scale w (guidance-distilled models only). Returns (B,
        C, H, W)."""
        p, (H, W) = self.params, x.shape[-2:]
        assert H % p.patch_size == 0 and W % p.patch_size == 0, (
            f"latent {H}x{W} not divisible by patch {p.patch_size}"
        )
        h, w, C = H // p.patch_size, W // p.patch_size, x.shape[1]
        dtype = self.proj_out.weight.dtype
        # DC-AE 1.5 augmented training (DC-Gen dc_gen/c2icore/trainer.py) also feeds channel
        # prefixes x[:, :C'] of the latent: they use the first C' input channels of the embedder and
        # (patch 1) the first C' rows of the head.
        prefix = C < p.in_channels
        if C > p.in_channels or (prefix and not (self.adaptive_channels and p.patch_size == 1)):
            raise ValueError(
                f"latent has {C} channels, the model {p.in_channels} (a channel prefix needs patch 1 "
                "and model.adaptive_channels = True, as lora.py --prefixes sets)"
            )
        if prefix:
            conv = self.patch_embed.proj
            img = (
                F.conv2d(x.to(dtype), conv.weight[:, :C], conv.bias, stride=p.patch_size)
                .flatten(2)
                .transpose(1, 2)
            )
        else:
            img = self.patch_embed(x.to(dtype))  # (B, h·w, D)
        # diffusers' SanaPipeline feeds the scheduler's timestep (1000·sigma) times timestep_scale
        timestep = t * 1000 * p.timestep_scale  # (B,)
        g = guidance * p.guidance_scale if guidance is not None else None
        mod, emb = self.time_embed(timestep, g)  # (B, 6D), (B, D)
        txt = self.caption_norm(self.caption_projection(txt))  # (B, L, D)
        # (B, 1, 1, L) for SDPA
        mask = txt_mask.bool()[:, None, None, :] if txt_mask is not None else None

        for block in self.transformer_blocks:
            img = self.run_block(block, img, txt, mask, mod, (h, w))
        # each (B, 1, D)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        img = modulate(self.norm_out(img), shift, scale)  # (B, h·w, D)
        img = (
            F.linear(img, self.proj_out.weight[:C], self.proj_out.bias[:C])
            if prefix
            else self.proj_out(img)
        )
        return rearrange(
            img, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=p.patch_size, p2=p.patch_size
        )

    def run_block(self, block: nn.Module, *args):
        """Call a block; with grad checkpointing its activations are recomputed in backward instead
        of stored."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ------------------------------------------------------------------------------------------------------------
    # diffusers-format folders

    def diffusers_config(self) -> dict:
        """config.json of the equivalent diffusers SanaTransformer2DModel."""
        p = self.params
        return {
            "_class_name": "SanaTransformer2DModel",
            "in_channels": p.in_channels,
            "out_channels": p.in_channels,
            "patch_size": p.patch_size,
            "num_attention_heads": p.num_heads,
            "attention_head_dim": p.hidden_size // p.num_heads,
            "num_layers": p.depth,
            "num_cross_attention_heads": p.cross_heads,
            "cross_attention_head_dim": p.cross_head_dim,
            "cross_attention_dim": p.hidden_size,
            "caption_channels": p.caption_channels,
            "mlp_ratio": p.mlp_ratio,
            "attention_bias": p.qkv_bias,
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "interpolation_scale": None,
            "guidance_embeds": p.guidance_embed,
            "guidance_embeds_scale": p.guidance_scale,
            "qk_norm": "rms_norm_across_heads" if p.qk_norm else None,
            "timestep_scale": p.timestep_scale,
        }

    @staticmethod
    def params_from_diffusers(cfg: dict) -> SanaParams:
        """SanaParams of a diffusers config.json; refuses the variants this file does not implement."""
        heads, head_dim = cfg.get("num_attention_heads", 70), cfg.get("attention_head_dim", 32)
        C, out = cfg.get("in_channels", 32), cfg.get("out_channels") or cfg.get("in_channels", 32)
        unsupported = {
            "out_channels != in_channels": out != C,
            # NOTE(deviation): SANA's sincos position embedding (set by interpolation_scale) is not
            # implemented; every released SANA T2I model and DC-Gen-SANA are NoPE.
            "interpolation_scale (sincos position embedding)": cfg.get("interpolation_scale")
            is not None,
            "norm_elementwise_affine": bool(cfg.get("norm_elementwise_affine", False)),
            "norm_eps != 1e-6": cfg.get("norm_eps", 1e-6) != 1e-6,
            "cross_attention_dim != heads·head_dim": cfg.get("cross_attention_dim", 2240)
            != heads * head_dim,
            f"qk_norm {cfg.get('qk_norm')!r}": cfg.get("qk_norm")
            not in (None, "rms_norm_across_heads"),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(
                f"unsupported SANA config ({', '.join(bad)}); this implementation covers SANA-1.0/1.5"
            )
        return SanaParams(
            in_channels=C,
            patch_size=cfg.get("patch_size", 1),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=cfg.get("num_layers", 20),
            cross_heads=cfg.get("num_cross_attention_heads", 20),
            cross_head_dim=cfg.get("cross_attention_head_dim", 112),
            caption_channels=cfg.get("caption_channels", 2304),
            mlp_ratio=cfg.get("mlp_ratio", 2.5),
            qk_norm=cfg.get("qk_norm") is not None,
            qkv_bias=cfg.get("attention_bias", False),
            guidance_embed=cfg.get("guidance_embeds", False),
            guidance_scale=cfg.get("guidance_embeds_scale", 0.1),
            timestep_scale=cfg.get("timestep_scale", 1.0),
        )

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype | None = None, device="cpu"
    ) -> Sana:
        """Load a diffusers-format transformer folder (config.json + one or sharded safetensors),
        strictly: the model is built on the meta device (no memory) and the stored tensors are
        assigned in place, in their stored dtype unless `dtype` is given. Missing config keys take
        diffusers' defaults."""
        params = cls.params_from_diffusers(read_config(folder, "SANA transformer"))
        with torch.device("meta"):
            model = cls(params)
        sd = read_state_dict(folder, dtype=dtype, device=device)
        return load_weights(model, sd, f"SANA transformer {folder}").eval()


# ----------------------------------------------------------------------------------------------------------------
# cost: one forward's FLOPs from the module shapes (2 FLOPs per multiply-add; bench.py, plan.py)


def sana_flops(p, img_tokens: int, txt_tokens: int) -> dict[str, float]:
    """One SANA forward: linear self-attention costs O(N·D·d) (kernel sums), cross-attention
    O(N·L_txt·D), and the Mix-FFN's 1×1 convs are linear layers (its 3×3 depthwise conv: 9 MACs per
    channel per token)."""
    D, N, d = p.hidden_size, img_tokens, p.hidden_size // p.num_heads
    hidden = int(D * p.mlp_ratio)
    cross = p.cross_heads * p.cross_head_dim
    # self qkvo, cross q/o, FFN
    per_token = 4 * D * D + 2 * D * cross + 2 * D * hidden + 2 * hidden * 9 + hidden * D
    linear = p.depth * (N * per_token + txt_tokens * 2 * D * cross)  # + cross k, v on the text
    linear += N * 2 * p.in_channels * p.patch_size**2 * D + txt_tokens * p.caption_channels * D
    # (v kᵀ) q, and softmax cross-attention
    attention = p.depth * (N * 2 * D * (d + 1) + N * txt_tokens * 2 * cross)
    return {"linear": 2.0 * linear, "attention": 2.0 * attention}
