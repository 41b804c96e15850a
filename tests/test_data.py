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
