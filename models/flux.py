"""FLUX.1 MMDiT (Black Forest Labs, 2024), written from its structure, with diffusers' module names.

DC-Gen (arXiv 2509.25180 §3) keeps this backbone and replaces only the two layers that touch the latent: the patch
embedder `x_embedder` and the output head `proj_out`. One class therefore serves base FLUX.1 (16-channel f8 latent,
2×2 patches -> 64-dim tokens) and DC-Gen-FLUX (32- or 128-channel f32/f64 latent, 1×1 patches -> 4x/16x fewer
tokens). The network, top to bottom:

    vec = MLP(sinusoid(1000·t)) [+ MLP(sinusoid(1000·w))] + MLP(pooled CLIP)        conditioning vector
    img = x_embedder(patchify(x)),  txt = context_embedder(T5 states)              tokens
    19 double-stream blocks: separate weights for txt and img, joint attention      AdaLN-Zero from vec
    38 single-stream blocks on [txt, img]: parallel attention + MLP                 AdaLN-Zero from vec
    v = unpatchify(proj_out(norm_out(img, vec)))                                     velocity, same shape as x

Positions are 3-axis RoPE (text index, row, column) on interleaved pairs, theta 10000; queries and keys are
RMS-normalised per head. State-dict keys equal diffusers' `FluxTransformer2DModel`, so a diffusers folder loads with
strict=True (see `Flux.from_pretrained`). One convention differs from diffusers: `FluxParams.in_channels` is the
*latent* channel count C and `patch_size` is p, while diffusers stores in_channels = C·p² and packs outside the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.loading import load_weights, read_config, read_state_dict


@dataclass
class FluxParams:
    in_channels: int = 16  # latent channels C of the autoencoder
    patch_size: int = 2  # p: a token is a p×p patch of the latent, token dim C·p²
    hidden_size: int = 3072  # D, model width
    num_heads: int = 24  # attention heads; head dim D / heads = sum(axes_dim)
    depth: int = 19  # double-stream blocks
    depth_single: int = 38  # single-stream blocks
    mlp_ratio: float = 4.0  # MLP hidden width / D
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims of the (text index, row, column) position
    # axes
    theta: int = 10_000  # RoPE base
    context_in_dim: int = 4096  # T5 hidden size
    vec_in_dim: int = 768  # CLIP pooled size
    guidance_embed: bool = True  # guidance-distilled model (FLUX.1-dev / Krea) with an embedded
    # guidance scale w


# The toy zoo's CFG base (runs/toy.sh): a FLUX in miniature on the toy f8c4 VAE latent, 2×2 patches,
# reading the toy text encoder (width 64); 2.4 M parameters. Its guidance-distilled and DC-Gen
# descendants keep the shape.
_TOY = FluxParams(
    in_channels=4,
    hidden_size=128,
    num_heads=2,
    depth=2,
    depth_single=4,
    axes_dim=(16, 24, 24),
    context_in_dim=64,
    vec_in_dim=64,
    guidance_embed=False,
)

PRESETS = {
    # FLUX.1-dev / FLUX.1-Krea-dev: 11.9 B parameters, f8c16 latent with 2×2 patches.
    "flux-dev": FluxParams(),
    # DC-Gen-FLUX: the same backbone on DC-AE f32c32 (1K) or DC-AE 1.5 f64c128 (4K) latents, 1×1
    # patches.
    "dcgen-flux-1k": FluxParams(in_channels=32, patch_size=1),
    "dcgen-flux-4k": FluxParams(in_channels=128, patch_size=1),
    "toy": _TOY,
    # The same toy trained from scratch on the toy DC-AE 1.5 f32c16 latent, 1×1 patches: 8×8 tokens
    # at 256 px, 4x fewer than "toy" (docs/toy-zoo.md: the deep-compression latent as a base's
    # own space).
    "toy-f32c16": replace(_TOY, in_channels=16, patch_size=1),
    # For tests: every structural feature (both block kinds, 3-axis RoPE, guidance), 0.33 M
    # parameters.
    "tiny": FluxParams(
        in_channels=4,
        hidden_size=64,
        num_heads=2,
        depth=1,
        depth_single=2,
        axes_dim=(8, 12, 12),
        context_in_dim=32,
        vec_in_dim=16,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# embeddings and positions


def timestep_embedding(
    t: Tensor, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding of t·1000 (cos half first), the standard DDPM/DiT frequency ladder. (B,)
    -> (B, dim)."""
    # NOTE(deviation): computed in float32 even for a bf16 model; diffusers multiplies by 1000 in
    # the model dtype.
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = time_factor * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding and PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """vec = embed(t) + embed(w) + embed(pooled text): the vector every block is modulated by."""

    def __init__(self, dim: int, vec_in_dim: int, guidance_embed: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance_embed else None
        self.text_embedder = MLPEmbedder(vec_in_dim, dim)

    def forward(self, t: Tensor, guidance: Tensor | None, y: Tensor) -> Tensor:
        dtype = self.text_embedder.linear_1.weight.dtype
        vec = self.timestep_embedder(timestep_embedding(t).to(dtype))
        if self.guidance_embedder is not None:
            assert guidance is not None, (
                "this model is guidance-distilled: pass guidance (e.g. 3.5) for every sample"
            )
            vec = vec + self.guidance_embedder(timestep_embedding(guidance).to(dtype))
        else:
            assert guidance is None, (
                "this model has no guidance embedding (a CFG model): use true CFG, not guidance"
            )
        return vec + self.text_embedder(y.to(dtype))  # (B, D)


def position_ids(txt_len: int, h: int, w: int, device=None) -> Tensor:
    """(txt_len + h·w, 3) positions: text tokens all (0, 0, 0); image token (0, row, col) on the
    token grid."""
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    # (h·w, 3)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3)
    return torch.cat([img_ids.new_zeros(txt_len, 3), img_ids])


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """3-axis RoPE: axis i (text index, row, column) owns axes_dim[i]/2 of a head's channel pairs,
    and pair k of it is rotated by the angle position_i · theta^(-2k / axes_dim[i]). Returns the
    unit complex numbers e^(i·angle), (L, head_dim / 2) complex64; the angles are computed in
    float64 like diffusers."""
    angles = []
    for i, d in enumerate(axes_dim):
        # (d/2,)
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(ids[:, i].double()[:, None] * freqs[None])  # (L, d/2)
    angles = torch.cat(angles, dim=-1)  # (L, head_dim/2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate the interleaved channel pairs (x[2k], x[2k+1]) of (B, L, H, head_dim) by `pe`'s
    angles (L, head_dim / 2).

    A pair is read as the complex number x[2k] + i·x[2k+1], so the rotation is one complex multiply.
    On CPU this is ~30x faster than splitting even/odd channels and stacking them back (a strided
    copy)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, H, head_dim/2) complex
    return torch.view_as_real(xc * pe[:, None]).flatten(-2).type_as(x)  # (B, L, H, head_dim)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """RoPE on q and k, then softmax attention. (B, L, H, d) -> (B, L, H·d).

    Heads stay in the token-major layout of the projections until SDPA, which reads the transposed
    views as they are and writes its output token-major: no strided copy of q, k, v or the output
    (diffusers' FluxAttnProcessor does the same)."""
    q, k, v = (
        apply_rope(q, pe).transpose(1, 2),
        apply_rope(k, pe).transpose(1, 2),
        v.transpose(1, 2),
    )
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, L, H·d)


