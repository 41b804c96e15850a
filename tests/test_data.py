"""data.py: the image folder with captions, and the step sampler's sharding and resume.

Run: python -m pytest -q tests/test_data.py
"""

import json

import pytest
import torch
from PIL import Image

from data import ImageFolder, StepSampler


def test_image_folder(tmp_path):
    Image.new("RGB", (300, 200), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red image\n")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (100, 160), (0, 0, 255)).save(tmp_path / "sub" / "b.jpg")
    with pytest.raises(ValueError, match="1 images .* have no caption"):
        ImageFolder(tmp_path, 64)
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"file_name": "sub/b.jpg", "caption": "blue"}) + "\n"
    )
    ds = ImageFolder(tmp_path, 64)
    assert [ds[i]["caption"] for i in range(2)] == ["a red image", "blue"]
    assert ds[0]["image"].shape == ds[1]["image"].shape == (3, 64, 64)
    assert torch.allclose(ds[0]["image"][:, 32, 32], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "sub" / "nothing", 64) if (
            tmp_path / "sub" / "nothing"
        ).mkdir() is None else None


def test_step_sampler_shards_and_resumes():
    n, batch = 10, 3
    one = StepSampler(n, 2 * batch, seed=5)  # one process with the global batch
    ranks = [StepSampler(n, batch, rank=r, world=2, seed=5) for r in range(2)]
    it1, its = iter(one), [iter(s) for s in ranks]
    for _ in range(4):  # 24 samples: 2.4 epochs
        glob, parts = next(it1), [next(i) for i in its]
        assert parts[0] + parts[1] == glob  # rank r gets its slice of the single-process batch
    epoch0 = [
        i
        for s in range(0, 10, 6)
        for i in StepSampler(n, 6, seed=5, start_step=s // 6).__iter__().__next__()
    ]
    assert sorted(epoch0[:10]) == list(range(10))  # each epoch is a permutation: every item once
    resumed = iter(StepSampler(n, batch, rank=1, world=2, seed=5, start_step=2))
    fresh = iter(StepSampler(n, batch, rank=1, world=2, seed=5))
    [next(fresh) for _ in range(2)]
    assert next(resumed) == next(fresh)


def test_image_folder_reads_images_as_users_have_them(tmp_path):
    """Any mode comes back as upright RGB in its nearest bucket: grey, grey + alpha and RGBA on
    white, 16-bit grey scaled to 8 bits, palette with transparency, CMYK, EXIF rotation applied; an
    unreadable file and a too-small image are skipped with their reason (kept with upscale)."""
    import numpy as np

    from data import ImageFolder, bucket_sizes

    Image.new("L", (96, 64), 128).save(tmp_path / "grey.png")
    Image.new("LA", (96, 64), (0, 0)).save(tmp_path / "grey_alpha.png")  # transparent: white
    Image.new("RGBA", (64, 96), (255, 0, 0, 0)).save(tmp_path / "rgba.png")  # transparent: white
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 255] * 256)
    pal.save(tmp_path / "pal.png", transparency=1)  # index 0 opaque blue
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    Image.new("RGB", (96, 64), (0, 255, 0)).save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    Image.new("RGB", (20, 20)).save(tmp_path / "tiny.png")
    for f in tmp_path.iterdir():
        f.with_suffix(".txt").write_text(f.stem)
    sizes = bucket_sizes("0.6,1,1.67", 64, 32)
    assert sizes == [(64, 96), (64, 64), (96, 64)]
    ds = ImageFolder(tmp_path, 64, buckets=sizes, upscale=False)
    items = {f.stem: ds.load(i) for i, f in enumerate(ds.files)}
    assert items["broken"] == "unreadable" and items["tiny"] == "too small"
    px = {
        k: v["image"][:, v["image"].shape[1] // 2, v["image"].shape[2] // 2]
        for k, v in items.items()
        if isinstance(v, dict)
    }
    assert torch.allclose(px["grey"], torch.full((3,), 128 / 127.5 - 1), atol=0.01)
    for white in ("grey_alpha", "rgba", "deep"):
        assert torch.allclose(px[white], torch.ones(3), atol=0.01), white
    assert torch.allclose(px["pal"], torch.tensor([-1.0, -1.0, 1.0]), atol=0.01)
    assert px["cmyk"][0] > 0.9 and px["cmyk"][1:].max() < -0.8
    assert sizes[items["grey"]["bucket"]] == (64, 96)  # 64 x 96: the wide bucket
    assert sizes[items["rgba"]["bucket"]] == (96, 64)  # 96 x 64: the tall one
    assert sizes[items["rotated"]["bucket"]] == (96, 64)  # stored wide, viewed tall (EXIF)
    assert items["rotated"]["image"].shape == (3, 96, 64)
    assert ImageFolder(tmp_path, 64, buckets=sizes, upscale=True).load(
        ds.files.index(tmp_path / "tiny.png")
    )["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="unreadable"):
        ds[ds.files.index(tmp_path / "broken.png")]


def test_a_cache_written_before_buckets_reads_as_one_bucket(tmp_path):
    """meta.json without "buckets" (the zoo's runs): one bucket of every shard, rows across shards."""
    from common import save_ckpt
    from data import LatentCache

    for k, rows in enumerate((3, 2)):
        save_ckpt(
            {"student": torch.arange(rows).float().view(rows, 1, 1, 1) + 10 * k},
            tmp_path / f"shard_{k:05d}.safetensors",
        )
    save_ckpt({"y": torch.zeros(1, 2)}, tmp_path / "null.safetensors")
    shards = [
        {"file": "shard_00000.safetensors", "rows": 3},
        {"file": "shard_00001.safetensors", "rows": 2},
    ]
    meta = {"count": 5, "shards": shards, "shapes": {"student": [1, 1, 1]}, "resolution": 32}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cache = LatentCache(tmp_path)
    assert cache.counts() == [5] and cache.shape("student") == (1, 1, 1)
    assert cache.get([4, 0, 3], ["student"])["student"].flatten().tolist() == [11.0, 0.0, 10.0]
