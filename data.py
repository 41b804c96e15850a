"""Data for every stage: an image folder with captions, the procedural captioned-shapes dataset of the toy zoo, its
scorer (the toy's GenEval: are the named objects there, in the named colours and arrangement?), and a step-indexed
sampler that shards batches over ranks so that a resumed or multi-process run sees exactly the same data.

    ds = ShapesDataset(size_px=256, seed=0)          # ds[i] = {"image": (3, H, W) in [-1, 1], "caption": str}
    ds.scene(i).spec.caption                         # 'a red circle above a blue square on a white background'
    render(scene, 4096)                              # the same scene at any size, anti-aliased (vector-like)
    specs = eval_specs(200)                          # held-out prompts (a split no training scene uses)
    score(image, specs[0])["correct"], accuracy(images, specs)

The procedural scenes are built for the toy zoo: two objects, six colours, four shapes, four relations, three plain
backgrounds (6·5·4·4·4·3 = 5760 captions), objects 20-32% of the image wide so they survive f32/f64 compression at
256-512 px, and every edge drawn from a signed distance function, so any resolution renders crisply.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

# ----------------------------------------------------------------------------------------------------------------
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


# Signed distance (negative inside) from a shape of width s centred (bounding box) at the origin, at offsets dx, dy
# (y points down), all in units of the image side. Polygons use the max of their edge half-planes: exact near the
# edges, which is all anti-aliasing needs.
def _circle(dx, dy, s):
    return np.hypot(dx, dy) - s / 2


def _square(dx, dy, s):
    return np.maximum(np.abs(dx), np.abs(dy)) - s / 2


def _diamond(dx, dy, s):  # a square turned 45 degrees, corner to corner = s
    return (np.abs(dx) + np.abs(dy) - s / 2) / math.sqrt(2)


def _triangle(dx, dy, s):  # equilateral, apex up: apex (0, -h/2), base corners (±s/2, h/2)
    h = SQRT3_2 * s
    side = (h * np.abs(dx) - s / 2 * (dy + h / 2)) / s  # the slanted edges (their outward normals have length s)
    return np.maximum(dy - h / 2, side)


SHAPES = {"circle": _circle, "square": _square, "triangle": _triangle, "diamond": _diamond}
ASPECT = {"circle": 1.0, "square": 1.0, "triangle": SQRT3_2, "diamond": 1.0}  # bounding-box height / width


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
    """One drawn object: bounding-box centre (x right, y down) and width, in units of the image side."""

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
    rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(RELATIONS)}) a ({'|'.join(COLORS)}) "
    rf"({'|'.join(SHAPES)}) on a ({'|'.join(BACKGROUNDS)}) background"
)


def parse_caption(text: str) -> Spec:
    """The Spec of a caption of this dataset; a ValueError says what the grammar is if it does not parse."""
    m = _CAPTION.fullmatch(text.strip().lower())
    if m is None:
        raise ValueError(
            f"not a shapes caption: {text!r}; expected 'a <color> <shape> <relation> a <color> <shape> on a "
            f"<background> background' with colors {list(COLORS)}, shapes {list(SHAPES)}, relations "
            f"{list(RELATIONS)}, backgrounds {list(BACKGROUNDS)}"
        )
    return Spec(*m.groups())


SIDES = {"above": (0, 1), "below": (1, 0), "left of": (2, 3), "right of": (3, 2)}  # (a, b): top, bottom, left, right


def caption_roles(text: str) -> list[int]:
    """Per word of a caption (as the toy tokenizer splits it): the side of the picture its object stands on, for
    colour and shape words (0 top, 1 bottom, 2 left, 3 right), else -1. Read off the caption's grammar alone:
    'a red circle above a blue square' puts red and circle on top, blue and square at the bottom."""
    spec = parse_caption(text)
    side_a, side_b = SIDES[spec.relation]
    n_rel = len(spec.relation.split())
    roles = [-1] * (10 + n_rel)  # a C S <relation> a C S on a B background
    roles[1] = roles[2] = side_a
    roles[4 + n_rel] = roles[5 + n_rel] = side_b
    return roles


# ----------------------------------------------------------------------------------------------------------------
# scenes: a train / test split of the captions, random layouts, and the resolution-independent renderer


def split_of(spec: Spec) -> str:
    """'test' for about 1/8 of the captions (held out of training), else 'train'.

    The key is the canonical form of the scene ('b below a' == 'a above b'), so a held-out scene cannot be seen in
    training under its mirrored wording.
    """
    flip = {"below": "above", "right of": "left of"}
    if spec.relation in flip:
        spec = Spec(spec.color_b, spec.shape_b, flip[spec.relation], spec.color_a, spec.shape_a, spec.background)
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
    """A random layout for `spec`: object a in the first third of the relation's axis, b in the last third."""
    size_a, size_b = rng.uniform(0.20, 0.32, 2)
    near, far = rng.uniform(0.20, 0.32), rng.uniform(0.68, 0.80)  # centres along the relation's axis
    across_a, across_b = rng.uniform(0.35, 0.65, 2)  # the other axis: |difference| < 0.3 < along-axis gap 0.36
    side_a = SIDES[spec.relation][0]  # 0 top, 1 bottom, 2 left, 3 right
    along_a, along_b = (far, near) if side_a % 2 else (near, far)
    horizontal = side_a >= 2
    xa, ya = (along_a, across_a) if horizontal else (across_a, along_a)
    xb, yb = (along_b, across_b) if horizontal else (across_b, along_b)
    return Scene(spec, Obj(spec.shape_a, spec.color_a, xa, ya, size_a), Obj(spec.shape_b, spec.color_b, xb, yb, size_b))


