"""Data for the stages: an image folder with captions, a step-indexed sampler that shards batches
over ranks so that a resumed or multi-process run sees exactly the same data, and the latent cache
the DiT stages train from.

    ds = ImageFolder("path/to/images", size_px=1024)  # ds[i] = {"image": (3, H, W), "caption"}
    sampler = StepSampler(len(ds), batch=16, rank=rank, world=world, start_step=step)
    cache = LatentCache("out/cache/256")  # cache.get(rows, ["student", "txt", "y"])

The toy zoo's procedural shapes and their scorer live in toy/ (toy/shapes.py, toy/score.py).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

# ----------------------------------------------------------------------------------------------------------------
# an image folder with captions

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0


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

    def __getitem__(self, i: int) -> dict:
        img = Image.open(self.files[i]).convert("RGB")
        # resize the shorter side to size_px (PIL antialiases when shrinking)
        s = self.size_px / min(img.size)
        w, h = max(self.size_px, round(img.width * s)), max(self.size_px, round(img.height * s))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - self.size_px) // 2, (h - self.size_px) // 2
        img = img.crop((left, top, left + self.size_px, top + self.size_px))
        return {"image": to_tensor(np.array(img)), "caption": self.captions[i]}


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


# ----------------------------------------------------------------------------------------------------------------
# the latent cache: what the DiT stages read instead of images


class LatentCache:
    """Rows written by `align.py --stage cache`: per image, its latent under the teacher AE (the
    base model's) and/or the student AE (the deep-compression one) and the text encoder's output for
    its caption, in safetensors shards, plus the empty-prompt ("null") embedding. Training never
    runs an AE or a text encoder per step (as DC-Gen's
    dc_ai/dc_adapt/data_provider/latent_mixture.py reads pre-extracted latents).

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
            raise KeyError(
                f"the cache {self.folder} has no {key!r}; it holds {sorted(self.meta['shapes'])}"
            )
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
