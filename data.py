"""Data for the stages: image folders with captions, aspect-ratio buckets, the teacher's own samples
of a prompt list, the step-indexed samplers that shard batches over ranks (so that a resumed or
multi-process run sees exactly the same data), and the latent cache the DiT stages train from.

    ds = ImageFolder("path/to/images", size_px=1024)  # ds[i] = {"image": (3, H, W), "caption"}
    sizes = bucket_sizes("f64ms", base=512, multiple=32)  # [(256, 1024), ..., (512, 512), ...]
    sampler = BucketSampler(cache.counts(), batch=16, rank=rank, world=world, seed=seed)
    cache = LatentCache("out/cache/256")  # cache.get(rows, ["student", "txt", "y"], bucket)

The toy zoo's procedural shapes and their scorer live in toy/ (toy/shapes.py, toy/score.py).
The cache's layout and its reasons: docs/data.md.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file

from common import (
    denoise,
    get_noise,
    get_schedule,
    guided_velocity,
    print0,
    save_ckpt,
    shift_for,
)
from models.loading import atomic_write

# ----------------------------------------------------------------------------------------------------------------
# aspect-ratio buckets

# The official managers' buckets, (height, width) px at their base resolution, from DC-Gen's
# dc_ai/apps/utils/aspect_ratio.py (AspectRatioManager512F64MS, which is also AspectRatioManager512;
# AspectRatioManager512F32MS; AspectRatioManager1024, of which the 2048 and 4096 managers are 2x and
# 4x). dc_ai/dc_adapt/data_provider/latent_mixture.py picks one by the run's resolution.
# fmt: off
OFFICIAL_BUCKETS = {
    "f64ms": (512, ((256, 1024), (256, 960), (320, 768), (384, 640), (448, 576), (512, 512),
                    (576, 448), (640, 384), (768, 320), (960, 256), (1024, 256))),
    "f32ms": (512, ((256, 1024), (256, 960), (320, 832), (320, 768), (352, 768), (352, 736),
                    (384, 704), (384, 672), (384, 640), (416, 640), (416, 608), (448, 608),
                    (448, 576), (480, 576), (480, 544), (512, 512), (544, 512), (576, 480),
                    (576, 448), (608, 448), (608, 416), (672, 416), (640, 384), (768, 320),
                    (960, 256), (1024, 256))),
    "ms": (1024, ((512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728),
                  (576, 1664), (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344),
                  (768, 1344), (768, 1280), (832, 1216), (832, 1152), (896, 1152), (896, 1088),
                  (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
                  (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704),
                  (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576),
                  (1856, 512), (1920, 512), (1984, 512), (2048, 512))),
}
# fmt: on


def bucket_sizes(spec: str, base: int, multiple: int) -> list[tuple[int, int]]:
    """The buckets (height, width) px of a cache at `base` px, each side a multiple of `multiple`
    (the AE factor × patch of every model that reads the cache). spec: "square" (base² only), an
    official list ("f64ms", "f32ms", "ms": its sizes scaled by base / its base) or height/width
    ratios "0.6,1,1.67" (sizes of area base², as the official generator of those lists)."""
    if spec == "square":  # as given: today's caches
        return [(base, base)]
    if spec in OFFICIAL_BUCKETS:
        ref, table = OFFICIAL_BUCKETS[spec]
        pairs = [(h * base / ref, w * base / ref) for h, w in table]
    else:
        try:
            ratios = [float(r) for r in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"--buckets {spec!r}: give square, {', '.join(OFFICIAL_BUCKETS)} or height/width "
                "ratios such as 0.6,1,1.67"
            ) from None
        pairs = [(base * math.sqrt(r), base / math.sqrt(r)) for r in ratios]
    sizes = []
    for h, w in pairs:
        hw = tuple(max(multiple, round(v / multiple) * multiple) for v in (h, w))
        if hw not in sizes:
            sizes.append(hw)
    return sizes


def nearest_bucket(sizes: list[tuple[int, int]], height: int, width: int) -> int:
    """The bucket whose aspect ratio (height / width) is nearest to the image's, as the official
    `get_closest_ratio` compares them: |r - h/w| on a linear scale, which sends an image halfway
    between two ratios to the taller bucket."""
    r = height / width
    return min(range(len(sizes)), key=lambda k: abs(sizes[k][0] / sizes[k][1] - r))


def fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so that the image covers (height, width), then centre-crop to it."""
    H, W = size
    s = max(H / img.height, W / img.width)
    w, h = max(W, round(img.width * s)), max(H, round(img.height * s))
    img = img.resize((w, h), Image.Resampling.BICUBIC)  # PIL antialiases when shrinking
    left, top = (w - W) // 2, (h - H) // 2
    return img.crop((left, top, left + W, top + H))