def coverage(obj: Obj, size_px: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `obj` over pixel rows y0:y1 and columns x0:x1 of a size_px² image.

    Pixel centres are (i + 0.5) / size_px in image units; coverage = clip(0.5 - sdf·size_px, 0, 1) is a box-filtered
    edge one pixel wide at any resolution, so a 4096² render is as crisp as a vector drawing.
    """
    y0, y1, x0, x1 = box
    ys = (np.arange(y0, y1, dtype=np.float64) + 0.5) / size_px - obj.y
    xs = (np.arange(x0, x1, dtype=np.float64) + 0.5) / size_px - obj.x
    sdf = SHAPES[obj.shape](xs[None, :], ys[:, None], obj.size)  # (y1-y0, x1-x0), image units
    return np.clip(0.5 - sdf * size_px, 0.0, 1.0).astype(np.float32)


def render(scene: Scene, size_px: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The scene as a (size_px, size_px, 3) uint8 RGB image, or only the pixels window = (top, left, height, width)
    of it (a crop of a huge render costs only the crop)."""
    top, left, h, w = window or (0, 0, size_px, size_px)
    img = np.empty((h, w, 3), np.float32)
    img[:] = BACKGROUNDS[scene.spec.background]
    for obj in (scene.a, scene.b):
        half = obj.size / 2 * size_px + 2  # bounding box + 2 px, clipped to the window
        y0, x0 = (max(lo, int(c * size_px - half)) for c, lo in ((obj.y, top), (obj.x, left)))
        y1, x1 = (min(hi, math.ceil(c * size_px + half)) for c, hi in ((obj.y, top + h), (obj.x, left + w)))
        if y1 <= y0 or x1 <= x0:
            continue  # the object is outside the window
        alpha = coverage(obj, size_px, (y0, y1, x0, x1))[..., None]  # (y1 - y0, x1 - x0, 1)
        region = img[y0 - top : y1 - top, x0 - left : x1 - left]
        region[:] = region * (1 - alpha) + np.float32(COLORS[obj.color]) * alpha
    return np.round(img).astype(np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural captioned shapes: item i is a deterministic function of (seed, i); `split` picks the captions.

    zoom = (lo, hi) > 1 is for AE training: each item is a random size_px crop of the scene rendered at size_px·z,
    z log-uniform in [lo, hi], so the AE sees edges and flat areas at every scale it will meet when decoding large
    images (an AE trained only on whole 128 px scenes fails on 1024 px ones). The caption then describes the whole
    scene, not the crop.
    """

    def __init__(self, size_px: int = 256, seed: int = 0, split: str = "train", length: int = 2**31 - 1,
                 zoom: tuple[float, float] = (1.0, 1.0)):  # fmt: skip
        assert split in ("train", "test", "all"), f"split must be 'train', 'test' or 'all', got {split!r}"
        assert 1 <= zoom[0] <= zoom[1], f"zoom must be (lo, hi) with 1 <= lo <= hi, got {zoom}"
        self.size_px, self.seed, self.split, self.length, self.zoom = size_px, seed, split, length, zoom
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
        rng = np.random.default_rng([self.seed, i, 1])  # a stream of its own: scene(i) stays the same
        full = round(s * math.exp(rng.uniform(math.log(self.zoom[0]), math.log(self.zoom[1]))))
        top, left = rng.integers(0, full - s + 1, 2)
        return {"image": to_tensor(render(scene, full, (top, left, s, s))), "caption": scene.spec.caption}


# ----------------------------------------------------------------------------------------------------------------
# the scorer: colour segmentation -> largest blob per named colour -> shape by template IoU -> relation of centroids

SCORE_PX = 256  # images are scored at 256², whatever their size
MAX_DIST = 90.0  # a pixel counts as a palette colour when nearer to it than this (RGB, 0-255): edges blend out
MIN_AREA = 0.004  # a blob smaller than this fraction of the image is "not there" (the smallest object covers ~2%)
PALETTE = {**COLORS, **BACKGROUNDS}


def _as_rgb(image) -> torch.Tensor:
    """A (3, H, W) tensor in [-1, 1], a (H, W, 3) uint8 array or a PIL image -> (256, 256, 3) float 0-255."""
    if isinstance(image, torch.Tensor):
        image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if pil.size != (SCORE_PX, SCORE_PX):
        pil = pil.convert("RGB").resize((SCORE_PX, SCORE_PX), Image.Resampling.BOX)  # area average
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32))


def _largest_blob(mask: torch.Tensor) -> torch.Tensor:
    """Opening (drops 1-px fringes), then the largest 8-connected component, by max-label propagation."""
    m = mask.float()[None, None]  # (1, 1, H, W)
    m = F.max_pool2d(-F.max_pool2d(-m, 3, 1, 1), 3, 1, 1)[0, 0]  # erode, then dilate
    out = torch.zeros_like(mask)
    if not m.any():
        return out
    ys, xs = torch.nonzero(m, as_tuple=True)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1  # work inside the mask's bounding box only
    m = m[y0:y1, x0:x1]
    labels = torch.arange(1, m.numel() + 1, dtype=torch.float32).view_as(m) * m  # a unique label per pixel
    while True:  # every pixel takes the largest label in its 3x3 neighbourhood until nothing changes
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
    y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
    box = (max(0, y0 - 2), min(SCORE_PX, y1 + 2), max(0, x0 - 2), min(SCORE_PX, x1 + 2))
    crop = blob[box[0] : box[1], box[2] : box[3]].numpy()
    cx, cy, w, h = (x0 + x1) / 2 / SCORE_PX, (y0 + y1) / 2 / SCORE_PX, (x1 - x0) / SCORE_PX, (y1 - y0) / SCORE_PX
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
    """Check an image against its prompt. Returns {"score": fraction of checks passed, "correct": all passed, "checks"}.

    Checks: the background colour; for each object, a blob of its colour (present) and its shape; their relation.
    """
    spec = parse_caption(spec) if isinstance(spec, str) else getattr(spec, "spec", spec)
    img = _as_rgb(image)  # (256, 256, 3)
    names = list(PALETTE)
    dist = torch.cdist(img.view(-1, 3), torch.tensor(list(PALETTE.values()), dtype=torch.float32))  # (N, P)
    d, label = dist.min(1)
    d, label = d.view(SCORE_PX, SCORE_PX), label.view(SCORE_PX, SCORE_PX)  # nearest palette colour per pixel
    border = torch.cat([label[:3].flatten(), label[-3:].flatten(), label[:, :3].flatten(), label[:, -3:].flatten()])
    checks = {"background": names[border.mode().values.item()] == spec.background}
    centroids = []
    for key, color, shape in (("a", spec.color_a, spec.shape_a), ("b", spec.color_b, spec.shape_b)):
        blob = _largest_blob((label == names.index(color)) & (d < MAX_DIST))
        found = blob.float().mean().item() >= MIN_AREA
        checks[f"{key}_color"] = found
        checks[f"{key}_shape"] = found and _classify(blob) == shape
        if found:
            ys, xs = torch.nonzero(blob, as_tuple=True)
            centroids.append((xs.float().mean().item(), ys.float().mean().item()))
    checks["relation"] = len(centroids) == 2 and _relation(*centroids) == spec.relation
    return {"score": sum(checks.values()) / len(checks), "correct": all(checks.values()), "checks": checks}


def accuracy(images, specs) -> float:
    """Fraction of images whose every check passes (GenEval's per-image correctness, averaged)."""
    results = [score(img, s)["correct"] for img, s in zip(images, specs, strict=True)]
    return sum(results) / max(1, len(results))


# ----------------------------------------------------------------------------------------------------------------
# an image folder with captions

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFolder(torch.utils.data.Dataset):
    """Images under `root` (recursively), resized (shorter side) and center-cropped to size_px².

    Captions: a same-named .txt beside each image, or `root/captions.jsonl` with one {"file_name": path relative to
    root, "caption": text} per line. With captions=True every image must have one; with False they may be missing
    (AE training) and come back as "".
    """

    def __init__(self, root: str | Path, size_px: int, captions: bool = True):
        self.root, self.size_px = Path(root), size_px
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) under {self.root}")
        table = {}
        if (self.root / "captions.jsonl").is_file():
            for n, line in enumerate((self.root / "captions.jsonl").read_text().splitlines()):
                if line.strip():
                    rec = json.loads(line)
                    if not {"file_name", "caption"} <= rec.keys():
                        raise ValueError(f"captions.jsonl line {n + 1}: expected keys file_name and caption: {line}")
                    table[rec["file_name"]] = rec["caption"]
        self.captions = []
        for f in self.files:
            txt = f.with_suffix(".txt")
            cap = table.get(f.relative_to(self.root).as_posix())
            self.captions.append(cap if cap is not None else txt.read_text().strip() if txt.is_file() else None)
        missing = [f.name for f, c in zip(self.files, self.captions) if c is None]
        if captions and missing:
            raise ValueError(
                f"{len(missing)} images in {self.root} have no caption (.txt or captions.jsonl): {missing[:5]}"
            )
        self.captions = [c or "" for c in self.captions]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        img = Image.open(self.files[i]).convert("RGB")
        s = self.size_px / min(img.size)  # resize the shorter side to size_px (PIL antialiases when shrinking)
        w, h = max(self.size_px, round(img.width * s)), max(self.size_px, round(img.height * s))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - self.size_px) // 2, (h - self.size_px) // 2
        img = img.crop((left, top, left + self.size_px, top + self.size_px))
        return {"image": to_tensor(np.array(img)), "caption": self.captions[i]}


# ----------------------------------------------------------------------------------------------------------------
# sharding: batches indexed by step, so resuming at step k or running on N ranks sees the same samples


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's batch of dataset indices for step start_step, start_step + 1, ... (forever).

    Global sample number p = (step·world + rank)·batch + j, so ranks never share a sample within a step and the data
    of a step does not depend on where the run (re)started. With shuffle, p walks a fresh permutation of the n items
    each epoch (seeded by seed + epoch, the same on every rank), like DistributedSampler.set_epoch; without it, p is
    the index itself (procedural datasets, where every index is already a fresh random sample).
    """

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0, start_step: int = 0,
                 shuffle: bool = True):  # fmt: skip
        self.n, self.batch, self.rank, self.world = n, batch, rank, world
        self.seed, self.start_step, self.shuffle = seed, start_step, shuffle
        self._epoch, self._perm = -1, None

    def index(self, p: int) -> int:
        if not self.shuffle:
            return p % self.n
        epoch, i = divmod(p, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return self._perm[i]

    def batch_of(self, step: int) -> list[int]:
        """This rank's indices at `step`: a pure function of the step, so a resumed run needs no sampler state."""
        p0 = (step * self.world + self.rank) * self.batch
        return [self.index(p) for p in range(p0, p0 + self.batch)]

    def __iter__(self):
        for step in itertools.count(self.start_step):
            yield self.batch_of(step)


# ----------------------------------------------------------------------------------------------------------------
# the latent cache: what the DiT stages read instead of images


class LatentCache:
    """Rows written by `align.py --stage cache`: per image, its latent under the teacher AE (the base model's) and/or
    the student AE (the deep-compression one) and the text encoder's output for its caption, in safetensors shards,
    plus the empty-prompt ("null") embedding. Training never runs an AE or a text encoder per step (paper.md A.2).

        meta.json        count, shards [{file, rows}], shapes, teacher_ae, student_ae, text (folders), captions
        shard_*.safetensors   teacher (N, C, h, w), student (N, C', h', w'), txt (N, L, D), y (N, D) or txt_mask (N, L)
        null.safetensors      the null embedding, batch 1
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(
                f"{self.folder} is not a latent cache (no meta.json); write one: align.py --stage cache"
            )
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.files = [self.folder / s["file"] for s in self.meta["shards"]]
        rows = torch.tensor([s["rows"] for s in self.meta["shards"]])
        self.starts = torch.cumsum(rows, 0) - rows  # first global row of each shard
        self.null = load_file(self.folder / "null.safetensors")
        self.handles = {}  # shard index -> open safetensors file (memory-mapped, read lazily)

    def __len__(self) -> int:
        return self.meta["count"]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one row of `key`, e.g. the student latent (C, h, w)."""
        if key not in self.meta["shapes"]:
            raise KeyError(f"the cache {self.folder} has no {key!r}; it holds {sorted(self.meta['shapes'])}")
        return tuple(self.meta["shapes"][key])

    def get(self, idx: torch.Tensor | list[int], keys: list[str]) -> dict[str, torch.Tensor]:
        """Rows `idx` (global indices) of each key, stacked: {key: (len(idx), *shape)}."""
        idx = torch.as_tensor(idx)
        shard = torch.searchsorted(self.starts, idx, right=True) - 1
        out = {k: [] for k in keys}
        for i, s in zip(idx.tolist(), shard.tolist()):
            if s not in self.handles:
                self.handles[s] = safe_open(self.files[s], framework="pt")
            for k in keys:
                out[k].append(self.handles[s].get_slice(k)[i - int(self.starts[s])])
        return {k: torch.stack(v) for k, v in out.items()}
