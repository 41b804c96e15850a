"""toy/shapes.py and toy/score.py: the procedural shapes (determinism, resolution independence,
held-out split, caption roles) and the scorer's acceptance figures.

Run: python -m pytest -q tests/test_toy_shapes.py
"""

import numpy as np
import pytest
import torch
from PIL import Image

from toy.score import accuracy, score
from toy.shapes import (
    ShapesDataset,
    all_specs,
    caption_roles,
    eval_specs,
    parse_caption,
    random_scene,
    render,
    split_of,
)


def test_scorer_acceptance():
    """>= 95% on 200 ground-truth renders at 256 px with their own prompts, <= 20% with shuffled prompts."""
    ds = ShapesDataset(256, seed=1234, split="all")
    scenes = [ds.scene(i) for i in range(200)]
    images = [render(s, 256) for s in scenes]
    own = accuracy(images, [s.spec for s in scenes])
    # every image gets another prompt
    shuffled = accuracy(images, [scenes[(i + 1) % 200].spec for i in range(200)])
    print(f"scorer accuracy: own prompts {own:.3f}, shuffled prompts {shuffled:.3f}")
    assert own >= 0.95 and shuffled <= 0.20


def test_scorer_reads_each_part_of_the_prompt():
    scene = ShapesDataset(256, seed=7).scene(3)
    img = render(scene, 256)
    s = scene.spec
    # tensor input
    assert score(torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1, s.caption)["correct"]
    other = {"red": "blue", "blue": "red"}.get(s.color_a, "red" if s.color_b != "red" else "green")
    flips = {
        "relation": {
            "above": "below",
            "below": "above",
            "left of": "right of",
            "right of": "left of",
        }[s.relation],
        "shape_a": "circle" if s.shape_a != "circle" else "square",
        "color_a": other,
        "background": "black" if s.background != "black" else "white",
    }
    for field, value in flips.items():
        wrong = s.__class__(**{**s.__dict__, field: value})
        result = score(img, wrong)
        assert not result["correct"] and result["score"] < 1, field


def test_render_is_deterministic_and_resolution_independent():
    ds = ShapesDataset(64, seed=3)
    a, b = ds[5], ShapesDataset(64, seed=3)[5]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert not torch.equal(a["image"], ds[6]["image"])
    assert a["image"].shape == (3, 64, 64) and a["image"].min() >= -1 and a["image"].max() <= 1
    scene = ds.scene(5)
    small = render(scene, 256).astype(np.float32)
    big = np.asarray(
        Image.fromarray(render(scene, 1024)).resize((256, 256), Image.Resampling.BOX), np.float32
    )
    # the 1024 px render box-filtered to 256 px is the 256 px render
    assert np.abs(small - big).mean() < 1.0
    edge = render(scene, 1024)
    # anti-aliased edges (more than bg + 2 flat colours)
    assert len(np.unique(edge.reshape(-1, 3), axis=0)) > 10


def test_zoomed_crops_are_windows_of_big_renders():
    ds = ShapesDataset(64, seed=2, zoom=(2.0, 4.0))
    img = ds[9]["image"]
    scene, full = ds.scene(9), render(ds.scene(9), 200)
    assert img.shape == (3, 64, 64) and ds[9]["caption"] == scene.spec.caption
    window = render(scene, 200, (17, 101, 64, 64))
    # a window costs only its pixels, and is exact
    assert np.array_equal(window, full[17:81, 101:165])
    assert not torch.equal(img, ShapesDataset(64, seed=2)[9]["image"])


def test_captions_and_split():
    specs = all_specs()
    assert len(specs) == 6 * 5 * 4 * 4 * 4 * 3 and len(set(s.caption for s in specs)) == len(specs)
    assert all(parse_caption(s.caption) == s for s in specs[::97])
    test = all_specs("test")
    assert 0.08 < len(test) / len(specs) < 0.17
    s = test[0]  # the mirrored wording of a held-out scene is held out too
    flip = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}[
        s.relation
    ]
    assert (
        split_of(s.__class__(s.color_b, s.shape_b, flip, s.color_a, s.shape_a, s.background))
        == "test"
    )
    train = ShapesDataset(32, seed=0, split="train")
    assert all(split_of(parse_caption(train[i]["caption"])) == "train" for i in range(50))
    held = eval_specs(200, seed=0)
    assert (
        len(set(held)) == 200
        and all(split_of(h) == "test" for h in held)
        and held == eval_specs(200, seed=0)
    )
    with pytest.raises(ValueError, match="expected 'a <color> <shape>"):
        parse_caption("a cat on a mat")


def test_caption_roles_name_the_side_the_renderer_uses():
    """The toy T5 is pretrained to read, per colour and shape word, the side its object goes (toy.shapes.caption_roles):
    those labels must be where random_scene puts the objects, for all four relations and both wordings."""
    assert caption_roles("a red circle left of a blue square on a gray background") == [
        -1,
        2,
        2,
        -1,
        -1,
        -1,
        3,
        3,
        -1,
        -1,
        -1,
        -1,
    ]
    rng = np.random.default_rng(0)
    for spec in all_specs()[::61]:
        words, roles = spec.caption.split(), caption_roles(spec.caption)
        assert len(roles) == len(words) and [w for w, r in zip(words, roles) if r >= 0] == [
            spec.color_a,
            spec.shape_a,
            spec.color_b,
            spec.shape_b,
        ]
        scene = random_scene(spec, rng)
        sides = [r for r in roles if r >= 0]
        side_a, side_b = sides[0], sides[-1]
        axis = "y" if side_a < 2 else "x"  # top/bottom or left/right
        first = getattr(scene.a, axis) < getattr(scene.b, axis)
        assert first == (side_a in (0, 2)) and side_b == side_a ^ 1
