"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", arXiv 2212.09748), class-conditional, written
from its structure with diffusers' `DiTTransformer2DModel` module names, so a `facebook/DiT-XL-2-256`-style folder
loads strictly and what we save loads in diffusers.

DC-Gen (arXiv 2509.25180, DC-Gen-DiT-XL) moves DiT-XL/2 from SD-VAE f8c4 with 2×2 patches to DC-AE f32 with 1×1
patches by re-learning the two layers that touch the latent, the patch embedder `pos_embed.proj` and the head
`proj_out_2`, as for FLUX. The network, top to bottom (DiT Fig. 3, adaLN-Zero):

    c = MLP(sinusoid(t)) + class_embedder[label]            label == num_classes is the CFG null class
    x = conv_p(x) + sincos2d                                 patch embedder, fixed 2-D positions
    N blocks: x += gate·attn(modulate(LN(x))); x += gate·MLP(modulate(LN(x)))      6 modulations from c
    out = unpatchify(proj_out_2(modulate(LN(x), proj_out_1(SiLU(c)))))            (B, 2C, H, W): ε and Σ

With learned sigma (released DiT-XL/2) the head emits 2C channels: ε, then v that interpolates log β_t and log β̃_t
(Improved DDPM Eq. 15). One conditioning vector feeds every block, as in the original DiT; diffusers' layout holds a
copy of the timestep and class embedders in every block's `norm1.emb` (its conversion script copies the one of the
original checkpoint), so loading checks the copies are equal and keeps one, and saving writes the copies back.