# ----------------------------------------------------------------------------------------------------------------
# an image folder with captions

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0


def open_rgb(path: Path) -> Image.Image:
    """An image file as 8-bit RGB, upright: EXIF orientation applied, transparency composited on
    white, 16-bit and float channels scaled to 8 bits, palette, CMYK and grey converted."""
    img = ImageOps.exif_transpose(Image.open(path))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float grey
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" and a.max() > 255 else 255.0 if img.mode != "F" else 1.0
        img = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """Images under `root` (recursively), resized and centre-cropped to size_px² or, given buckets,
    to the bucket nearest each image's aspect ratio.

    Captions: a same-named .txt beside each image, or `root/captions.jsonl` with one {"file_name": path relative to
    root, "caption": text} per line. With captions=True every image must have one; with False they may be missing
    (AE training) and come back as "". `load(i)` returns the reason instead of raising for an
    unreadable image or one smaller than its bucket (unless upscale), so a cache can skip and count.
    """

    def __init__(
        self,
        root: str | Path,
        size_px: int,
        captions: bool = True,
        buckets: list[tuple[int, int]] | None = None,
        upscale: bool = True,
    ):
        self.root, self.size_px, self.upscale = Path(root), size_px, upscale
        self.buckets = buckets or [(size_px, size_px)]
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
                        raise ValueError(
                            f"captions.jsonl line {n + 1}: expected keys file_name and caption: {line}"
                        )
                    table[rec["file_name"]] = rec["caption"]
        self.captions = []
        for f in self.files:
            txt = f.with_suffix(".txt")
            cap = table.get(f.relative_to(self.root).as_posix())
            self.captions.append(
                cap if cap is not None else txt.read_text().strip() if txt.is_file() else None
            )
        missing = [f.name for f, c in zip(self.files, self.captions) if c is None]
        if captions and missing:
            raise ValueError(
                f"{len(missing)} images in {self.root} have no caption (.txt or captions.jsonl): {missing[:5]}"
            )
        self.captions = [c or "" for c in self.captions]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> dict | str:
        """Item i as {"image", "caption", "bucket"}, or why it is skipped ("unreadable", "too small")."""
        try:
            img = open_rgb(self.files[i])
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            return "unreadable"
        k = nearest_bucket(self.buckets, img.height, img.width)
        H, W = self.buckets[k]
        if not self.upscale and (img.height < H or img.width < W):
            return "too small"
        image = to_tensor(np.array(fit(img, (H, W))))
        return {"image": image, "caption": self.captions[i], "bucket": k}

    def __getitem__(self, i: int) -> dict:
        item = self.load(i)
        if isinstance(item, str):
            raise ValueError(f"{self.files[i]}: {item}")
        return item


class PromptItems:
    """A prompt list as cache items for the teacher to generate: item i is prompt i, its noise seed
    and its bucket are functions of (seed, i) alone, so any rank can make any item."""

    def __init__(self, prompts: list[str], n_buckets: int, seed: int):
        self.prompts, self.n_buckets, self.seed = prompts, n_buckets, seed

    def __len__(self) -> int:
        return len(self.prompts)

    def load(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, i])
        noise_seed = int(rng.integers(2**62))
        bucket = int(rng.integers(self.n_buckets))  # uniform over the bucket list
        return {"caption": self.prompts[i], "bucket": bucket, "seed": noise_seed}


# ----------------------------------------------------------------------------------------------------------------
# the teacher's own samples: prompts -> paired latents


