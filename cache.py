# ----------------------------------------------------------------------------------------------------------------
# latent cache: what training reads instead of images (TEMPORARY FILE: moves into data.py once issue 3 lands)

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


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

    def get(self, idx: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
        """Rows `idx` (global indices) of each key, stacked: {key: (len(idx), *shape)}."""
        shard = torch.searchsorted(self.starts, idx, right=True) - 1
        out = {k: [] for k in keys}
        for i, s in zip(idx.tolist(), shard.tolist()):
            if s not in self.handles:
                self.handles[s] = safe_open(self.files[s], framework="pt")
            for k in keys:
                out[k].append(self.handles[s].get_slice(k)[i - int(self.starts[s])])
        return {k: torch.stack(v) for k, v in out.items()}


def epoch_batch(n: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """The global batch of training step `step`: a fresh permutation of the n rows every epoch, seeded by the epoch,
    cut into batches (the last partial batch dropped). Pure function of the step: resuming needs no sampler state."""
    per_epoch = n // batch
    assert per_epoch > 0, f"the cache has {n} rows, fewer than one global batch of {batch}"
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[i * batch : (i + 1) * batch]
