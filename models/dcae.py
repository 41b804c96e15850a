"""DC-AE, the deep-compression autoencoder (DC-AE 1.0, arXiv 2410.10733) and DC-AE 1.5 with its structured latent
space (arXiv 2508.00413): the f32/f64 latent spaces that DC-Gen (arXiv 2509.25180) moves a diffusion model into.

Three ideas, one class each below (the official model: DC-Gen dc_gen/aecore/models/dc_ae.py, dc_gen/models/nn/ops.py):
- residual autoencoding: every down/up-sampling step adds a non-parametric shortcut (pixel-unshuffle + channel
  averaging down, channel duplication + pixel-shuffle up), so the convolutions learn only a residual;
- ResBlock stages at high resolution, EfficientViT stages (ReLU linear attention + GLUMBConv) at low resolution;
- DC-AE 1.5: no shortcut around the latent, so the encoder's last conv and the decoder's first conv can be sliced to
  the first c channels (`encode(x, channels=c)`, `decode(z[:, :c])`): the paper's channel mask, trained by ae15.py.

Module names and config keys mirror diffusers' `AutoencoderDC`: `DCAEParams` fields are its config.json keys, so a
diffusers folder loads with strict=True and the folders we write load in diffusers. The latent scaling factor is a
params field: `encode` returns model-ready latents z·s and `decode` divides by s.
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
# config: the fields are diffusers AutoencoderDC's config keys (README: "DC-AE / VAE mapping")


@dataclasses.dataclass
class DCAEParams:
    latent_channels: int = 32  # C
    # width per stage; f = 2^(n-1)
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)  # blocks per stage (0 in stage
    # 0: see Encoder)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    # per stage
    encoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    decoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    # LiteMLA aggregation kernels
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_norm_types: tuple[str, ...] = ("rms_norm",) * 6  # "rms_norm" or "batch_norm" per
    # decoder stage
    decoder_act_fns: tuple[str, ...] = ("silu",) * 6  # "silu" or "relu" per decoder stage (encoder:
    # always silu)
    decoder_conv_act_fn: str = "relu"  # activation before the decoder's last conv
    downsample_block_type: str = "pixel_unshuffle"  # "pixel_unshuffle" (DC-AE) or "Conv" (stride 2,
    # SANA)
    upsample_block_type: str = "pixel_shuffle"  # "pixel_shuffle" (DC-AE) or "interpolate" (nearest
    # + conv, SANA)
    encoder_out_shortcut: bool = True  # DC-AE 1.0: channel-averaging shortcut into the latent; 1.5:
    # False
    decoder_in_shortcut: bool = True  # DC-AE 1.0: channel-duplicating shortcut out of the latent;
    # 1.5: False
    attention_head_dim: int = 32
    in_channels: int = 3
    scaling_factor: float = 1.0  # s: model-ready latent = s · encoder output (about 1 / its std)

    def __post_init__(self):
        n = len(self.encoder_block_out_channels)
        # diffusers allows one str for all
        per_stage = lambda v: (v,) * n if isinstance(v, str) else tuple(v)
        for k in (
            "encoder_block_types",
            "decoder_block_types",
            "decoder_norm_types",
            "decoder_act_fns",
        ):
            setattr(self, k, per_stage(getattr(self, k)))
        for k in (
            "encoder_block_out_channels",
            "decoder_block_out_channels",
            "encoder_layers_per_block",
            "decoder_layers_per_block",
        ):
            setattr(self, k, tuple(getattr(self, k)))  # config.json holds lists
        for k in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            setattr(self, k, tuple(tuple(s) for s in getattr(self, k)))
        for k in ("encoder_block_types", "decoder_block_types"):
            bad = set(getattr(self, k)) - {"ResBlock", "EfficientViTBlock"}
            assert not bad, (
                f"{k}: unknown block types {bad}; choose from 'ResBlock', 'EfficientViTBlock'"
            )
        lens = {k: len(v) for k, v in dataclasses.asdict(self).items() if isinstance(v, tuple)}
        assert len(set(lens.values())) == 1, (
            f"per-stage fields must all have one entry per stage: {lens}"
        )

    @classmethod
    def from_config(cls, config: dict) -> DCAEParams:
        """Params from an AutoencoderDC config.json dict (keys diffusers adds, like _class_name, are
        skipped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


# ----------------------------------------------------------------------------------------------------------------
# layers


class RMSNorm2d(nn.Module):
    """RMSNorm over the channels of a (B, C, H, W) map, with weight and bias (DC-AE's "trms2d")."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(1, keepdim=True) + self.eps)  # statistics in fp32
        return (y * self.weight[:, None, None].float() + self.bias[:, None, None].float()).to(
            x.dtype
        )


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind not in ("rms_norm", "batch_norm"):
        raise ValueError(f"unknown norm type {kind!r}; choose from 'rms_norm', 'batch_norm'")
    return RMSNorm2d(channels) if kind == "rms_norm" else nn.BatchNorm2d(channels)


def make_act(kind: str) -> nn.Module:
    if kind not in ("silu", "relu"):
        raise ValueError(f"unknown activation {kind!r}; choose from 'silu', 'relu'")
    return nn.SiLU() if kind == "silu" else nn.ReLU()


class ResBlock(nn.Module):
    """conv3x3 -> act -> conv3x3 (no bias) -> norm, plus the identity."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.act = make_act(act)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.act(self.conv1(x))))


class MultiScaleProjection(nn.Module):
    """Multi-scale token aggregation of LiteMLA: a depthwise kxk conv, then a grouped 1x1 conv, over
    q, k and v."""

    def __init__(self, channels: int, heads: int, kernel: int):
        super().__init__()
        self.proj_in = nn.Conv2d(
            channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False
        )
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(qkv))