@torch.no_grad()
def teacher_sample(pipe, cond: dict, null: dict, seeds: list[int], size, steps, guidance, cfg):
    """Latents (B, C, h, w) of a model folder's transformer at `size` (H, W) px with its own sampler
    (its shift, embedded guidance or CFG, Euler steps: as sample.py), from each item's seeded noise."""
    model, f = pipe.transformer, pipe.ae.spatial_factor
    C, h, w = model.params.in_channels, size[0] // f, size[1] // f
    x = torch.cat([get_noise((1, C, h, w), s) for s in seeds]).to(null["txt"].device)
    r = shift_for(pipe.shift, (C, h, w), model.params.patch_size, pipe.shift_value)
    distilled = bool(getattr(model.params, "guidance_embed", False))
    scale = cfg or (1.0 if distilled else 4.5)
    null = {k: v.expand(len(seeds), *v.shape[1:]) for k, v in null.items()}
    v = guided_velocity(model, cond, null, guidance if distilled else None, scale)
    dtype = next(model.parameters()).dtype
    return denoise(lambda x, sigma: v(x.to(dtype), sigma), x, get_schedule(steps, r))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to 8 bits (what a PNG of them holds), still in [-1, 1]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def save_item_images(images: torch.Tensor, items: list[dict], folder: Path) -> None:
    """The teacher's images as an image folder: {index}.png beside {index}.txt with the caption."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for px, it in zip(pixels, items):
        stem = folder / f"{it['index']:08d}"
        atomic_write(stem.with_suffix(".png"), lambda f, px=px: Image.fromarray(px).save(f, "PNG"))
        atomic_write(stem.with_suffix(".txt"), lambda f, it=it: f.write(it["caption"].encode()))


@torch.no_grad()
def encode_items(cfg, items: list[dict], size, aes: dict, text, teacher, device) -> dict:
    """One batch of one bucket (H, W) px as cache rows: each AE's latent of the images (the
    teacher's of its own, smaller copy when --teacher_resolution: the same scene on the same token
    grid) and the captions' text states. Items without an image are generated: the teacher's latent
    as sampled (no AE round trip), decoded once by its AE, that image (8-bit, as a PNG of it) encoded
    by the student AE."""
    cond = text([it["caption"] for it in items])
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    rows = {}
    if "image" in items[0]:
        x = torch.stack([it["image"] for it in items]).to(device)  # (B, 3, H, W) in [-1, 1]
    else:
        null, seeds = text.null(1), [it["seed"] for it in items]
        with amp:
            z = teacher_sample(
                teacher, cond, null, seeds, size, cfg.sample_steps, cfg.guidance, cfg.cfg
            )
            x = quantize(teacher.ae.decode(z.to(next(teacher.ae.parameters()).dtype)).float())
        rows["teacher"] = z.float().cpu()
        if cfg.save_images:
            save_item_images(x, items, Path(cfg.out_dir) / "images")
    r_t, r = cfg.teacher_resolution or cfg.resolution, cfg.resolution
    small = (
        x
        if r_t == r
        else F.interpolate(x, size=(size[0] * r_t // r, size[1] * r_t // r), mode="area")
    )
    inputs = {"student": (x, cfg.student_channels or None), "teacher": (small, None)}
    with amp:
        rows |= {k: ae.encode(*inputs[k]).float().cpu() for k, ae in aes.items()}
    return rows | {k: v.cpu() for k, v in cond.items()}


def make_shard(k: int, data, shard_size: int, batch_size: int, encode) -> tuple[dict, dict, dict]:
    """Shard k: items [k·S, (k+1)·S) of `data` (load(i): an item or why it is skipped), batched per
    bucket as they come (memory: a batch per bucket) through encode(items, bucket) -> rows. Returns
    {bucket: {key: tensor}}, {bucket: captions} and {reason: count} of the skipped."""
    rows, captions, pending, skipped = {}, {}, {}, collections.Counter()

    def flush(b):
        for key, v in encode(pending.pop(b), b).items():
            rows.setdefault(b, {}).setdefault(key, []).append(v)

    for i in range(k * shard_size, min(len(data), (k + 1) * shard_size)):
        item = data.load(i)
        if isinstance(item, str):
            skipped[item] += 1
            continue
        b = item["bucket"]
        pending.setdefault(b, []).append(item | {"index": i})
        captions.setdefault(b, []).append(item["caption"])
        if len(pending[b]) == batch_size:
            flush(b)
    for b in list(pending):
        flush(b)
    return {b: {k: torch.cat(v) for k, v in t.items()} for b, t in rows.items()}, captions, skipped


# ----------------------------------------------------------------------------------------------------------------
# writing a cache: shard k holds items [k·S, (k+1)·S), one file per bucket, and a marker when done


def shard_files(k: int, sizes: list[tuple[int, int]]) -> list[str]:
    """File names of shard k, one per bucket (a one-bucket cache keeps the plain shard_k name)."""
    if len(sizes) == 1:
        return [f"shard_{k:05d}.safetensors"]
    return [f"shard_{k:05d}_{h}x{w}.safetensors" for h, w in sizes]


def shards_to_do(out: Path, n_shards: int, rank: int, world: int) -> list[int]:
    """This rank's shards (k = rank mod world) that have no done-marker yet: a killed run redoes only
    the shard it was writing, and never writes an item twice."""
    return [k for k in range(rank, n_shards, world) if not (out / f"shard_{k:05d}.json").is_file()]


def write_shard(
    out: Path, k: int, sizes, rows: dict[int, dict], captions: dict[int, list], skipped: dict
):
    """Shard k's files (bucket -> {key: tensor}), then its marker {file: [bucket, rows]} and the
    counts of skipped items; each written atomically (temporary name, fsync, rename)."""
    names, done = shard_files(k, sizes), {}
    for b, tensors in rows.items():
        save_ckpt(tensors, out / names[b], metadata={"captions": json.dumps(captions[b])})
        done[names[b]] = [b, len(captions[b])]
    marker = json.dumps({"files": done, "skipped": skipped}).encode()
    atomic_write(out / f"shard_{k:05d}.json", lambda f: f.write(marker))


def cache_index(out: Path, n_shards: int, sizes: list[tuple[int, int]]) -> dict | None:
    """The meta.json entries of a finished cache, from the shards' markers: count, shards [{file,
    rows, bucket}], buckets [{size, count, shapes}], shapes (bucket 0's), skipped. None while a
    shard is missing."""
    markers = [out / f"shard_{k:05d}.json" for k in range(n_shards)]
    if not all(m.is_file() for m in markers):
        return None
    shards, skipped = [], collections.Counter()
    for m in markers:
        rec = json.loads(m.read_text())
        skipped.update(rec["skipped"])
        shards += [{"file": f, "rows": r, "bucket": b} for f, (b, r) in rec["files"].items()]
    buckets = []
    for b, (h, w) in enumerate(sizes):
        mine = [s for s in shards if s["bucket"] == b]
        if mine:
            with safe_open(out / mine[0]["file"], framework="pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()[1:]) for k in f.keys()}
            buckets.append(
                {"size": [h, w], "count": sum(s["rows"] for s in mine), "shapes": shapes}
            )
    renumber = {
        b: i for i, b in enumerate(sorted({s["bucket"] for s in shards}))
    }  # drop empty buckets
    for s in shards:
        s["bucket"] = renumber[s["bucket"]]
    count = sum(s["rows"] for s in shards)
    return {
        "count": count,
        "shards": shards,
        "buckets": buckets,
        "shapes": buckets[0]["shapes"],
        "skipped": dict(skipped),
    }


def write_meta(out: Path, meta: dict) -> None:
    atomic_write(out / "meta.json", lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))


def release_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). Tensors of
    changing shapes (a batch per bucket) fragment glibc's heap: without this the writer's RSS grew
    with every shard (0.97 GB for 64 generated items, 2.43 GB for 768); with it, it stays at about
    0.37 GB after each shard, whatever the cache's size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def write_shards(cfg, d, data, sizes, encode) -> int:
    """This rank's unfinished shards of `data` (at most cfg.max_shards of them), each written as it
    is made. Returns the number of shards of the whole cache."""
    out, n_shards = Path(cfg.out_dir), math.ceil(len(data) / cfg.shard_size)
    t0, done = time.perf_counter(), 0
    for k in shards_to_do(out, n_shards, d.rank, d.world_size)[: cfg.max_shards or None]:
        rows, captions, skipped = make_shard(k, data, cfg.shard_size, cfg.batch_size, encode)
        write_shard(out, k, sizes, rows, captions, dict(skipped))
        del rows
        release_heap()
        done += sum(map(len, captions.values()))
        rate = (time.perf_counter() - t0) / max(done, 1)
        print0(
            f"shard {k + 1}/{n_shards}: {done} rows in this run ({rate:.2f} s/row), skipped {dict(skipped)}"
        )
    return n_shards


def finish_cache(cfg, n_shards: int, sizes, text) -> dict | None:
    """Once every shard is done: null.safetensors (the empty prompt's states) and meta.json (shards,
    buckets, shapes, sources). None, with a line saying so, while shards are missing."""
    out = Path(cfg.out_dir)
    meta = cache_index(out, n_shards, sizes)
    if meta is None:
        print0(f"not all {n_shards} shards are written: run the same command again to resume")
        return None
    save_ckpt({k: v.cpu() for k, v in text.null(1).items()}, out / "null.safetensors")
    keep = ("teacher_ae", "student_ae", "text", "teacher", "prompts")
    meta |= {k: str(Path(getattr(cfg, k)).resolve()) if getattr(cfg, k) else "" for k in keep}
    meta |= {
        "resolution": cfg.resolution,
        "teacher_resolution": cfg.teacher_resolution or cfg.resolution,
    }
    meta |= {
        "buckets_spec": cfg.buckets,
        "student_channels": cfg.student_channels,
        "data": cfg.data,
        "id2label": getattr(text, "id2label", None),  # a class-conditional cache: its class names
    }
    write_meta(out, meta)
    sizes = [tuple(b["size"]) for b in meta["buckets"]]
    print0(
        f"cache of {meta['count']} rows in buckets {sizes}: {meta['shapes']}; skipped {meta['skipped']}"
    )
    return meta


# ----------------------------------------------------------------------------------------------------------------
# sharding: batches indexed by step, so resuming at step k or running on N ranks sees the same samples


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's batch of dataset indices for step start_step, start_step + 1, ...
        (forever).

    Global sample number p = (step·world + rank)·batch + j, so ranks never share a sample within a
        step and the data of a step does not depend on where the run (re)started. With shuffle, p walks
        a fresh permutation of the n items each epoch (seeded by seed + epoch, the same on every rank),
        like DistributedSampler.set_epoch; without it, p is the index itself (procedural datasets, where
        every index is already a fresh random sample)."""

    def __init__(
        self,
        n: int,
        batch: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
    ):
        self.n, self.batch, self.rank, self.world = n, batch, rank, world
        self.seed, self.start_step, self.shuffle = seed, start_step, shuffle
        self._epoch, self._perm = -1, None

    def index(self, p: int) -> int:
        if not self.shuffle:
            return p % self.n
        epoch, i = divmod(p, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + epoch)
            ).tolist()
        return self._perm[i]

    def batch_of(self, step: int) -> list[int]:
        """This rank's indices at `step`: a pure function of the step, so a resumed run needs no
        sampler state."""
        p0 = (step * self.world + self.rank) * self.batch
        return [self.index(p) for p in range(p0, p0 + self.batch)]

    def __iter__(self):
        for step in itertools.count(self.start_step):
            yield self.batch_of(step)


