"""The toy's GenEval: does an image show what its shapes caption names? As GenEval (Ghosh et al.,
2023) does for real prompts, each part of the prompt is checked on its own:

    score(image, "a red circle above a blue square on a white background")["correct"]
    accuracy(images, specs)  # fraction of images that pass every check

colour segmentation -> largest blob per named colour -> shape by template IoU -> relation of the
two blobs' centroids; the background from the image border.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from toy.shapes import (
    ASPECT,
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Obj,
    Scene,
    Spec,
    coverage,
    parse_caption,
)

SCORE_PX = 256  # images are scored at 256², whatever their size
MAX_DIST = 90.0  # a pixel is a palette colour when nearer than this (RGB 0-255): edges blend out
MIN_AREA = 0.004  # a blob under this fraction of the image is "not there" (smallest object: ~2%)
PALETTE = {**COLORS, **BACKGROUNDS}


def _as_rgb(image) -> torch.Tensor:
    """A (3, H, W) tensor in [-1, 1], a (H, W, 3) uint8 array or a PIL image -> (256, 256, 3) float
    0-255."""
    if isinstance(image, torch.Tensor):
        image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
        image = image.permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if pil.size != (SCORE_PX, SCORE_PX):
        pil = pil.convert("RGB").resize((SCORE_PX, SCORE_PX), Image.Resampling.BOX)  # area average
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32))


def _largest_blob(mask: torch.Tensor) -> torch.Tensor:
    """Opening (drops 1-px fringes), then the largest 8-connected component, by max-label
    propagation."""
    m = mask.float()[None, None]  # (1, 1, H, W)
    m = F.max_pool2d(-F.max_pool2d(-m, 3, 1, 1), 3, 1, 1)[0, 0]  # erode, then dilate
    out = torch.zeros_like(mask)
    if not m.any():
        return out
    ys, xs = torch.nonzero(m, as_tuple=True)
    # work inside the mask's bounding box only
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = m[y0:y1, x0:x1]
    # a unique label per pixel
    labels = torch.arange(1, m.numel() + 1, dtype=torch.float32).view_as(m) * m
    while True:  # each pixel takes the largest label of its 3x3 neighbourhood until nothing changes
        new = F.max_pool2d(labels[None], 3, 1, 1)[0] * m
        if torch.equal(new, labels):
            break
        labels = new
    counts = torch.bincount(labels.long().flatten())
    counts[0] = 0  # background
    out[y0:y1, x0:x1] = labels == counts.argmax()
    return out


def _classify(blob: torch.Tensor) -> str:
    """The shape whose template, fitted to the blob's bounding box, overlaps the blob best (IoU)."""
    ys, xs = torch.nonzero(blob, as_tuple=True)
    y0, y1 = ys.min().item(), ys.max().item() + 1
    x0, x1 = xs.min().item(), xs.max().item() + 1
    box = (max(0, y0 - 2), min(SCORE_PX, y1 + 2), max(0, x0 - 2), min(SCORE_PX, x1 + 2))
    crop = blob[box[0] : box[1], box[2] : box[3]].numpy()
    cx, cy = (x0 + x1) / 2 / SCORE_PX, (y0 + y1) / 2 / SCORE_PX  # centre, image units
    w, h = (x1 - x0) / SCORE_PX, (y1 - y0) / SCORE_PX
    iou = {}
    for shape in SHAPES:
        template = coverage(Obj(shape, "", cx, cy, max(w, h / ASPECT[shape])), SCORE_PX, box) > 0.5
        iou[shape] = (template & crop).sum() / max(1, (template | crop).sum())
    return max(iou, key=iou.get)


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """The relation of centroid a to centroid b along the axis where they differ most."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def score(image, spec: Spec | Scene | str) -> dict:
    """Check an image against its prompt.

    Returns {"score": fraction of checks passed, "correct": all passed, "checks": {name: bool}}.
    Checks: the background colour; for each object, a blob of its colour (present) and its shape;
    their relation.
    """
    spec = parse_caption(spec) if isinstance(spec, str) else getattr(spec, "spec", spec)
    img = _as_rgb(image)  # (256, 256, 3)
    names = list(PALETTE)
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32)  # (P, 3)
    dist = torch.cdist(img.view(-1, 3), palette)  # (N, P)
    d, label = dist.min(1)
    # the nearest palette colour per pixel, and its distance
    d, label = d.view(SCORE_PX, SCORE_PX), label.view(SCORE_PX, SCORE_PX)
    edges = (label[:3], label[-3:], label[:, :3], label[:, -3:])
    border = torch.cat([e.flatten() for e in edges])
    checks = {"background": names[border.mode().values.item()] == spec.background}
    centroids = []
    objects = (("a", spec.color_a, spec.shape_a), ("b", spec.color_b, spec.shape_b))
    for key, color, shape in objects:
        blob = _largest_blob((label == names.index(color)) & (d < MAX_DIST))
        found = blob.float().mean().item() >= MIN_AREA
        checks[f"{key}_color"] = found
        checks[f"{key}_shape"] = found and _classify(blob) == shape
        if found:
            ys, xs = torch.nonzero(blob, as_tuple=True)
            centroids.append((xs.float().mean().item(), ys.float().mean().item()))
    checks["relation"] = len(centroids) == 2 and _relation(*centroids) == spec.relation
    n_passed = sum(checks.values())
    return {"score": n_passed / len(checks), "correct": all(checks.values()), "checks": checks}


def accuracy(images, specs) -> float:
    """Fraction of images whose every check passes (GenEval's per-image correctness, averaged)."""
    results = [score(img, s)["correct"] for img, s in zip(images, specs, strict=True)]
    return sum(results) / max(1, len(results))