class LiteMLA(nn.Module):
    """EfficientViT's multi-scale ReLU linear attention (diffusers: SanaMultiscaleLinearAttention).

    Softmax is replaced by the kernel relu(q)·relu(k), so attention over N tokens costs O(N·d²):
        out_i = sum_j v_j (k_j · q_i) / sum_j (k_j · q_i)
    Each multi-scale branch adds heads that see q, k, v blurred by a kxk depthwise conv (SANA's DC-AE uses 5x5).
    """

    def __init__(
        self, channels: int, head_dim: int, scales: tuple[int, ...], norm: str, eps: float = 1e-15
    ):
        super().__init__()
        heads = channels // head_dim
        self.head_dim, self.eps = head_dim, eps
        self.to_q = nn.Linear(channels, heads * head_dim, bias=False)
        self.to_k = nn.Linear(channels, heads * head_dim, bias=False)
        self.to_v = nn.Linear(channels, heads * head_dim, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(
            MultiScaleProjection(3 * heads * head_dim, heads, k) for k in scales
        )
        self.to_out = nn.Linear(heads * head_dim * (1 + len(scales)), channels, bias=False)
        self.norm_out = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h = x.movedim(1, -1)  # (B, H, W, C)
        # (B, 3D, H, W)
        qkv = torch.cat([self.to_q(h), self.to_k(h), self.to_v(h)], dim=-1).movedim(-1, 1)
        # (B, 3D·(1+S), H, W)
        qkv = torch.cat([qkv] + [m(qkv) for m in self.to_qkv_multiscale], dim=1)
        # Heads are consecutive groups of 3·d channels of the [q | k | v] stack: the official
        # EfficientViT layout (one fused qkv conv), which diffusers and we keep so released weights
        # mean the same thing.
        qkv = qkv.float().reshape(B, -1, 3 * self.head_dim, H * W)  # (B, heads', 3d, N)
        # attention in fp32, also under bf16 autocast (official)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = qkv.chunk(3, dim=2)  # each (B, heads', d, N)
            q, k = F.relu(q), F.relu(k)
            # (B, heads', d+1, N): the row of ones yields the normaliser
            v = F.pad(v, (0, 0, 0, 1), value=1.0)
            # (B, heads', d+1, d) @ (B, heads', d, N) -> (B, heads', d+1, N)
            out = (v @ k.transpose(-1, -2)) @ q
            out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)  # (B, heads', d, N)
        # NOTE(deviation): diffusers switches to the quadratic order (k^T q first) when H·W <= d; it
        # is the same function, so we keep the linear order only (differences are float rounding).
        out = out.to(x.dtype).reshape(B, -1, H, W)  # (B, D·(1+S), H, W)
        out = self.to_out(out.movedim(1, -1)).movedim(-1, 1)  # (B, C, H, W)
        return x + self.norm_out(out)