M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """A 64-bit integer hash (splitmix64's finaliser)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def permute(i: int, n: int, key: int) -> int:
    """Position i of a pseudo-random permutation of range(n) chosen by `key`, in O(1) memory: a
    4-round Feistel network on the next even power of two, walking the cycle back into range (fewer
    than 4 rounds trips on average). No table of n entries, however large the cache."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (mix64(right ^ mix64(key + r)) & mask)
        x = (left << half) | right
        if x < n:
            return x


class BucketSampler:
    """Each step's global batch from one bucket, drawn with probability proportional to its rows
    from a generator seeded by (seed, step): the same bucket on every rank, and a pure function of
    the step, so a resumed run replays its draws and N ranks see what one process sees.

    Within the bucket, global sample p = (step·world + rank)·batch + j walks a fresh permutation of
    its rows each epoch (O(1)-memory `permute`). A one-bucket cache (every cache written before
    buckets) keeps StepSampler's order exactly, so its runs reproduce."""

    def __init__(self, counts: list[int], batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.counts, self.batch, self.rank, self.world, self.seed = counts, batch, rank, world, seed
        self.p = np.asarray(counts, dtype=np.float64) / sum(counts)
        self.legacy = StepSampler(counts[0], batch, rank, world, seed) if len(counts) == 1 else None

    def bucket_of(self, step: int) -> int:
        if len(self.counts) == 1:
            return 0
        return int(np.random.default_rng([self.seed, step, 7]).choice(len(self.counts), p=self.p))

    def batch_of(self, step: int) -> tuple[int, list[int]]:
        """(bucket, this rank's rows of it) at `step`."""
        if self.legacy is not None:
            return 0, self.legacy.batch_of(step)
        b = self.bucket_of(step)
        n, p0 = self.counts[b], (step * self.world + self.rank) * self.batch
        rows = []
        for p in range(p0, p0 + self.batch):
            epoch, i = divmod(p, n)
            rows.append(permute(i, n, mix64(self.seed * 1_000_003 + b) ^ mix64(epoch)))
        return b, rows


# ----------------------------------------------------------------------------------------------------------------
# the latent cache: what the DiT stages read instead of images


class LatentCache:
    """Rows written by `align.py --stage cache`: per image, its latent under the teacher AE (the
    base model's) and/or the student AE (the deep-compression one) and the text encoder's output for
    its caption, in safetensors shards, plus the empty-prompt ("null") embedding. Training never
    runs an AE or a text encoder per step (as DC-Gen's
    dc_ai/dc_adapt/data_provider/latent_mixture.py reads pre-extracted latents).

        meta.json        count, shards [{file, rows, bucket}], buckets [{size, count, shapes}], shapes
                         (bucket 0's), teacher_ae, student_ae, text (folders), resolution
        shard_*.safetensors   teacher (N, C, h, w), student (N, C', h', w'), txt (N, L, D), y (N, D) or txt_mask (N, L)
        null.safetensors      the null embedding, batch 1

    Opening reads meta.json (one entry per shard, none per row); shards are opened when a row of
    theirs is read, at most `max_open` at a time (least recently used closed first), memory-mapped:
    the memory of opening and of each step does not grow with the number of rows. A cache without
    "buckets" (written before them) is one bucket.
    """

    def __init__(self, folder: str | Path, max_open: int = 64):
        self.folder, self.max_open = Path(folder), max_open
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(
                f"{self.folder} is not a latent cache (no meta.json); write one: align.py --stage cache"
            )
        self.meta = json.loads((self.folder / "meta.json").read_text())
        res = self.meta.get("resolution", 0)
        buckets = self.meta.get("buckets") or [
            {"size": [res, res], "count": self.meta["count"], "shapes": self.meta["shapes"]}
        ]
        self.buckets = buckets
        self.files, self.starts = [[] for _ in buckets], []
        for s in self.meta["shards"]:
            self.files[s.get("bucket", 0)].append((s["file"], s["rows"]))
        for files in self.files:
            rows = np.array([r for _, r in files], dtype=np.int64)
            self.starts.append(np.cumsum(rows) - rows)  # first row of each shard in its bucket
        self.null = load_file(self.folder / "null.safetensors")
        self.handles = collections.OrderedDict()  # (bucket, shard) -> open safetensors file

    def __len__(self) -> int:
        return self.meta["count"]

    def counts(self) -> list[int]:
        """Rows per bucket."""
        return [b["count"] for b in self.buckets]

    def shape(self, key: str, bucket: int = 0) -> tuple[int, ...]:
        """Shape of one row of `key` in a bucket, e.g. the student latent (C, h, w)."""
        shapes = self.buckets[bucket]["shapes"]
        if key not in shapes:
            raise KeyError(f"the cache {self.folder} has no {key!r}; it holds {sorted(shapes)}")
        return tuple(shapes[key])

    def handle(self, bucket: int, s: int):
        key = (bucket, s)
        if key in self.handles:
            self.handles.move_to_end(key)
        else:
            if len(self.handles) >= self.max_open:
                self.handles.popitem(last=False)
            self.handles[key] = safe_open(self.folder / self.files[bucket][s][0], framework="pt")
        return self.handles[key]

    def get(
        self, idx: torch.Tensor | list[int], keys: list[str], bucket: int = 0
    ) -> dict[str, torch.Tensor]:
        """Rows `idx` (indices within the bucket) of each key, stacked: {key: (len(idx), *shape)}."""
        idx = np.asarray(torch.as_tensor(idx), dtype=np.int64)
        shard = np.searchsorted(self.starts[bucket], idx, side="right") - 1
        out = {k: [] for k in keys}
        for i, s in zip(idx.tolist(), shard.tolist()):
            f = self.handle(bucket, s)
            for k in keys:
                out[k].append(f.get_slice(k)[i - int(self.starts[bucket][s])])
        return {k: torch.stack(v) for k, v in out.items()}
