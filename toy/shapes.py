"""Procedural captioned shapes: the toy zoo's training data and prompts, rendered at any resolution.

    ds = ShapesDataset(size_px=256, seed=0)  # ds[i] = {"image": (3, H, W) in [-1, 1], "caption"}
    ds.scene(i).spec.caption    # 'a red circle above a blue square on a white background'
    render(scene, 4096)         # the same scene at any size, anti-aliased (vector-like)
    specs = eval_specs(200)     # held-out prompts (a split no training scene uses)

Two objects, six colours, four shapes, four relations, three plain backgrounds
(6·5·4·4·4·3 = 5760 captions). Objects are 20-32% of the image wide, so they survive f32/f64
compression at 256-512 px. Every edge is drawn from a signed distance function, so any resolution
renders crisply. toy/score.py checks an image against its caption.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import zlib

import numpy as np
import torch

from data import to_tensor

# ------------------------------------------------------------------------------------------------
# the vocabulary: colours (RGB), backgrounds, shapes (as signed distance functions), relations

COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 128, 0),
    "yellow": (255, 230, 0),
    "green": (30, 170, 60),
    "blue": (30, 70, 230),
    "purple": (150, 50, 200),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
RELATIONS = ("above", "below", "left of", "right of")
SQRT3_2 = math.sqrt(3) / 2  # height / width of the equilateral triangle


# Signed distance (negative inside) from a shape of width s centred (bounding box) at the origin,
# at offsets dx, dy (y points down), all in units of the image side. Polygons use the max of their
# edge half-planes: exact near the edges, which is all anti-aliasing needs.
def _circle(dx, dy, s):
    return np.hypot(dx, dy) - s / 2


def _square(dx, dy, s):
    return np.maximum(np.abs(dx), np.abs(dy)) - s / 2


def _diamond(dx, dy, s):  # a square turned 45 degrees, corner to corner = s
    return (np.abs(dx) + np.abs(dy) - s / 2) / math.sqrt(2)


def _triangle(dx, dy, s):  # equilateral, apex up: apex (0, -h/2), base corners (±s/2, h/2)
    h = SQRT3_2 * s
    # the slanted edges (their outward normals have length s)
    side = (h * np.abs(dx) - s / 2 * (dy + h / 2)) / s
    return np.maximum(dy - h / 2, side)


SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "diamond": _diamond}
# bounding-box height / width
ASPECT = {"circle": 1.0, "square": 1.0, "triangle": SQRT3_2, "diamond": 1.0}


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a caption says: object a stands in `relation` to object b, on a plain background."""

    color_a: str
    shape_a: str
    relation: str
    color_b: str
    shape_b: str
    background: str

    @property
    def caption(self) -> str:
        return (
            f"a {self.color_a} {self.shape_a} {self.relation} a {self.color_b} {self.shape_b} "
            f"on a {self.background} background"
        )


@dataclasses.dataclass(frozen=True)
class Obj:
    """One drawn object: bounding-box centre (x right, y down) and width, in image-side units."""

    shape: str
    color: str
    x: float
    y: float
    size: float


@dataclasses.dataclass(frozen=True)
class Scene:
    spec: Spec
    a: Obj
    b: Obj


_CAPTION = re.compile(
    rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(RELATIONS)}) "
    rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) on a ({'|'.join(BACKGROUNDS)}) background"
)


def parse_caption(text: str) -> Spec:
    """The Spec of a caption of this dataset; a ValueError gives the grammar if it does not fit."""
    m = _CAPTION.fullmatch(text.strip().lower())
    if m is None:
        raise ValueError(
            f"not a shapes caption: {text!r}; expected 'a <color> <shape> <relation> a <color> "
            f"<shape> on a <background> background' with colors {list(COLORS)}, shapes "
            f"{list(SHAPES)}, relations {list(RELATIONS)}, backgrounds {list(BACKGROUNDS)}"
        )
    return Spec(*m.groups())


# (side of a, side of b): 0 top, 1 bottom, 2 left, 3 right
SIDES = {"above": (0, 1), "below": (1, 0), "left of": (2, 3), "right of": (3, 2)}


def caption_roles(text: str) -> list[int]:
    """Per word of a caption (as the toy tokenizer splits it): the side of the picture its object
    stands on, for colour and shape words (0 top, 1 bottom, 2 left, 3 right), else -1.

    Read off the caption's grammar alone: 'a red circle above a blue square' puts red and circle on
    top, blue and square at the bottom.
    """
    spec = parse_caption(text)
    side_a, side_b = SIDES[spec.relation]
    n_rel = len(spec.relation.split())
    roles = [-1] * (10 + n_rel)  # a C S <relation> a C S on a B background
    roles[1] = roles[2] = side_a
    roles[4 + n_rel] = roles[5 + n_rel] = side_b
    return roles


# ------------------------------------------------------------------------------------------------
# scenes: a train / test split of the captions, random layouts, the resolution-independent renderer


def split_of(spec: Spec) -> str:
    """'test' for about 1/8 of the captions (held out of training), else 'train'.

    The key is the canonical form of the scene ('b below a' == 'a above b'), so a held-out scene
    cannot be seen in training under its mirrored wording.
    """
    flip = {"below": "above", "right of": "left of"}
    if spec.relation in flip:
        a, b = (spec.color_b, spec.shape_b), (spec.color_a, spec.shape_a)
        spec = Spec(*a, flip[spec.relation], *b, spec.background)
    return "test" if zlib.crc32(spec.caption.encode()) % 8 == 0 else "train"


