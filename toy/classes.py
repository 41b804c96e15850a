"""The class-conditional toy: one object per image, class = colour × shape (6 · 4 = 24 classes, ImageNet's role),
on a white background, and a scorer that checks an image shows its class.

    ds = ClassDataset(size_px=128, seed=0)     # ds[i] = {"image": (3, H, W) in [-1, 1], "caption", "label"}
    LabelEncoder()(["a red circle"])           # {"label": tensor([0])}: the cache's conditioning (align.py)
    correct(image, label)                      # the largest blob of the class colour has the class shape
"""

from __future__ import annotations

import numpy as np
import torch

from data import to_tensor
from toy.score import MAX_DIST, MIN_AREA, PALETTE, _as_rgb, _classify, _largest_blob
from toy.shapes import COLORS, SHAPES, Obj, Scene, Spec, render

CLASSES = [(c, s) for c in COLORS for s in SHAPES]  # label k = (colour, shape)
ID2LABEL = {str(k): f"{c} {s}" for k, (c, s) in enumerate(CLASSES)}


def scene_of(label: int, rng: np.random.Generator) -> Scene:
    """One object of the class, 35-55 % of the image wide, anywhere it fits."""
    color, shape = CLASSES[label]
    size = rng.uniform(0.35, 0.55)
    x, y = rng.uniform(size / 2 + 0.02, 1 - size / 2 - 0.02, 2)
    obj = Obj(shape, color, x, y, size)
    # render() draws spec.background and the objects a and b: b is the same object drawn twice
    return Scene(Spec(color, shape, "above", color, shape, "white"), obj, obj)


class ClassDataset(torch.utils.data.Dataset):
    """Item i is a deterministic function of (seed, i): a uniformly drawn class, a random layout."""

    def __init__(self, size_px=128, seed=0, split: str = "train", length: int = 2**31 - 1):
        # held-out rows ("test"): another seed (the classes are the same)
        self.size_px, self.seed, self.length = size_px, seed + (split == "test"), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i, 7])
        label = int(rng.integers(len(CLASSES)))
        image = to_tensor(render(scene_of(label, rng), self.size_px))
        return {"image": image, "caption": ID2LABEL[str(label)], "label": label}


class LabelEncoder:
    """The cache stage's "text encoder" for class-conditional models: captions (class names) to
    {"label": ids}; the null embedding is the CFG null class (index len(CLASSES))."""

    id2label = ID2LABEL  # written into the cache's meta.json, then into the model folders

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        ids = {v: int(k) for k, v in ID2LABEL.items()}
        return {"label": torch.tensor([ids[c] for c in captions])}

    def null(self, batch: int) -> dict[str, torch.Tensor]:
        return {"label": torch.full((batch,), len(CLASSES))}


def correct(image, label: int) -> bool:
    """toy/score.py's checks for one object: a blob of the class colour (at least MIN_AREA of the
    image) whose shape, by template IoU, is the class shape."""
    color, shape = CLASSES[label]
    img = _as_rgb(image)
    names = list(PALETTE)
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32)
    d, nearest = torch.cdist(img.reshape(-1, 3), palette).min(1)
    side = img.shape[0]
    mask = (nearest.view(side, side) == names.index(color)) & (d.view(side, side) < MAX_DIST)
    blob = _largest_blob(mask)
    return bool(blob.float().mean().item() >= MIN_AREA and _classify(blob) == shape)