# ----------------------------------------------------------------------------------------------------------------
# blocks


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class AdaLNZero(nn.Module):
    """Adaptive LayerNorm whose shift, scale and residual gate are regressed from vec (AdaLN-Zero,
        DiT §3.2).

    n = 6 for a double-stream branch (shift, scale, gate of attention, then of the MLP), 3 for a
        single-stream block."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(vec))[:, None].chunk(self.n, dim=-1)  # n × (B, 1, D)


class GELUProj(nn.Module):
    """Linear then tanh-approximate GELU (diffusers' `GELU` activation module, which owns the first
    MLP linear)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """D -> 4D -> GELU(tanh) -> D, laid out as diffusers' `net.0.proj`, `net.1` (dropout, 0),
    `net.2`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, hidden), nn.Dropout(0.0), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """q, k, v projections with per-head RMSNorm on q and k (QK-norm keeps attention logits
    bounded)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = (
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
        )
        self.norm_q = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim // num_heads, eps=1e-6)

    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # (B, L, D) -> (B, L, H, d), a view

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q = self.norm_q(self.heads(self.to_q(x)))
        k = self.norm_k(self.heads(self.to_k(x)))
        return q, k, self.heads(self.to_v(x))

    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        # (B, L, D), no output projection: the single block fuses it
        return attention(*self.qkv(x), pe)


