"""What every autoencoder of this project shares: the image-size check, tiled encode/decode with overlap blending,
and `load_autoencoder`, which opens any diffusers-format AE folder (FLUX VAE or DC-AE) with one call.

The interface that align.py, lora.py and sample.py rely on, implemented by `models.dcae.DCAE` and `models.vae.VAE`:

    z = ae.encode(x, channels=None)  # x (B, 3, H, W) in [-1, 1] -> z (B, c, H/f, W/f), model-ready (scaled inside)
    x = ae.decode(z)                 # any c <= C channels for adaptive (DC-AE 1.5) AEs -> x (B, 3, H, W) in [-1, 1]
    ae.spatial_factor, ae.latent_channels, ae.adaptive   # f, C, and whether channel prefixes are allowed
    ae.tile_px                       # tile size in pixels for images larger than it (None: never tile)
    ae.config()                      # the diffusers config.json dict (with _class_name) to save next to the weights

A stage writes its AE with `common.save_pretrained(folder, ae.state_dict(), ae.config())`, so our own AEs and the
released ones are read by the same `load_autoencoder`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from models.loading import read_config

# ----------------------------------------------------------------------------------------------------------------
# input checks


def nearest_multiples(n: int, f: int) -> str:
    """The valid sizes nearest n, as text: n itself if it is a positive multiple of f, else the multiples of f just
    below and above it (just f for n <= f)."""
    lo = max(n // f * f, 0)
    return f"{n}" if lo == n > 0 else f"{f}" if lo == 0 else f"{lo} or {lo + f}"


def check_image_size(h: int, w: int, f: int, what: str) -> None:
    """Raise a ValueError naming the nearest valid sizes when h or w is not a multiple of the spatial factor f."""
    if h % f == 0 and w % f == 0 and h > 0 and w > 0:
        return
    raise ValueError(
        f"{what}: image size {h}x{w} (HxW) is not a multiple of its spatial factor f={f}; "
        f"nearest valid sizes: height {nearest_multiples(h, f)}, width {nearest_multiples(w, f)}"
    )


# ----------------------------------------------------------------------------------------------------------------
# tiling: overlapping tiles, each processed alone, blended with linear ramps (weights normalised to sum to 1)
#
# Large images do not fit in memory in one pass (a 4096² DC-AE decode holds 1024-channel maps at 256²). We cut the
# input into tiles of `tile` samples that overlap by `overlap`, run `fn` on each, and blend the outputs: at an edge it
# shares with a neighbour, a tile's weight is 0 over the outer quarter of the overlap (where its convolutions saw
# zero padding instead of the neighbour's content), then rises linearly to 1 over the middle half; the canvas is
# divided by the summed weights, so each output pixel is a convex mix of the tiles that saw it. diffusers' blend_v /
# blend_h ramp over the whole overlap, edge included; its default 512 px tiles seam on large flat areas at 4K
# (diffusers PR #10510 discussion), hence our 1024 px default. On the demo (zoo/dcgen-4k at 4096 px) the margin
# takes the tiled decode from 49.4 to 52.6 dB PSNR against the one-pass decode (max error 51 -> 31 of 255).


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles covering [0, length): stride tile - overlap, the last tile flush with the end."""
    if length <= tile:
        return [0]
    assert 0 <= overlap < tile, f"tile overlap {overlap} must be smaller than the tile {tile}"
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def blend_ramp(n: int, overlap: int, device: torch.device, start=True, end=True) -> torch.Tensor:
    """Weights along one tile axis of n samples, ramped at the edges shared with a neighbour (`start`, `end`): 0 for
    the first m = overlap // 4 samples from the edge, then (k - m + 1) / (overlap - 2m + 1) for the k-th, capped at 1.

    Two neighbours overlapping by `overlap` or more get weights that sum to 1 (or, overlapping by more, to >= 1)
    at every shared sample, so every sample has weight.
    """
    i = torch.arange(n, device=device, dtype=torch.float32)
    m, w = overlap // 4, torch.ones(n, device=device)
    for shared, k in ((start, i), (end, n - 1 - i)):  # k: distance from that edge
        if shared:
            w = torch.minimum(w, ((k - m + 1) / (overlap - 2 * m + 1)).clamp(0.0, 1.0))
    return w


