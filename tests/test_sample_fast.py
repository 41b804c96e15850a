"""What makes the 4096 px demo fast, checked for equality with what it replaced: the toy zoo's plain-PyTorch
CLIP and T5 (no transformers import), the DC-AE UpBlock's single shuffle, the PNG writer (atomic, readable by PIL).

Run: python -m pytest -q tests/test_sample_fast.py
"""

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pngfile
from models import text
from models.dcae import UpBlock
from models.tiling import tiled

ROOT = Path(__file__).resolve().parents[1]


def test_toy_text_encoders_equal_transformers(monkeypatch):
    """Bit for bit on the zoo's encoders, prompts of every length (truncated, empty, unknown words)."""
    prompts = ["a red circle above a blue square on a black background", "", "a cat " * 40]
    ours = text.load_text_encoder(ROOT / "zoo" / "text")
    assert type(ours.clip) is text.ClipText and type(ours.t5) is text.T5Encoder
    monkeypatch.setattr(text, "toy_tokenizers", lambda folder: False)
    ref = text.load_text_encoder(ROOT / "zoo" / "text")
    assert type(ref.t5).__name__ == "T5EncoderModel"
    a, b = ours(prompts), ref(prompts)
    assert a.keys() == b.keys() == {"txt", "y"}
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_sampling_the_toy_zoo_never_imports_transformers():
    code = (
        "import sys, sample; from models.pipeline import load_pipeline; "
        "p = load_pipeline(sample.ZOO / 'dcgen-4k'); p.text(['a red circle']); "
        "print('transformers' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("c_in,c_out", [(16, 8), (8, 8), (64, 32)])
def test_upblock_adds_its_shortcut_before_one_shuffle(c_in, c_out):
    """shuffle(conv(x)) + shuffle(repeat(x)), as DC-AE writes it, equals the block exactly."""
    torch.manual_seed(0)
    block, x = UpBlock(c_in, c_out, pixel_shuffle=True, shortcut=True), torch.randn(2, c_in, 5, 7)
    with torch.no_grad():
        two = F.pixel_shuffle(block.conv(x), 2) + F.pixel_shuffle(
            x.repeat_interleave(4 * c_out // c_in, dim=1), 2
        )
        assert torch.equal(block(x), two)


def test_png_round_trip_and_metadata(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    meta = {"prompt": "a red circle", "café": "naïve ✓", "steps": 20}
    for level in (0, 1, 9):
        pngfile.write_png(tmp_path / "a.png", pixels, meta, level)
        im = Image.open(tmp_path / "a.png")
        assert np.array_equal(np.asarray(im), pixels) and im.mode == "RGB"
        assert im.text == {k: str(v) for k, v in meta.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no temporary file left


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_deflate_in_pieces_is_one_zlib_stream(level, tmp_path, monkeypatch):
    """Pieces compressed apart and joined decode, as one stream, to the data; PIL reads the PNG."""
    data = np.random.default_rng(0).integers(0, 3, 100_003, dtype=np.uint8) * 100
    for pieces in (1, 2, 3, 7):
        assert zlib.decompress(pngfile.deflate(data, level, pieces)) == data.tobytes()
    pixels = data[: 99 * 101 * 3].reshape(99, 101, 3)
    deflate = pngfile.deflate
    monkeypatch.setattr(pngfile, "deflate", lambda d, lv: deflate(d, lv, pieces=3))
    pngfile.write_png(tmp_path / "p.png", pixels, {}, level)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), pixels)


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    """Ctrl-C while a PNG is written over an existing one: the old file stays whole, no temp file."""
    old = np.zeros((4, 4, 3), np.uint8)
    pngfile.write_png(tmp_path / "x.png", old, {}, 1)
    before = (tmp_path / "x.png").read_bytes()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(pngfile.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pngfile.write_png(tmp_path / "x.png", old + 200, {}, 1)
    assert (tmp_path / "x.png").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_to_pixels_rounds_as_save_image_grid():
    x = torch.linspace(-1.2, 1.2, 3 * 4 * 5).reshape(3, 4, 5)
    ref = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(pngfile.to_pixels(x.clone()), ref)


def test_tiled_reports_each_tile():
    seen = []
    x = torch.randn(1, 2, 20, 12)
    out = tiled(lambda t: t * 2, x, 8, 4, 1, progress=lambda i, n: seen.append((i, n)))
    assert torch.allclose(out, x * 2) and seen == [(i, 8) for i in range(1, 9)]
