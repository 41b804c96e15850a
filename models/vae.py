"""The FLUX VAE: a KL autoencoder with f8 and 16 latent channels (diffusers `AutoencoderKL`, SD's VAE design), the
latent space of the FLUX base model that DC-Gen starts from. It is the *teacher's* AE in DC-Gen's
embedding alignment; the toy zoo uses a small one (`toy-vae-f8c4`) in the same role.

FLUX normalises its latents with a shift and a scale (0.1159, 0.3611): `encode` returns (mean - shift)·scale, the
posterior mean (deterministic), and `decode` inverts it. Module names mirror diffusers' state-dict keys, and
`VAEParams` fields are AutoencoderKL's config.json keys, so a diffusers `vae/` folder loads with strict=True.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.loading import load_weights, read_config, read_state_dict
from models.tiling import check_image_size, tiled

# ----------------------------------------------------------------------------------------------------------------
# config: AutoencoderKL's config.json keys (the ones that change the network or the latent normalisation)


@dataclasses.dataclass
class VAEParams:
    latent_channels: int = 16  # C
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level; f = 2^(levels-1)
    layers_per_block: int = 2  # ResNet blocks per encoder level (decoder: one more)
    norm_num_groups: int = 32  # GroupNorm groups
    mid_block_add_attention: bool = True  # one single-head self-attention in the middle of encoder
    # and decoder
    use_quant_conv: bool = False  # 1x1 convs around the latent (SD VAE: True, FLUX: False)
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.3611  # model-ready latent = (mean - shift_factor) · scaling_factor
    shift_factor: float = 0.1159
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.shift_factor = self.shift_factor or 0.0  # SD VAEs store null

    @classmethod
    def from_config(cls, config: dict) -> VAEParams:
        """Params from an AutoencoderKL config.json dict; fails on variants this file does not
        implement."""
        n = len(config.get("block_out_channels", cls.block_out_channels))
        checks = {
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "act_fn": "silu",
            "latents_mean": None,
        }
        for k, want in checks.items():
            got = config.get(k, want)
            if (list(got) if isinstance(got, (list, tuple)) else got) != want:
                raise ValueError(
                    f"AutoencoderKL config {k}={got!r} is not supported; expected {want!r}"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


# ----------------------------------------------------------------------------------------------------------------
# layers


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus the input (through a 1x1 conv when the width
    changes)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all H·W positions (only at the lowest resolution)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers key: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        q, k, v = (m(h)[:, None] for m in (self.to_q, self.to_k, self.to_v))  # (B, 1, H·W, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, H·W, C)
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 conv3x3 after padding one pixel on the right and bottom only (the SD/FLUX
    convention)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class DownLevel(nn.Module):
    """One encoder resolution level: ResNet blocks, then a Downsample except at the last level."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)]
        )
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.resnets, *self.downsamplers]:
            x = block(x)
        return x