def tiled(fn: Callable, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply `fn` to overlapping (tile x tile) windows of x (B, C, H, W) and blend the results.

    `fn` maps a window (B, C, h, w) to (B, C', h·scale, w·scale): scale = f for a decoder, 1/f for an encoder.
    """
    H, W = x.shape[-2:]
    out = weight = dtype = None
    ov = round(overlap * scale)  # the overlap in output samples
    for y0 in tile_starts(H, tile, overlap):
        for x0 in tile_starts(W, tile, overlap):
            t = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])  # (B, C', th, tw)
            dtype, t = t.dtype, t.float()  # blend in fp32, return in the model's dtype
            th, tw = t.shape[-2:]
            if out is None:
                out = t.new_zeros(*t.shape[:2], round(H * scale), round(W * scale))  # (B, C', H', W')
                weight = t.new_zeros(round(H * scale), round(W * scale))  # (H', W')
            ramp_y = blend_ramp(th, ov, t.device, start=y0 > 0, end=y0 + tile < H)  # ramps at shared edges only
            ramp_x = blend_ramp(tw, ov, t.device, start=x0 > 0, end=x0 + tile < W)
            w = ramp_y[:, None] * ramp_x[None, :]  # (th, tw)
            Y0, X0 = round(y0 * scale), round(x0 * scale)
            out[..., Y0 : Y0 + th, X0 : X0 + tw] += t * w
            weight[Y0 : Y0 + th, X0 : X0 + tw] += w
    return (out / weight).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# loading: config.json's _class_name picks the class


def build_autoencoder(config: dict, tile_px: int | None = 1024):
    """A randomly initialised AE (on the current default device) from a diffusers config dict."""
    # imported here, not at the top: dcae.py and vae.py import this module's helpers
    from models.dcae import DCAE, DCAEParams
    from models.vae import VAE, VAEParams

    kind = config.get("_class_name")
    if kind == "AutoencoderDC":
        return DCAE(DCAEParams.from_config(config), tile_px=tile_px)
    if kind == "AutoencoderKL":
        return VAE(VAEParams.from_config(config), tile_px=tile_px)
    raise ValueError(
        f"config.json has _class_name {kind!r}; expected an autoencoder: 'AutoencoderKL' (the FLUX VAE) or "
        "'AutoencoderDC' (DC-AE 1.0 / 1.5)"
    )


def load_autoencoder(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tile_px: int | None = 1024,
):
    """Load a diffusers-format AE folder (config.json + safetensors): AutoencoderKL -> VAE, AutoencoderDC -> DCAE.

    dtype None keeps the stored dtype, except fp16/bf16 weights on a CPU, which are upcast to fp32: CPU convolutions
    have no fast half-precision path (the zoo's f64 AE encodes a 4096 px image in 447 s in fp16, 3.4 s in fp32).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is a pipeline folder; pass its autoencoder sub-folder {folder / 'vae'}")
    kind = read_config(folder, "diffusers autoencoder (AutoencoderKL or AutoencoderDC)").get("_class_name")
    from models.dcae import DCAE
    from models.vae import VAE

    if kind in ("AutoencoderDC", "AutoencoderKL"):
        ae = (DCAE if kind == "AutoencoderDC" else VAE).from_pretrained(folder, dtype, device, tile_px=tile_px)
        half = next(ae.parameters()).dtype in (torch.float16, torch.bfloat16)
        return ae.float() if dtype is None and half and torch.device(device).type == "cpu" else ae
    raise ValueError(
        f"{folder}/config.json has _class_name {kind!r}; expected an autoencoder folder: 'AutoencoderKL' (the FLUX "
        "VAE) or 'AutoencoderDC' (DC-AE 1.0 / 1.5)"
    )