def all_specs(split: str = "all") -> list[Spec]:
    """Every caption of the dataset (two different colours per scene), in a fixed order."""
    specs = [
        Spec(ca, sa, r, cb, sb, bg)
        for ca, cb in itertools.permutations(COLORS, 2)
        for sa, sb, r, bg in itertools.product(SHAPES, SHAPES, RELATIONS, BACKGROUNDS)
    ]
    return [s for s in specs if split == "all" or split_of(s) == split]


def eval_specs(n: int = 200, seed: int = 0, split: str = "test") -> list[Spec]:
    """n distinct held-out specs (prompts for evaluation), in a seeded random order."""
    specs = all_specs(split)
    assert n <= len(specs), f"only {len(specs)} {split} specs, {n} requested"
    order = np.random.default_rng(seed).permutation(len(specs))
    return [specs[i] for i in order[:n]]


def random_scene(spec: Spec, rng: np.random.Generator) -> Scene:
    """A random layout for `spec`: a in the first third of the relation's axis, b in the last."""
    size_a, size_b = rng.uniform(0.20, 0.32, 2)
    # centres along the relation's axis
    near, far = rng.uniform(0.20, 0.32), rng.uniform(0.68, 0.80)
    # the other axis: |difference| < 0.3 < along-axis gap 0.36
    across_a, across_b = rng.uniform(0.35, 0.65, 2)
    side_a = SIDES[spec.relation][0]  # 0 top, 1 bottom, 2 left, 3 right
    along_a, along_b = (far, near) if side_a % 2 else (near, far)
    horizontal = side_a >= 2
    xa, ya = (along_a, across_a) if horizontal else (across_a, along_a)
    xb, yb = (along_b, across_b) if horizontal else (across_b, along_b)
    a = Obj(spec.shape_a, spec.color_a, xa, ya, size_a)
    b = Obj(spec.shape_b, spec.color_b, xb, yb, size_b)
    return Scene(spec, a, b)


def coverage(obj: Obj, size_px: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `obj` over rows y0:y1, columns x0:x1 of a size_px² image.

    Pixel centres are (i + 0.5) / size_px in image units; coverage = clip(0.5 - sdf·size_px, 0, 1)
    is a box-filtered edge one pixel wide at any resolution, so a 4096² render is as crisp as a
    vector drawing.
    """
    y0, y1, x0, x1 = box
    ys = (np.arange(y0, y1, dtype=np.float64) + 0.5) / size_px - obj.y
    xs = (np.arange(x0, x1, dtype=np.float64) + 0.5) / size_px - obj.x
    sdf = SHAPES[obj.shape](xs[None, :], ys[:, None], obj.size)  # (y1-y0, x1-x0), image units
    return np.clip(0.5 - sdf * size_px, 0.0, 1.0).astype(np.float32)


def render(
    scene: Scene,
    size_px: int,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """The scene as a (size_px, size_px, 3) uint8 RGB image, or only the pixels
    window = (top, left, height, width) of it (a crop of a huge render costs only the crop)."""
    top, left, h, w = window or (0, 0, size_px, size_px)
    img = np.empty((h, w, 3), np.float32)
    img[:] = BACKGROUNDS[scene.spec.background]
    for obj in (scene.a, scene.b):
        half = obj.size / 2 * size_px + 2  # bounding box + 2 px, clipped to the window
        y0 = max(top, int(obj.y * size_px - half))
        x0 = max(left, int(obj.x * size_px - half))
        y1 = min(top + h, math.ceil(obj.y * size_px + half))
        x1 = min(left + w, math.ceil(obj.x * size_px + half))
        if y1 <= y0 or x1 <= x0:
            continue  # the object is outside the window
        alpha = coverage(obj, size_px, (y0, y1, x0, x1))[..., None]  # (y1 - y0, x1 - x0, 1)
        region = img[y0 - top : y1 - top, x0 - left : x1 - left]
        region[:] = region * (1 - alpha) + np.float32(COLORS[obj.color]) * alpha
    return np.round(img).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# the dataset


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural captioned shapes: item i is a deterministic function of (seed, i); `split` picks
    the captions.

    zoom = (lo, hi) > 1 is for AE training: each item is a random size_px crop of the scene
    rendered at size_px·z, z log-uniform in [lo, hi], so the AE sees edges and flat areas at every
    scale it will meet when decoding large images (an AE trained only on whole 128 px scenes fails
    on 1024 px ones). The caption then describes the whole scene, not the crop.
    """

    def __init__(
        self,
        size_px: int = 256,
        seed: int = 0,
        split: str = "train",
        length: int = 2**31 - 1,
        zoom: tuple[float, float] = (1.0, 1.0),
    ):
        assert split in ("train", "test", "all"), f"split must be train, test or all, got {split!r}"
        assert 1 <= zoom[0] <= zoom[1], f"zoom must be (lo, hi) with 1 <= lo <= hi, got {zoom}"
        self.size_px = size_px
        self.seed = seed
        self.split = split
        self.length = length
        self.zoom = zoom
        self.specs = all_specs(split)

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> Scene:
        rng = np.random.default_rng([self.seed, i])
        return random_scene(self.specs[rng.integers(len(self.specs))], rng)

    def __getitem__(self, i: int) -> dict:
        scene, s = self.scene(i), self.size_px
        if self.zoom == (1.0, 1.0):
            return {"image": to_tensor(render(scene, s)), "caption": scene.spec.caption}
        rng = np.random.default_rng([self.seed, i, 1])  # a stream of its own: scene(i) stays
        log_zoom = rng.uniform(math.log(self.zoom[0]), math.log(self.zoom[1]))
        full = round(s * math.exp(log_zoom))
        top, left = rng.integers(0, full - s + 1, 2)
        image = to_tensor(render(scene, full, (top, left, s, s)))
        return {"image": image, "caption": scene.spec.caption}