`adaptive_channels` (DC-AE 1.5 augmented diffusion training; official `dc_gen/c2icore/diffusioncore/models/dit.py`
AdaptivePatchEmbed / AdaptiveFinalLayer) lets the model take a channel prefix x[:, :C'] and emit the matching rows of
ε and Σ. For velocity models trained here (`t_scale` 1000, learn_sigma off: the official `dc_ae_sit_xl_in_512px`
config) the forward is called like FLUX's: model(x_t, sigma, label=...).
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

from models.loading import load_weights, read_config, read_state_dict, save_pretrained


@dataclass(frozen=True)
class DiTParams:
    in_channels: int = 4  # latent channels C
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the label num_classes is the CFG null class (one more embedding row)
    learn_sigma: bool = True  # the head emits ε and Σ (2C channels)
    sample_size: int = 32  # latent side the 2-D positions are laid out for (diffusers' sample_size)
    norm_eps: float = (
        1e-5  # the MLP LayerNorm's eps (diffusers' norm_eps; the original DiT uses 1e-6)
    )
    t_scale: float = (
        1.0  # the timestep embedding sees t·t_scale: 1 for DDPM steps, 1000 for sigma in [0, 1]
    )


_TOY = DiTParams(
    in_channels=4,
    patch_size=2,
    hidden_size=128,
    depth=6,
    num_heads=4,
    num_classes=16,
    learn_sigma=False,
    sample_size=16,
    t_scale=1000.0,
)

PRESETS = {
    # DiT-XL/2 on SD-VAE f8c4 at 256 px (32×32 latent): 675 M parameters (DiT Table 4)
    "dit-xl-2-256": DiTParams(),
    "dit-xl-2-512": DiTParams(sample_size=64),
    # DC-Gen-DiT-XL: the same backbone on a DC-AE f32c32 latent, 1×1 patches (DC-Gen §4)
    "dcgen-dit-xl-256": DiTParams(in_channels=32, patch_size=1, sample_size=8),
    "dcgen-dit-xl-512": DiTParams(in_channels=32, patch_size=1, sample_size=16),
    # toy velocity DiTs (runs/c2i_toy.sh): classes = colour × shape of toy/shapes.py
    "toy": _TOY,
    "toy-f32": replace(_TOY, in_channels=16, patch_size=1, sample_size=8),
    # tests: a velocity twin of "tiny" for the flow-matching stages
    "tiny-v": DiTParams(
        in_channels=4,
        patch_size=2,
        hidden_size=32,
        depth=2,
        num_heads=2,
        sample_size=8,
        learn_sigma=False,
        t_scale=1000.0,
    ),
    "tiny": DiTParams(
        in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, sample_size=8
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# embeddings


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000.0) -> Tensor:
    """Sinusoid of t (cos half first) as diffusers' CombinedTimestepLabelEmbeddings computes it:
    frequencies exp(-ln(10000)·i / (half - 1)) (downscale_freq_shift 1; the original DiT divides by
    half). (B,) -> (B, dim)."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    args = t.float()[:, None] * torch.exp(-math.log(max_period) * i / (half - 1))[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim: int, h: int, w: int, base: int, device=None) -> Tensor:
    """DiT's fixed 2-D positions (MAE's get_2d_sincos_pos_embed), (h·w, dim): the first half of
    the channels encodes the column, the second the row; a grid other than base×base is stretched to
    base (diffusers' PatchEmbed). Computed in float64, returned float32."""

    def one_axis(pos: Tensor) -> Tensor:  # (M,) -> (M, dim / 2): sin half, then cos half
        omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # float32 division then float64, as diffusers' get_2d_sincos_pos_embed
    rows = (torch.arange(h, dtype=torch.float32) / (h / base)).double()
    cols = (torch.arange(w, dtype=torch.float32) / (w / base)).double()
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    emb = torch.cat([one_axis(grid_c.reshape(-1)), one_axis(grid_r.reshape(-1))], dim=1)
    return emb.float().to(device)


def positions_map(e: Tensor, base: int | None) -> Tensor | float:
    """The fixed positions DiT adds to an embedding map e (b, D, h, w), laid out for a grid of side
    `base`, as a (1, D, h, w) map; 0 for base None (a model without them)."""
    if base is None:
        return 0.0
    D, h, w = e.shape[1:]
    return sincos_2d(D, h, w, base, e.device).T.reshape(1, D, h, w).to(e.dtype)


class TimestepEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 on the 256-dim sinusoid (diffusers' TimestepEmbedding)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(timestep_embedding(t).to(self.linear_1.weight))))


class LabelEmbedder(nn.Module):
    """One row per class plus the CFG null class (index num_classes); dropout to it is the
    training loop's (models.text.drop_text with null {"label": num_classes})."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, label: Tensor) -> Tensor:
        return self.embedding_table(label)


class Conditioning(nn.Module):
    """c = MLP(sinusoid(t)) + class embedding (diffusers' CombinedTimestepLabelEmbeddings)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        self.class_embedder = LabelEmbedder(num_classes, dim)

    def forward(self, t: Tensor, label: Tensor) -> Tensor:
        return self.timestep_embedder(t) + self.class_embedder(label)


class PatchEmbed(nn.Module):
    """p×p patches by a strided conv, plus the fixed 2-D positions (diffusers' PatchEmbed)."""

    def __init__(self, in_channels: int, dim: int, patch: int, base: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.base = base  # grid side (sample_size / p) the positions are laid out for

    def forward(self, x: Tensor, adaptive: bool) -> Tensor:
        C = x.shape[1]
        if C != self.proj.in_channels and not adaptive:
            raise ValueError(
                f"latent has {C} channels, the model {self.proj.in_channels} (a channel prefix "
                "needs model.adaptive_channels = True, as lora.py --prefixes sets)"
            )
        w = self.proj.weight[:, :C]  # DC-AE 1.5: a prefix uses the first C input channels
        x = F.conv2d(x.to(w.dtype), w, self.proj.bias, stride=self.proj.stride)  # (B, D, h, w)
        h, wd = x.shape[-2:]
        pos = sincos_2d(x.shape[1], h, wd, self.base, x.device)
        return x.flatten(2).transpose(1, 2) + pos.to(x.dtype)  # (B, h·w, D)


# ----------------------------------------------------------------------------------------------------------------
# blocks


class Attention(nn.Module):
    """Multi-head self-attention with biased q, k, v, out (diffusers' Attention, bias=True)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            rearrange(f(x), "b l (h d) -> b h l d", h=self.num_heads)
            for f in (self.to_q, self.to_k, self.to_v)
        )
        x = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](rearrange(x, "b h l d -> b l (h d)"))


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, diffusers' FeedForward names (net.0.proj, net.2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(hidden, dim)])
        self.net[0].proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class AdaLNZero(nn.Module):
    """The block's six modulations from c: linear(SiLU(c)) -> shift, scale, gate for attention and
    MLP (DiT's adaLN-Zero; diffusers' AdaLayerNormZero without its copy of the embedder)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(c))[:, None].chunk(6, dim=-1)  # each (B, 1, D)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.norm1 = AdaLNZero(dim)
        self.attn1 = Attention(dim, num_heads)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.norm_eps = norm_eps

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.norm1(c)
        D = x.shape[-1]
        h = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale1) + shift1
        x = x + gate1 * self.attn1(h)
        h = F.layer_norm(x, (D,), eps=self.norm_eps) * (1 + scale2) + shift2
        return x + gate2 * self.ff(h)


# ----------------------------------------------------------------------------------------------------------------
# the model


class DiT(nn.Module):
    # DC-Gen re-learns these two for a new latent: stage 1 the embedder, stage 2 the head.
    # NOTE(deviation): the official head stage (c2icore freeze_backbone) also trains the final adaLN
    # modulation (proj_out_1, part of its final_layer); we keep it frozen, as for FLUX's head.
    latent_layers = ("pos_embed.proj", "proj_out_2")
    # LoRA targets: every attention and MLP linear and the adaLN modulation of every block
    lora_targets = (
        r"transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)",
        r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
        r"transformer_blocks\.\d+\.norm1\.linear",
    )

    def __init__(self, params: DiTParams):
        super().__init__()
        p = self.params = params
        assert p.hidden_size % p.num_heads == 0, f"{p.hidden_size} not divisible by {p.num_heads}"
        D = p.hidden_size
        self.emb = Conditioning(p.num_classes, D)
        self.pos_embed = PatchEmbed(p.in_channels, D, p.patch_size, p.sample_size // p.patch_size)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(D, p.num_heads, p.mlp_ratio, p.norm_eps) for _ in range(p.depth)
        )
        self.proj_out_1 = nn.Linear(D, 2 * D)
        self.proj_out_2 = nn.Linear(D, p.patch_size**2 * self.out_channels)
        self.grad_checkpointing = False
        self.adaptive_channels = False  # accept channel prefixes x[:, :C'] (DC-AE 1.5)

    @property
    def out_channels(self) -> int:
        return self.params.in_channels * (2 if self.params.learn_sigma else 1)

    @property
    def null_label(self) -> int:
        return self.params.num_classes

    def forward(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """x (B, C', H, W) with C' <= C, t (B,) timestep (DDPM step, or sigma for velocity models),
        label (B,) class ids (num_classes: null). Returns (B, C', H, W), or (B, 2C', H, W) with
        learned sigma: ε then Σ."""
        p = self.params.patch_size
        B, C, H, W = x.shape
        assert H % p == 0 and W % p == 0, f"latent {H}x{W} is not divisible by the patch size {p}"
        c = self.emb(t * self.params.t_scale, label)  # (B, D)
        x = self.pos_embed(x, self.adaptive_channels)  # (B, h·w, D)
        for block in self.transformer_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        shift, scale = self.proj_out_1(F.silu(c))[:, None].chunk(2, dim=-1)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift
        x = F.linear(x, *self.head_rows(C))  # (B, h·w, p²·C_out)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=H // p, p=p, q=p)

    def head_rows(self, C: int) -> tuple[Tensor, Tensor]:
        """The head's weight and bias for a C-channel input: all rows, or for a prefix the rows of
        ε[:C] (and Σ[:C]) at every patch position (the official AdaptiveFinalLayer takes the same
        rows for 1×1 patches, the only size it is released with)."""
        w, b = self.proj_out_2.weight, self.proj_out_2.bias
        full = self.params.in_channels
        if C == full:
            return w, b
        pp, out = self.params.patch_size**2, self.out_channels
        keep = torch.arange(out, device=w.device).view(-1, full)[:, :C].reshape(-1)
        rows = (torch.arange(pp, device=w.device)[:, None] * out + keep[None]).reshape(-1)
        return w[rows], b[rows]

    # ------------------------------------------------------------------------------------------------------------
    # diffusers-format folders

    def diffusers_config(self) -> dict:
        p = self.params
        return {
            "_class_name": "DiTTransformer2DModel",
            "_t_scale": p.t_scale,  # ours: diffusers drops "_" keys
            "num_attention_heads": p.num_heads,
            "attention_head_dim": p.hidden_size // p.num_heads,
            "in_channels": p.in_channels,
            "out_channels": self.out_channels,
            "num_layers": p.depth,
            "sample_size": p.sample_size,
            "patch_size": p.patch_size,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": p.num_classes,
            "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False,
            "norm_eps": p.norm_eps,
        }

    @staticmethod
    def params_from_diffusers(cfg: dict) -> DiTParams:
        C = cfg.get("in_channels", 4)
        out = cfg.get("out_channels") or C
        fixed = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate"}
        bad = {k: cfg[k] for k, v in fixed.items() if cfg.get(k, v) != v}
        if out not in (C, 2 * C) or cfg.get("norm_elementwise_affine") or bad:
            raise ValueError(f"unsupported DiT config: out_channels {out} for {C}, {bad}")
        heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
        return DiTParams(
            in_channels=C,
            patch_size=cfg.get("patch_size", 2),
            hidden_size=heads * head_dim,
            depth=cfg.get("num_layers", 28),
            num_heads=heads,
            num_classes=cfg.get("num_embeds_ada_norm", 1000),
            learn_sigma=out == 2 * C,
            sample_size=cfg.get("sample_size", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            t_scale=cfg.get("_t_scale", 1.0),
        )

    def diffusers_state_dict(self, sd: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Our state dict in diffusers' keys: the shared embedder copied into every block's
        norm1.emb (views of one tensor, cloned by the writer)."""
        sd = dict(self.state_dict() if sd is None else sd)
        emb = {k[len("emb.") :]: sd.pop(k) for k in list(sd) if k.startswith("emb.")}
        for i in range(self.params.depth):
            sd.update({f"transformer_blocks.{i}.norm1.emb.{k}": v.clone() for k, v in emb.items()})
        return sd

    @staticmethod
    def from_diffusers_state_dict(sd: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
        """diffusers' keys -> ours: block 0's embedder becomes the shared one; every other block's
        copy must equal it (it does in converted DiT checkpoints, and in what we save)."""
        out = {k: v for k, v in sd.items() if ".norm1.emb." not in k}
        first = "transformer_blocks.0.norm1.emb."
        out.update({"emb." + k[len(first) :]: v for k, v in sd.items() if k.startswith(first)})
        for i in range(1, depth):
            for k, v in sd.items():
                if k.startswith(f"transformer_blocks.{i}.norm1.emb."):
                    ours = "emb." + k.split(".norm1.emb.", 1)[1]
                    if not torch.equal(v, out[ours]):
                        raise ValueError(
                            f"{k} differs from block 0's copy: this DiT has per-block embedders, "
                            "the original DiT (and this class) one"
                        )
        return out

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype | None = None, device="cpu"
    ) -> DiT:
        params = cls.params_from_diffusers(read_config(folder, "DiT transformer"))
        with torch.device("meta"):
            model = cls(params)
        sd = read_state_dict(folder, dtype=dtype, device=device)
        sd = cls.from_diffusers_state_dict(sd, params.depth)
        return load_weights(model, sd, f"DiT transformer {folder}").eval()

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None) -> None:
        save_pretrained(folder, self.diffusers_state_dict(state_dict), self.diffusers_config())


# ----------------------------------------------------------------------------------------------------------------
# cost


def dit_flops(p: DiTParams, tokens: int) -> dict[str, float]:
    """One forward (2 FLOPs per multiply-add): per block and token 12·D² for q, k, v, out and the
    MLP (ratio 4) plus 6·D² of adaLN per sample; attention 2·L²·D per block."""
    D = p.hidden_size
    mlp = int(D * p.mlp_ratio)
    linear = p.depth * tokens * (4 * D * D + 2 * D * mlp) + p.depth * 6 * D * D
    linear += tokens * (p.in_channels * p.patch_size**2) * D * (1 + (2 if p.learn_sigma else 1))
    return {"linear": 2.0 * linear, "attention": 2.0 * p.depth * 2 * tokens * tokens * D}