class GLUMBConv(nn.Module):
    """The EfficientViT block's local mixer: 1x1 expand (x8) -> SiLU -> depthwise 3x3 -> gated (GLU)
    -> 1x1 -> norm."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = expand * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_depth(F.silu(self.conv_inverted(x)))  # (B, 2·hidden, H, W)
        h, gate = h.chunk(2, dim=1)  # (B, hidden, H, W) each
        return x + self.norm(self.conv_point(h * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    """Global context (LiteMLA) then local mixing (GLUMBConv), each with its own residual."""

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...], norm: str):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, scales, norm)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


class DownBlock(nn.Module):
    """Halve H and W: conv + pixel-unshuffle (or a stride-2 conv), plus the residual-autoencoding
        shortcut.

    Shortcut (DC-AE §3.1): pixel_unshuffle(x) has 4·C_in channels; averaging groups of 4·C_in/C_out
        of them gives C_out channels with no parameters, so the conv only learns what the
        space-to-channel move cannot express."""

    def __init__(self, c_in: int, c_out: int, pixel_unshuffle: bool, shortcut: bool):
        super().__init__()
        self.pixel_unshuffle, self.shortcut = pixel_unshuffle, shortcut
        self.group = 4 * c_in // c_out
        stride = 1 if pixel_unshuffle else 2
        self.conv = nn.Conv2d(c_in, c_out // 4 if pixel_unshuffle else c_out, 3, stride, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = F.pixel_unshuffle(h, 2) if self.pixel_unshuffle else h  # (B, C_out, H/2, W/2)
        if self.shortcut:
            # (B, C_out, H/2, W/2)
            h = h + F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group)).mean(2)
        return h


class UpBlock(nn.Module):
    """Double H and W: conv + pixel-shuffle (or nearest + conv), plus the channel-duplicating
    shortcut."""

    def __init__(self, c_in: int, c_out: int, pixel_shuffle: bool, shortcut: bool):
        super().__init__()
        self.pixel_shuffle, self.shortcut = pixel_shuffle, shortcut
        self.repeats = 4 * c_out // c_in
        self.conv = nn.Conv2d(c_in, 4 * c_out if pixel_shuffle else c_out, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pixel_shuffle:
            h = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C_out, 2H, 2W)
            if self.shortcut:
                h = h + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)
            return h
        h = self.conv(x)  # (B, 4·C_out, H, W)
        if self.shortcut:
            # The shortcut is added before the shuffle, at a quarter of the resolution: the shuffle
            # is a permutation, so shuffle(a) + shuffle(b) = shuffle(a + b), bit for bit, with one
            # shuffle instead of two.
            h = h + x.repeat_interleave(self.repeats, dim=1)  # (B, 4·C_out, H, W)
        return F.pixel_shuffle(h, 2)  # (B, C_out, 2H, 2W)


def make_block(
    kind: str, channels: int, p: DCAEParams, scales: tuple[int, ...], norm: str, act: str
) -> nn.Module:
    if kind == "EfficientViTBlock":
        return EfficientViTBlock(channels, p.attention_head_dim, scales, norm)
    return ResBlock(channels, norm, act)


# ----------------------------------------------------------------------------------------------------------------
# encoder and decoder


class Encoder(nn.Module):
    """conv_in -> stages of blocks, each followed by a DownBlock -> conv_out to C channels
    (sliceable in DC-AE 1.5)."""

    def __init__(self, p: DCAEParams):
        super().__init__()
        widths, depths = p.encoder_block_out_channels, p.encoder_layers_per_block
        unshuffle = p.downsample_block_type == "pixel_unshuffle"
        if depths[0] > 0:
            self.conv_in = nn.Conv2d(p.in_channels, widths[0], 3, 1, 1)
        # stage 0 is empty: the input conv already downsamples into stage 1 (DC-AE 1.5, DC-AE-in
        # 1.0)
        else:
            self.conv_in = DownBlock(p.in_channels, widths[1], unshuffle, shortcut=False)
        self.down_blocks = nn.ModuleList()
        for i, (w, n) in enumerate(zip(widths, depths)):
            stage = [
                make_block(
                    p.encoder_block_types[i], w, p, p.encoder_qkv_multiscales[i], "rms_norm", "silu"
                )
                for _ in range(n)
            ]
            if i < len(widths) - 1 and n > 0:
                stage.append(DownBlock(w, widths[i + 1], unshuffle, shortcut=True))
            self.down_blocks.append(nn.Sequential(*stage))
        self.conv_out = nn.Conv2d(widths[-1], p.latent_channels, 3, 1, 1)
        self.out_shortcut = p.encoder_out_shortcut
        self.out_group = widths[-1] // p.latent_channels

    def forward(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down_blocks:
            h = stage(h)  # (B, width, H/2^i, W/2^i)
        c = channels or self.conv_out.out_channels
        # DC-AE 1.5 AdaptiveOutputConvLayer: only the first c output filters, i.e. the first c
        # latent channels
        # (B, c, H/f, W/f)
        z = F.conv2d(h, self.conv_out.weight[:c], self.conv_out.bias[:c], padding=1)
        if self.out_shortcut:  # DC-AE 1.0: + mean over groups of width/C channels
            z = z + h.unflatten(1, (-1, self.out_group)).mean(2)
        return z


class Decoder(nn.Module):
    """conv_in from c <= C channels (sliceable in DC-AE 1.5) -> stages (UpBlock, then blocks) ->
    norm, act, conv."""

    def __init__(self, p: DCAEParams):
        super().__init__()
        widths, depths = p.decoder_block_out_channels, p.decoder_layers_per_block
        shuffle = p.upsample_block_type == "pixel_shuffle"
        self.conv_in = nn.Conv2d(p.latent_channels, widths[-1], 3, 1, 1)
        self.in_shortcut = p.decoder_in_shortcut
        self.in_repeats = widths[-1] // p.latent_channels
        self.up_blocks = nn.ModuleList()  # index i = stage i; run from the last stage to the first
        for i, (w, n) in enumerate(zip(widths, depths)):
            stage = (
                [UpBlock(widths[i + 1], w, shuffle, shortcut=True)]
                if i < len(widths) - 1 and n > 0
                else []
            )
            norm, act = p.decoder_norm_types[i], p.decoder_act_fns[i]
            stage += [
                make_block(p.decoder_block_types[i], w, p, p.decoder_qkv_multiscales[i], norm, act)
                for _ in range(n)
            ]
            self.up_blocks.append(nn.Sequential(*stage))
        out_width = widths[0] if depths[0] > 0 else widths[1]
        self.norm_out = RMSNorm2d(out_width)
        self.conv_act = make_act(p.decoder_conv_act_fn)
        if depths[0] > 0:
            self.conv_out = nn.Conv2d(out_width, p.in_channels, 3, 1, 1)
        else:  # mirror of the encoder's conv_in: upsample straight to RGB
            self.conv_out = UpBlock(out_width, p.in_channels, shuffle, shortcut=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = z.shape[1]
        # DC-AE 1.5 AdaptiveInputConvLayer: only the first c input filters; equal to zero-filling
        # channels c..C-1
        # (B, width, h, w)
        h = F.conv2d(z, self.conv_in.weight[:, :c], self.conv_in.bias, padding=1)
        if self.in_shortcut:  # DC-AE 1.0: + each latent channel repeated width/C times
            h = h + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in reversed(self.up_blocks):
            h = stage(h)
        return self.conv_out(self.conv_act(self.norm_out(h)))  # (B, 3, H, W)


# ----------------------------------------------------------------------------------------------------------------
# the autoencoder


class DCAE(nn.Module):
    """DC-AE 1.0 / 1.5 with the project's AE interface (models/autoencoder.py): encode, decode,
    tiling, loading."""

    def __init__(self, params: DCAEParams, tile_px: int | None = 1024):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.spatial_factor = 2 ** (len(params.encoder_block_out_channels) - 1)  # f
        self.latent_channels = params.latent_channels  # C
        # Channel prefixes are well defined only without the shortcuts around the latent (DC-AE
        # 1.5's structured latent space).
        self.adaptive = not (params.encoder_out_shortcut or params.decoder_in_shortcut)
        self.tile_px = tile_px  # images larger than this are encoded / decoded in overlapping tiles
        # overlap of the tiles; None: a quarter of tile_px, whatever it is
        self.tile_overlap_px: int | None = None

    def config(self) -> dict:
        """The diffusers config.json of this model."""
        return {"_class_name": "AutoencoderDC", **dataclasses.asdict(self.params)}

    def _check_channels(self, c: int) -> None:
        C = self.latent_channels
        if not 1 <= c <= C:
            raise ValueError(f"DC-AE: {c} latent channels requested; this AE has C={C}")
        if c < C and not self.adaptive:
            raise ValueError(
                f"DC-AE: {c} < C={C} latent channels needs an adaptive (DC-AE 1.5) AE; this one has shortcuts "
                "around the latent (encoder_out_shortcut / decoder_in_shortcut), so channel prefixes are undefined"
            )

    def encode(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> model-ready latents (B, c, H/f, W/f), c = channels or
        C."""
        f, c = self.spatial_factor, channels or self.latent_channels
        check_image_size(x.shape[-2], x.shape[-1], f, "DC-AE encode")
        self._check_channels(c)
        x = x.to(self.encoder.conv_out.weight.dtype)
        if self.tile_px and max(x.shape[-2:]) > self.tile_px:
            z = tiled(lambda t: self.encoder(t, c), x, self.tile_px, self.overlap_px, 1 / f)
        else:
            z = self.encoder(x, c)
        return z * self.params.scaling_factor

    def decode(self, z: torch.Tensor, progress=None) -> torch.Tensor:
        """Model-ready latents (B, c, h, w), any c <= C for adaptive AEs -> images (B, 3, h·f, w·f)
        in about [-1, 1]. `progress(done, total)` is called after each tile of a tiled decode."""
        f = self.spatial_factor
        self._check_channels(z.shape[1])
        z = z.to(self.decoder.conv_in.weight.dtype) / self.params.scaling_factor
        if self.tile_px and max(z.shape[-2:]) * f > self.tile_px:
            return tiled(self.decoder, z, self.tile_px // f, self.overlap_px // f, f, progress)
        return self.decoder(z)

    @property
    def overlap_px(self) -> int:
        return self.tile_overlap_px or self.tile_px // 4

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device="cpu", tile_px: int | None = 1024) -> DCAE:
        """Build on the meta device from config.json, then strictly assign the safetensors weights."""
        config = read_config(folder, "DC-AE (diffusers AutoencoderDC)")
        if config.get("_class_name") != "AutoencoderDC":
            raise ValueError(
                f"{Path(folder) / 'config.json'} has _class_name {config.get('_class_name')!r}; expected "
                "'AutoencoderDC' (use models.autoencoder.load_autoencoder to open any AE)"
            )
        with torch.device("meta"):
            model = cls(DCAEParams.from_config(config), tile_px=tile_px)
        load_weights(model, read_state_dict(folder, dtype=dtype, device=device), "DC-AE")
        return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# presets (DC-Gen dc_gen/aecore/models/dc_ae.py; diffusers scripts/convert_dcae_to_diffusers.py)

