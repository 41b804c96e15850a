"""What the AEs (models/dcae.py, models/vae.py) share below their interface: the image-size check, and `tiled`, which
runs an encoder or decoder on overlapping tiles of an image larger than the AE's `tile_px` and blends the results,
and `reuse_freed_memory`, which keeps the tiles' activations from being faulted in again."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

# ----------------------------------------------------------------------------------------------------------------
# input checks


def nearest_multiples(n: int, f: int) -> str:
    """The valid sizes nearest n, as text: n itself if it is a positive multiple of f, else the
    multiples of f just below and above it (just f for n <= f)."""
    lo = max(n // f * f, 0)
    return f"{n}" if lo == n > 0 else f"{f}" if lo == 0 else f"{lo} or {lo + f}"


def check_image_size(h: int, w: int, f: int, what: str) -> None:
    """Raise a ValueError naming the nearest valid sizes when h or w is not a multiple of the
    spatial factor f."""
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
    """Offsets of tiles covering [0, length): stride tile - overlap, the last tile flush with the
    end."""
    if length <= tile:
        return [0]
    assert 0 <= overlap < tile, f"tile overlap {overlap} must be smaller than the tile {tile}"
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def blend_ramp(n: int, overlap: int, device: torch.device, start=True, end=True) -> torch.Tensor:
    """Weights along one tile axis of n samples, ramped at the edges shared with a neighbour
        (`start`, `end`): 0 for the first m = overlap // 4 samples from the edge, then (k - m + 1) /
        (overlap - 2m + 1) for the k-th, capped at 1.

    Two neighbours overlapping by `overlap` or more get weights that sum to 1 (or, overlapping by
        more, to >= 1) at every shared sample, so every sample has weight."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    m, w = overlap // 4, torch.ones(n, device=device)
    for shared, k in ((start, i), (end, n - 1 - i)):  # k: distance from that edge
        if shared:
            w = torch.minimum(w, ((k - m + 1) / (overlap - 2 * m + 1)).clamp(0.0, 1.0))
    return w


def tiled(
    fn: Callable,
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Apply `fn` to overlapping (tile x tile) windows of x (B, C, H, W) and blend the results.

    `fn` maps a window (B, C, h, w) to (B, C', h·scale, w·scale): scale = f for a decoder, 1/f for
        an encoder. `progress(done, total)` is called after each tile (a long decode shows it)."""
    H, W = x.shape[-2:]
    out = weight = dtype = None
    ov = round(overlap * scale)  # the overlap in output samples
    starts = [
        (y0, x0) for y0 in tile_starts(H, tile, overlap) for x0 in tile_starts(W, tile, overlap)
    ]
    for i, (y0, x0) in enumerate(starts):
        t = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])  # (B, C', th, tw)
        dtype, t = t.dtype, t.float()  # blend in fp32, return in the model's dtype
        th, tw = t.shape[-2:]
        if out is None:
            # (B, C', H', W')
            out = t.new_zeros(*t.shape[:2], round(H * scale), round(W * scale))
            weight = t.new_zeros(round(H * scale), round(W * scale))  # (H', W')
        # ramps at shared edges only
        ramp_y = blend_ramp(th, ov, t.device, start=y0 > 0, end=y0 + tile < H)
        ramp_x = blend_ramp(tw, ov, t.device, start=x0 > 0, end=x0 + tile < W)
        w = ramp_y[:, None] * ramp_x[None, :]  # (th, tw)
        Y0, X0 = round(y0 * scale), round(x0 * scale)
        out[..., Y0 : Y0 + th, X0 : X0 + tw] += t * w
        weight[Y0 : Y0 + th, X0 : X0 + tw] += w
        if progress:
            progress(i + 1, len(starts))
    return out.div_(weight).to(dtype)  # in place: a 4096 px canvas is 200 MB


def reuse_freed_memory() -> None:
    """Keep freed memory in the process for the next tensor instead of handing it back to the OS.
    glibc unmaps freed blocks above its mmap threshold and trims the heap's free top, so the tiled
    decode's 4-16 MB activations are faulted in again, page by page, tile after tile: at 4096 px
    1.5 s of system time, a third of the decode. A fixed 32 MB threshold (glibc's largest) and no
    trimming end it; the peak memory is unchanged (docs/performance.md). Process-wide, so the
    scripts call it (sample.py, bench.py), not this module; nothing on other libcs."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
