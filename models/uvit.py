"""U-ViT (Bao et al., "All are Worth Words", arXiv 2209.12152) and USiT, the class-conditional backbone of DC-AE
1.5's diffusion experiments, with the official code's module names (`dc_gen/c2icore/diffusioncore/models/uvit.py`),
so its state dicts load with strict=True.

    tokens = [label_emb[label], time_embed(sinusoid(t)), patch_embed(x)] + pos_embed       label, time: tokens
    depth/2 in_blocks (each output kept), mid_block,
    depth/2 out_blocks, each first x = skip_linear([x, skip]) with the matching in_block's output (long skips)
    out = unpatchify(decoder_pred(norm(x))[:, 2:])                                         pre-norm ViT blocks

USiT is the same network trained with SiT's linear path and velocity loss (`dc_ae_usit_2b_in_512px`: depth 28,
hidden 2048, 32 heads, patch 1). DC-AE 1.5's `adaptive_channel=True` (`dc_ae_1_5_usit_2b_in_512px`) lets the model
take a channel prefix x[:, :C'] (augmented diffusion training): the patch embedder uses the first C' input channels
of its conv (official AdaptivePatchEmbed) and the head the matching rows (official AdaptiveLinear, rows :C'·p²,
correct for the released 1×1 patches; here the rows of channels :C' at every patch position, the same rows at p=1).

Time convention: the official USiT is called with SiT's t in [0, 1] (data at t = 1) and predicts x1 - x0; models
trained here by the project's loops are called like FLUX, model(x_t, sigma, label=...) with `t_scale` 1000, and
predict noise - x0 (models/c2i.py samples both).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.loading import load_weights, read_config, read_state_dict


@dataclass(frozen=True)
class UViTParams:
    in_channels: int = 128  # latent channels C
    patch_size: int = 1
    hidden_size: int = 2048
    depth: int = 28  # depth/2 in_blocks + mid_block + depth/2 out_blocks
    num_heads: int = 32
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_time_embed: bool = False  # an MLP on the time sinusoid (off in every official config)
    num_classes: int = 1000  # the label num_classes is the CFG null class
    sample_size: int = 8  # latent side: the learned positions are for (sample_size / p)² tokens
    t_scale: float = 1.0  # the time sinusoid sees t·t_scale (1: SiT's t; 1000: sigma in [0, 1])


_TOY = UViTParams(
    in_channels=16,
    hidden_size=128,
    depth=6,
    num_heads=4,
    num_classes=16,
    sample_size=8,
    t_scale=1000.0,
)

PRESETS = {
    # DC-AE 1.5 f64c128 + USiT-2B at 512 px (8×8 latent), c2i_model_zoo `dc-ae-f64c128-1.5-usit-2b-in-512px`
    "usit-2b": UViTParams(),
    "usit-3b": UViTParams(depth=56),
    # U-ViT-H/2 on SD-VAE f8c4 at 256 px: 501 M parameters (U-ViT Table 1)
    "uvit-h-2": UViTParams(
        in_channels=4, patch_size=2, hidden_size=1152, num_heads=16, sample_size=32
    ),
    "toy": _TOY,
    "tiny": replace(_TOY, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10),
}


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """GLIDE's sinusoid (cos half first, frequencies exp(-ln(10000)·i / half)). (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "b h l d -> b l (h d)"))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's Mlp)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block; an out_block first merges its long skip: x = skip_linear([x, skip])."""

    def __init__(self, p: UViTParams, skip: bool = False):
        super().__init__()
        D = p.hidden_size
        self.norm1 = nn.LayerNorm(D)
        self.attn = Attention(D, p.num_heads, p.qkv_bias)
        self.norm2 = nn.LayerNorm(D)
        self.mlp = Mlp(D, int(D * p.mlp_ratio))
        self.skip_linear = nn.Linear(2 * D, D) if skip else None

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)


class LabelEmb(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class UViT(nn.Module):
    # DC-Gen re-learns these for a new latent (its UViTPatchEmbedding; the head decoder_pred)
    latent_layers = ("patch_embed.proj", "decoder_pred")
    lora_targets = (
        r"(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.(attn\.(qkv|proj)|mlp\.(fc1|fc2)|skip_linear)",
    )

    def __init__(self, params: UViTParams):
        super().__init__()
        p = self.params = params
        assert p.hidden_size % p.num_heads == 0 and p.depth % 2 == 0
        D = p.hidden_size
        self.patch_embed = PatchEmbed(p.in_channels, D, p.patch_size)
        self.time_embed = (
            nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D))
            if p.mlp_time_embed
            else nn.Identity()
        )
        self.label_emb = LabelEmb(p.num_classes, D)
        tokens = (p.sample_size // p.patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + tokens, D))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.in_blocks = nn.ModuleList(Block(p) for _ in range(p.depth // 2))
        self.mid_block = Block(p)
        self.out_blocks = nn.ModuleList(Block(p, skip=True) for _ in range(p.depth // 2))
        self.norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, p.patch_size**2 * p.in_channels)
        self.grad_checkpointing = False
        self.adaptive_channels = False  # accept channel prefixes x[:, :C'] (DC-AE 1.5)
        for m in self.modules():  # the official init: linears trunc-normal(0.02), zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None

    @property
    def null_label(self) -> int:
        return self.params.num_classes

    def diffusers_config(self) -> dict:  # what write_pipeline saves as transformer/config.json
        return uvit_config(self)

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu") -> UViT:
        return load_uvit(folder, dtype, device)

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """x (B, C', H, W) with C' <= C, t (B,), label (B,) (num_classes: null) -> (B, C', H, W)."""
        p, P = self.params, self.params.patch_size
        B, C, H, W = x.shape
        if C != p.in_channels and not (self.adaptive_channels and C < p.in_channels):
            raise ValueError(
                f"latent has {C} channels, the model {p.in_channels} (a channel prefix needs "
                "model.adaptive_channels = True, as lora.py --prefixes sets)"
            )
        w = self.patch_embed.proj.weight[:, :C]
        x = F.conv2d(x.to(w.dtype), w, self.patch_embed.proj.bias, stride=P)
        x = x.flatten(2).transpose(1, 2)  # (B, L, D)
        time = self.time_embed(timestep_embedding(t * p.t_scale, p.hidden_size).to(x.dtype))
        label = self.label_emb.embedding_table(label)
        x = torch.cat([label[:, None], time[:, None], x], dim=1) + self.pos_embed  # (B, 2 + L, D)
        skips = []
        for block in self.in_blocks:
            x = self.run_block(block, x)
            skips.append(x)
        x = self.run_block(self.mid_block, x)
        for block in self.out_blocks:
            x = self.run_block(block, x, skips.pop())
        x = F.linear(self.norm(x)[:, 2:], *self.head_rows(C))  # (B, L, p²·C')
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=H // P, p=P, q=P)

    def run_block(self, block: nn.Module, *args) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def head_rows(self, C: int) -> tuple[Tensor, Tensor]:
        """decoder_pred's rows for a C-channel input: (p1 p2 c) layout, channels :C of each
        position."""
        w, b = self.decoder_pred.weight, self.decoder_pred.bias
        full = self.params.in_channels
        if C == full:
            return w, b
        rows = torch.arange(w.shape[0], device=w.device).view(-1, full)[:, :C].reshape(-1)
        return w[rows], b[rows]


def uvit_config(model: UViT) -> dict:
    """config.json of a UViT folder (ours: diffusers has no U-ViT; the official code's field names)."""
    return {"_class_name": "UViT", **dataclasses.asdict(model.params)}


def load_uvit(folder: str | Path, dtype: torch.dtype | None = None, device="cpu") -> UViT:
    """A UViT folder (config.json + safetensors in the official state-dict names), strictly."""
    cfg = {k: v for k, v in read_config(folder, "UViT").items() if not k.startswith("_")}
    with torch.device("meta"):
        model = UViT(UViTParams(**cfg))
    sd = read_state_dict(folder, dtype=dtype, device=device)
    return load_weights(model, sd, f"UViT {folder}").eval()


def uvit_flops(p: UViTParams, tokens: int) -> dict[str, float]:
    """One forward (2 FLOPs per multiply-add), L = tokens + 2: 12·D² per token and block (depth + 1
    blocks), 2·D² per token for each long skip, attention 2·L²·D per block."""
    D, L, n = p.hidden_size, tokens + 2, p.depth + 1
    linear = n * L * 12 * D * D + (p.depth // 2) * L * 2 * D * D
    linear += 2 * tokens * p.in_channels * p.patch_size**2 * D
    return {"linear": 2.0 * linear, "attention": 2.0 * n * 2 * L * L * D}