class JointAttention(SelfAttention):
    """Attention over [txt, img]: each stream has its own projections and norms, the softmax is
    shared."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
        )
        self.norm_added_q = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.norm_added_k = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers keeps a Dropout at to_out.1
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v = self.qkv(img)  # each (B, L_img, H, d)
        tq = self.norm_added_q(self.heads(self.add_q_proj(txt)))
        tk = self.norm_added_k(self.heads(self.add_k_proj(txt)))
        tv = self.heads(self.add_v_proj(txt))
        # (B, L_txt+L_img, D)
        x = attention(torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1), pe)
        txt, img = x.split([txt.shape[1], img.shape[1]], dim=1)
        return self.to_out[0](img), self.to_add_out(txt)


class DoubleStreamBlock(nn.Module):
    """MMDiT block (SD3 §5.1): text and image tokens keep separate weights but attend jointly."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm1_context = AdaLNZero(dim, 6), AdaLNZero(dim, 6)
        self.attn = JointAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.ff_context = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        # image stream, each (B, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(vec)
        # text stream
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.norm1_context(vec)
        img_attn, txt_attn = self.attn(
            modulate(self.norm1.norm(img), shift1, scale1),
            modulate(self.norm1_context.norm(txt), c_shift1, c_scale1),
            pe,
        )
        img = img + gate1 * img_attn
        img = img + gate2 * self.ff(modulate(self.norm2(img), shift2, scale2))
        txt = txt + c_gate1 * txt_attn
        txt = txt + c_gate2 * self.ff_context(modulate(self.norm2_context(txt), c_shift2, c_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel block (ViT-22B style) on [txt, img]: attention and MLP read the same modulated
    input, and one linear `proj_out` is both attention's output projection and the MLP's second
    layer."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = AdaLNZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, hidden)
        self.attn = SelfAttention(dim, num_heads)
        self.proj_out = nn.Linear(dim + hidden, dim)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        shift, scale, gate = self.norm(vec)  # each (B, 1, D)
        h = modulate(self.norm.norm(x), shift, scale)  # (B, L, D)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")  # (B, L, 4D)
        return x + gate * self.proj_out(torch.cat([self.attn(h, pe), mlp], dim=-1))


class AdaLNOut(nn.Module):
    """Final adaptive LayerNorm (diffusers' AdaLayerNormContinuous). Its linear emits (scale,
    shift): the reverse of AdaLNZero's order, a classic porting pitfall."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(vec))[:, None].chunk(2, dim=-1)  # each (B, 1, D)
        return modulate(self.norm(x), shift, scale)


# ----------------------------------------------------------------------------------------------------------------
# the model


class Flux(nn.Module):
    # The two layers that touch the latent, which DC-Gen re-learns (stage 1: the embedder, stage 2:
    # the head).
    latent_layers = ("x_embedder", "proj_out")
    # DC-Gen's LoRA targets (the PEFT list of DC-Gen's dc_ai/t2icore/models/flux.py minus the
    # top-level proj_out): every attention and MLP linear of every block, matched as full-name
    # regexes.
    lora_targets = (
        r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
        r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
        r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)",
    )

    def __init__(self, params: FluxParams):
        super().__init__()
        p = self.params = params
        assert p.hidden_size % p.num_heads == 0, (
            f"hidden_size {p.hidden_size} not divisible by {p.num_heads} heads"
        )
        assert sum(p.axes_dim) == p.hidden_size // p.num_heads, (
            f"axes_dim {p.axes_dim} must sum to the head dim"
        )
        D, token_dim = p.hidden_size, p.in_channels * p.patch_size**2
        self.time_text_embed = TimeTextEmbed(D, p.vec_in_dim, p.guidance_embed)
        self.context_embedder = nn.Linear(p.context_in_dim, D)
        # DC-Gen stage 1 re-learns this layer for the new latent
        self.x_embedder = nn.Linear(token_dim, D)
        self.transformer_blocks = nn.ModuleList(
            DoubleStreamBlock(D, p.num_heads, p.mlp_ratio) for _ in range(p.depth)
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(D, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single)
        )
        self.norm_out = AdaLNOut(D)
        self.proj_out = nn.Linear(D, token_dim)  # DC-Gen stage 2 re-learns this head
        # recompute each block in backward: activation memory O(1) in depth
        self.grad_checkpointing = False
        # accept channel prefixes x[:, :C'] (DC-AE 1.5 augmented training)
        self.adaptive_channels = False

    def forward(
        self, x: Tensor, t: Tensor, txt: Tensor, y: Tensor, guidance: Tensor | None = None
    ) -> Tensor:
        """Velocity v(x_t, t): x (B, C, H, W) noisy latent, t (B,) noise level sigma in [0, 1], txt
        (B, L, 4096) T5 states, y (B, 768) CLIP pooled, guidance (B,) embedded guidance scale w.
        Returns (B, C, H, W)."""
        p = self.params.patch_size
        B, C, H, W = x.shape
        assert H % p == 0 and W % p == 0, f"latent {H}x{W} is not divisible by the patch size {p}"
        dtype = self.x_embedder.weight.dtype
        # (B, h·w, C·p²) like diffusers
        img = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
        # DC-AE 1.5 augmented training (DC-Gen dc_gen/c2icore/trainer.py) also feeds channel
        # prefixes x[:, :C'] of the latent: the token (c, p1, p2) layout puts them in the first
        # C'·p² columns of the embedder and rows of the head, which are used alone (the official
        # AdaptivePatchEmbed / AdaptiveFinalLayer).
        prefix = C < self.params.in_channels
        if C > self.params.in_channels or (prefix and not self.adaptive_channels):
            raise ValueError(
                f"latent has {C} channels, the model {self.params.in_channels} (a channel prefix needs "
                "model.adaptive_channels = True, as lora.py --prefixes sets)"
            )
        if prefix:
            img = F.linear(
                img.to(dtype), self.x_embedder.weight[:, : C * p * p], self.x_embedder.bias
            )
        else:
            img = self.x_embedder(img.to(dtype))  # (B, h·w, D)
        txt = self.context_embedder(txt.to(dtype))  # (B, L, D)
        vec = self.time_text_embed(t, guidance, y)  # (B, D)
        pe = rope(
            position_ids(txt.shape[1], H // p, W // p, x.device),
            self.params.axes_dim,
            self.params.theta,
        )

        for block in self.transformer_blocks:
            img, txt = self.run_block(block, img, txt, vec, pe)
        # Single-stream blocks share weights across the streams: concatenate once, split once at the
        # end.
        x_seq = torch.cat([txt, img], dim=1)  # (B, L + h·w, D)
        for block in self.single_transformer_blocks:
            x_seq = self.run_block(block, x_seq, vec, pe)
        img = self.norm_out(x_seq[:, txt.shape[1] :], vec)  # (B, h·w, D)
        if prefix:
            img = F.linear(img, self.proj_out.weight[: C * p * p], self.proj_out.bias[: C * p * p])
        else:
            img = self.proj_out(img)  # (B, h·w, C·p²)
        return rearrange(img, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=H // p, p1=p, p2=p)

    def run_block(self, block: nn.Module, *args):
        """Call a block; with grad checkpointing its activations are recomputed in backward instead
        of stored."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ------------------------------------------------------------------------------------------------------------
    # diffusers-format folders

    def diffusers_config(self) -> dict:
        """config.json of the equivalent diffusers FluxTransformer2DModel (plus our patch size,
        which it ignores)."""
        p = self.params
        return {
            "_class_name": "FluxTransformer2DModel",
            # ours: diffusers drops "_" keys; in_channels there is C·p²
            "_patch_size": p.patch_size,
            "patch_size": 1,
            "in_channels": p.in_channels * p.patch_size**2,
            "out_channels": None,
            "num_layers": p.depth,
            "num_single_layers": p.depth_single,
            "attention_head_dim": p.hidden_size // p.num_heads,
            "num_attention_heads": p.num_heads,
            "joint_attention_dim": p.context_in_dim,
            "pooled_projection_dim": p.vec_in_dim,
            "guidance_embeds": p.guidance_embed,
            "axes_dims_rope": list(p.axes_dim),
        }

    @staticmethod
    def params_from_diffusers(cfg: dict, patch_size: int | None = None) -> FluxParams:
        """FluxParams of a diffusers config.json. The patch size is not in diffusers' config (it
        packs outside the model): pass it, or it is read from our "_patch_size" key, else 1
        (in_channels then means latent channels)."""
        p = patch_size or cfg.get("_patch_size", 1)
        token_dim, out = cfg["in_channels"], cfg.get("out_channels") or cfg["in_channels"]
        if out != token_dim or token_dim % (p * p) or cfg.get("patch_size", 1) != 1:
            raise ValueError(
                f"unsupported FLUX config: in_channels {token_dim}, out_channels {out}, patch size {p}"
            )
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        return FluxParams(
            in_channels=token_dim // (p * p),
            patch_size=p,
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=cfg["num_layers"],
            depth_single=cfg["num_single_layers"],
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            context_in_dim=cfg["joint_attention_dim"],
            vec_in_dim=cfg["pooled_projection_dim"],
            guidance_embed=cfg["guidance_embeds"],
        )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        patch_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> Flux:
        """Load a diffusers-format transformer folder (config.json + one or sharded safetensors),
        strictly: the model is built on the meta device (no memory) and the stored tensors are
        assigned in place, in their stored dtype (bf16 for released FLUX) unless `dtype` is given."""
        params = cls.params_from_diffusers(read_config(folder, "FLUX transformer"), patch_size)
        with torch.device("meta"):
            model = cls(params)
        sd = read_state_dict(folder, dtype=dtype, device=device)
        return load_weights(model, sd, f"FLUX transformer {folder}").eval()


# ----------------------------------------------------------------------------------------------------------------
# cost: one forward's FLOPs from the module shapes (2 FLOPs per multiply-add; bench.py, plan.py)


def flux_flops(p, img_tokens: int, txt_tokens: int) -> dict[str, float]:
    """One FLUX forward: linear layers (per token: 12·D² in every block, double-stream blocks for
    txt and img separately), joint softmax attention (QKᵀ and AV: 2·L²·D multiply-adds per block),
    embedders and head."""
    D, L = p.hidden_size, img_tokens + txt_tokens
    mlp = int(D * p.mlp_ratio)
    # q, k, v, out + MLP in, out (same for the txt and img streams)
    per_token_double = 4 * D * D + 2 * D * mlp
    per_token_single = 3 * D * D + D * mlp + (D + mlp) * D  # q, k, v + MLP in + fused proj_out
    linear = p.depth * L * per_token_double + p.depth_single * L * per_token_single
    # embed, head
    linear += (
        img_tokens * 2 * p.in_channels * p.patch_size**2 * D + txt_tokens * p.context_in_dim * D
    )
    attention = (p.depth + p.depth_single) * 2 * L * L * D
    return {"linear": 2.0 * linear, "attention": 2.0 * attention}