class UpLevel(nn.Module):
    """One decoder resolution level: ResNet blocks, then an Upsample except at the last level."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)]
        )
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.resnets, *self.upsamplers]:
            x = block(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# encoder and decoder


class Encoder(nn.Module):
    """conv_in -> levels (ResNets + stride-2 conv) -> mid block -> GroupNorm, SiLU, conv to 2C
    (mean, log-variance)."""

    def __init__(self, p: VAEParams):
        super().__init__()
        w, g = p.block_out_channels, p.norm_num_groups
        self.conv_in = nn.Conv2d(p.in_channels, w[0], 3, 1, 1)
        self.down_blocks = nn.ModuleList(
            DownLevel(w[max(i - 1, 0)], w[i], p.layers_per_block, g, downsample=i < len(w) - 1)
            for i in range(len(w))
        )
        self.mid_block = MidBlock(w[-1], g, p.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, w[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(w[-1], 2 * p.latent_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2C, H/f, W/f)


class Decoder(nn.Module):
    """conv_in -> mid block -> levels (ResNets + nearest-x2 conv), widest first -> GroupNorm, SiLU,
    conv to RGB."""

    def __init__(self, p: VAEParams):
        super().__init__()
        w, g = tuple(reversed(p.block_out_channels)), p.norm_num_groups
        self.conv_in = nn.Conv2d(p.latent_channels, w[0], 3, 1, 1)
        self.mid_block = MidBlock(w[0], g, p.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpLevel(w[max(i - 1, 0)], w[i], p.layers_per_block + 1, g, upsample=i < len(w) - 1)
            for i in range(len(w))
        )
        self.conv_norm_out = nn.GroupNorm(g, w[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(w[-1], p.out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, H, W)


# ----------------------------------------------------------------------------------------------------------------
# the autoencoder


class VAE(nn.Module):
    """KL autoencoder (diffusers AutoencoderKL) with the project's AE interface
    (models/autoencoder.py)."""

    adaptive = False  # no channel prefixes: every latent channel is needed

    def __init__(self, params: VAEParams, tile_px: int | None = 1024):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        C = params.latent_channels
        self.quant_conv = nn.Conv2d(2 * C, 2 * C, 1) if params.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(C, C, 1) if params.use_post_quant_conv else None
        self.spatial_factor = 2 ** (len(params.block_out_channels) - 1)  # f
        self.latent_channels = C
        self.tile_px = tile_px  # images larger than this are encoded / decoded in overlapping tiles
        # overlap of the tiles; None: a quarter of tile_px, whatever it is
        self.tile_overlap_px: int | None = None

    def config(self) -> dict:
        """The diffusers config.json of this model (with the block-type lists diffusers needs to
        rebuild it)."""
        n = len(self.params.block_out_channels)
        extra = {
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
        }
        return {
            "_class_name": "AutoencoderKL",
            **dataclasses.asdict(self.params),
            **extra,
            "act_fn": "silu",
        }

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (un-normalised) posterior of images x: mean and log-variance, each (B, C, H/f, W/f)."""
        h = self.encoder(x.to(self.encoder.conv_in.weight.dtype))
        h = self.quant_conv(h) if self.quant_conv is not None else h
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> model-ready latents (mean - shift)·scale, (B, C, H/f,
                W/f).

        NOTE(deviation): the official DC-Gen AE wrapper encodes a posterior *sample*; we take the
                mean, so a latent cache is deterministic. `posterior` returns the mean and log-variance, for
                a sample."""
        f, p = self.spatial_factor, self.params
        check_image_size(x.shape[-2], x.shape[-1], f, "VAE encode")
        if channels not in (None, self.latent_channels):
            raise ValueError(
                f"VAE: channels={channels} given, but a KL VAE is not adaptive; it needs all C={p.latent_channels}"
            )
        if self.tile_px and max(x.shape[-2:]) > self.tile_px:
            mean = tiled(lambda t: self.posterior(t)[0], x, self.tile_px, self.overlap_px, 1 / f)
        else:
            mean = self.posterior(x)[0]
        return (mean - p.shift_factor) * p.scaling_factor

    def _decode(self, z: torch.Tensor) -> torch.Tensor:  # raw latent -> image
        z = self.post_quant_conv(z) if self.post_quant_conv is not None else z
        return self.decoder(z)

    def decode(self, z: torch.Tensor, progress=None) -> torch.Tensor:
        """Model-ready latents (B, C, h, w) -> images (B, 3, h·f, w·f) in about [-1, 1].
        `progress(done, total)` is called after each tile of a tiled decode."""
        f, p = self.spatial_factor, self.params
        if z.shape[1] != self.latent_channels:
            raise ValueError(
                f"VAE decode: latent has {z.shape[1]} channels, this VAE needs C={self.latent_channels}"
            )
        z = z.to(self.decoder.conv_in.weight.dtype) / p.scaling_factor + p.shift_factor
        if self.tile_px and max(z.shape[-2:]) * f > self.tile_px:
            return tiled(self._decode, z, self.tile_px // f, self.overlap_px // f, f, progress)
        return self._decode(z)

    @property
    def overlap_px(self) -> int:
        return self.tile_overlap_px or self.tile_px // 4

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu", tile_px: int | None = 1024) -> VAE:
        """Build on the meta device from config.json, then strictly assign the safetensors weights."""
        config = read_config(folder, "VAE (diffusers AutoencoderKL)")
        if config.get("_class_name") != "AutoencoderKL":
            raise ValueError(
                f"{Path(folder) / 'config.json'} has _class_name {config.get('_class_name')!r}; expected "
                "'AutoencoderKL' (use models.autoencoder.load_autoencoder to open any AE)"
            )
        with torch.device("meta"):
            model = cls(VAEParams.from_config(config), tile_px=tile_px)
        load_weights(model, read_state_dict(folder, dtype=dtype, device=device), "VAE")
        return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# presets

PRESETS = {
    # black-forest-labs/FLUX.1-dev (and Krea-dev, schnell) vae/config.json (as third-party copies
    # give it)
    "flux-vae": VAEParams(),
    # Toy zoo: the FLUX VAE's role, f8 with 4 channels; shift/scale are set by ae15.py after
    # training.
    "toy-vae-f8c4": VAEParams(
        latent_channels=4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=1.0,
        shift_factor=0.0,
    ),
    # tests
    "tiny-vae": VAEParams(
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.5,
        shift_factor=0.1,
    ),
}