_RES, _EVIT = "ResBlock", "EfficientViTBlock"


# DC-AE 1.0 "in"/"mix": ResBlock x3 then EfficientViT, BatchNorm+ReLU low stages
def _dcae10(widths, enc, dec, scale):
    n = len(widths)
    return DCAEParams(
        latent_channels=32 if n == 6 else 128,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=enc,
        decoder_layers_per_block=dec,
        encoder_block_types=(_RES,) * 3 + (_EVIT,) * (n - 3),
        decoder_block_types=(_RES,) * 3 + (_EVIT,) * (n - 3),
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * (n - 3),
        decoder_act_fns=("relu",) * 3 + ("silu",) * (n - 3),
        scaling_factor=scale,
    )


# DC-AE 1.5: ResBlock only, no latent shortcuts (adaptive)
def _dcae15(widths, depths, latent, scale=1.0):
    n = len(widths)
    return DCAEParams(
        latent_channels=latent,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=depths,
        decoder_layers_per_block=depths,
        encoder_block_types=(_RES,) * n,
        decoder_block_types=(_RES,) * n,
        encoder_qkv_multiscales=((),) * n,
        decoder_qkv_multiscales=((),) * n,
        decoder_norm_types=("rms_norm",) * n,
        decoder_act_fns=("silu",) * n,
        decoder_conv_act_fn="silu",
        encoder_out_shortcut=False,
        decoder_in_shortcut=False,
        scaling_factor=scale,
    )


PRESETS = {
    # DC-AE 1.0 (mit-han-lab/dc-ae-*-diffusers). The 1K DC-Gen-FLUX uses an f32c32 (which one is
    # unconfirmed).
    "dc-ae-f32c32-in-1.0": _dcae10(
        (128, 256, 512, 512, 1024, 1024), (0, 4, 8, 2, 2, 2), (0, 5, 10, 2, 2, 2), 0.3189
    ),
    "dc-ae-f64c128-in-1.0": _dcae10(
        (128, 256, 512, 512, 1024, 1024, 2048),
        (0, 4, 8, 2, 2, 2, 2),
        (0, 5, 10, 2, 2, 2, 2),
        0.2889,
    ),
    # SANA's AE: EfficientViT stages with 5x5 multi-scale aggregation, stride-2 conv down,
    # nearest+conv up.
    "dc-ae-f32c32-sana-1.1": DCAEParams(
        downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407
    ),
    # DC-AE 1.5 (dc-ai/dc-ae-1.5-*; official dc_ae_f32_1_5 / dc_ae_f64_1_5). NOTE(deviation): no
    # diffusers config of 1.5 is public; this is our inferred mapping of dc_ae_f64_1_5. f64c128's
    # 0.5935 is the ImageNet value; f32c128's factor is unknown (1.0 here): a real folder's
    # config.json always wins.
    "dc-ae-1.5-f32c128": _dcae15((128, 256, 512, 512, 1024, 1024), (0, 5, 10, 4, 4, 4), 128),
    "dc-ae-1.5-f64c128": _dcae15(
        (128, 256, 512, 512, 1024, 1024, 1024), (0, 5, 10, 4, 4, 4, 4), 128, 0.5935
    ),
    # Toy zoo: DC-Gen's f32 and f64 roles, trainable on a 2-core CPU in minutes (docs/toy-zoo.md).
    "toy-f32c16": _dcae15((8, 16, 32, 32, 64, 64), (0, 1, 1, 1, 1, 1), 16),
    "toy-f64c32": _dcae15((8, 16, 32, 32, 64, 64, 64), (0, 1, 1, 1, 1, 1, 1), 32),
    # the few- and many-channel twins of toy-f32c16 (runs/c2i_toy.sh: DC-AE 1.5 Fig. 1b in miniature)
    "toy-f32c4": _dcae15((8, 16, 32, 32, 64, 64), (0, 1, 1, 1, 1, 1), 4),
    "toy-f32c64": _dcae15((8, 16, 32, 32, 64, 64), (0, 1, 1, 1, 1, 1), 64),
    # tests: a 1.0-type f8 AE with ResBlock and EfficientViT stages, multi-scale attention,
    # BatchNorm and shortcuts
    "tiny": DCAEParams(
        latent_channels=4,
        encoder_block_out_channels=(8, 16, 32, 32),
        decoder_block_out_channels=(8, 16, 32, 32),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        encoder_block_types=(_RES, _RES, _EVIT, _EVIT),
        decoder_block_types=(_RES, _RES, _EVIT, _EVIT),
        encoder_qkv_multiscales=((), (), (5,), (3,)),
        decoder_qkv_multiscales=((), (), (), (5,)),
        decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
        decoder_act_fns=("relu", "relu", "silu", "silu"),
        attention_head_dim=8,
        scaling_factor=0.5,
    ),
    "tiny-1.5": _dcae15((8, 16, 16, 32), (0, 1, 1, 1), 8, 0.7),
}
