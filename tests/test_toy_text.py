"""toy/text.py: the toy zoo's text encoder (size, determinism, diffusers' FLUX path, prompt
separation, pretraining) and its prompt conventions (the "toy_captions" field, toy_prompts).

Run: python -m pytest -q tests/test_toy_text.py
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from models.text import load_text_encoder
from toy.shapes import COLORS as TOY_COLORS
from toy.shapes import all_specs, caption_roles
from toy.text import TOY_CAPTIONS, build_toy_text_encoder, knows_only_toy_captions, toy_prompts

from tiny_text import build_flux_text

ROOT = Path(__file__).resolve().parents[1]


def flux_pipeline(folder) -> FluxPipeline:
    """diffusers' FluxPipeline from the same folder; encode_prompt needs only the text parts."""
    return FluxPipeline(
        scheduler=None,
        vae=None,
        transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
    )


# ------------------------------------------------------------------------------------------------
# the encoder


COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES, RELATIONS = (
    ["circle", "square", "triangle", "star"],
    ["above", "below", "left of", "right of"],
)


def caption(c1, s1, rel, c2, s2, bg):
    return f"a {c1} {s1} {rel} a {c2} {s2} on a {bg} background"


def random_parts(rng):
    c1, c2 = rng.sample(COLORS, 2)
    return [
        c1,
        rng.choice(SHAPES),
        rng.choice(RELATIONS),
        c2,
        rng.choice(SHAPES),
        rng.choice(COLORS),
    ]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    rng = random.Random(0)
    corpus = [caption(*random_parts(rng)) for _ in range(300)]
    return build_toy_text_encoder(tmp_path_factory.mktemp("toy"), corpus, seed=0), corpus


def test_toy_is_small_deterministic_and_a_real_flux_layout(toy, tmp_path):
    folder, corpus = toy
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 1.5e6, size
    enc = load_text_encoder(folder)
    assert (enc.max_length, enc.txt_dim, enc.vec_dim) == (32, 64, 64)
    # the training length request is capped
    assert load_text_encoder(folder, max_length=256).max_length == 32
    again = load_text_encoder(build_toy_text_encoder(tmp_path / "again", corpus, seed=0))
    other = load_text_encoder(build_toy_text_encoder(tmp_path / "other", corpus, seed=1))
    a, b, c = enc(corpus[:2]), again(corpus[:2]), other(corpus[:2])
    # same seed, same encoder
    assert torch.equal(a["txt"], b["txt"]) and torch.equal(a["y"], b["y"])
    assert (a["txt"] - c["txt"]).abs().max() > 0.1  # another seed, another encoder
    oov = enc(["a zebra-striped hexagon 42"])  # unknown words map to <unk>: no crash
    assert torch.isfinite(oov["txt"]).all()
    # the toy follows diffusers' FLUX path exactly, like the real encoders
    with torch.no_grad():
        txt, y, _ = flux_pipeline(folder).encode_prompt(
            corpus[:3], prompt_2=None, device="cpu", max_sequence_length=32
        )
    got = enc(corpus[:3])
    assert (got["txt"] - txt).abs().max() <= 1e-6 and (got["y"] - y).abs().max() <= 1e-6


def set_distance(a, b):
    """Chamfer distance between two sets of token states (the DiT sees FLUX's text tokens as a set)."""
    d = torch.cdist(a, b)
    return 0.5 * (d.min(0).values.mean() + d.min(1).values.mean())


def test_toy_separates_prompts_and_word_order(toy):
    """Random pairs are clearly apart; so are colour-swapped pairs ("a red circle ... a blue square" vs "a blue
    circle ... a red square"), which have the same words: the T5 states carry which colour goes with which shape."""
    folder, _ = toy
    enc, rng = load_text_encoder(folder), random.Random(1)
    parts = [random_parts(rng) for _ in range(32)]
    a = enc([caption(*p) for p in parts])
    swapped = enc([caption(p[3], p[1], p[2], p[0], p[4], p[5]) for p in parts])
    rand = enc([caption(*random_parts(rng)) for _ in parts])
    # real tokens of these captions ("a c s r a c s on a c background </s>"; "left of" adds one)
    n = 12
    d_swap = torch.stack(
        [set_distance(a["txt"][i, :n], swapped["txt"][i, :n]) for i in range(32)]
    ).mean()
    d_rand = torch.stack(
        [set_distance(a["txt"][i, :n], rand["txt"][i, :n]) for i in range(32)]
    ).mean()
    cos_y = torch.nn.functional.cosine_similarity(a["y"], rand["y"])
    cos_txt = torch.nn.functional.cosine_similarity(a["txt"].flatten(1), rand["txt"].flatten(1))
    print(
        f"toy separation: set distance swap/random {d_swap / d_rand:.2f}; cosine of random pairs y "
        f"{cos_y.mean():.3f} txt {cos_txt.mean():.3f}"
    )
    assert d_swap / d_rand > 0.2
    assert (a["y"] - swapped["y"]).norm(dim=-1).min() > 1e-3
    assert cos_txt.max() < 0.99


def side_probe(enc, captions, fit):
    """Accuracy of a ridge-regression read-out of the side (toy.shapes.caption_roles) from colour
    words' T5 states, fitted on the first `fit` captions and scored on the rest."""
    h = enc(captions)["txt"]
    x, y = [], []
    for state, c in zip(h, captions, strict=True):
        for i, (word, r) in enumerate(zip(c.split(), caption_roles(c), strict=True)):
            if word in TOY_COLORS:
                x.append(state[i])
                y.append(r)
    x, y = torch.stack(x), torch.tensor(y)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    n = 2 * fit  # two colour words per caption
    w = torch.linalg.solve(
        x[:n].T @ x[:n] + 1e-3 * torch.eye(x.shape[1]), x[:n].T @ F.one_hot(y[:n], 4).float()
    )
    return ((x[n:] @ w).argmax(1) == y[n:]).float().mean().item()


def test_toy_pretraining_makes_the_side_readable(tmp_path):
    """Pretrained with roles (pretrain_toy_t5), the toy T5 says in every colour word's state, linearly, which side of
    the picture that object goes: what the toy DiT needs to follow the word order (docs/toy-zoo.md)."""
    specs = all_specs("train")
    captions = [specs[i].caption for i in random.Random(0).sample(range(len(specs)), 600)]
    roles = [caption_roles(c) for c in captions]
    acc = {}
    for steps in (0, 100):
        folder = build_toy_text_encoder(
            tmp_path / f"s{steps}",
            captions[:300],
            roles=roles[:300] if steps else None,
            pretrain_steps=steps,
        )
        with torch.no_grad():
            acc[steps] = side_probe(load_text_encoder(folder), captions, fit=300)
    print(
        f"side of a colour word read linearly from its T5 state: random {acc[0]:.3f}, pretrained {acc[100]:.3f}"
    )
    assert acc[100] >= 0.99 and acc[0] < acc[100] - 0.03


# ------------------------------------------------------------------------------------------------
# the prompt conventions


def toy_field(folder: Path) -> list:
    """The "toy_captions" field of both tokenizers of a FLUX text layout (None: absent)."""
    files = [folder / t / "tokenizer_config.json" for t in ("tokenizer", "tokenizer_2")]
    return [json.loads(f.read_text()).get(TOY_CAPTIONS) for f in files]


def test_the_folder_says_whether_it_knows_only_toy_captions(toy, tmp_path):
    """build_toy_text_encoder marks its tokenizers "toy_captions": true when its corpus is toy
    captions, false otherwise; a real tokenizer has no such field. The committed zoo carries it in
    every model folder (through the links to zoo/text), and so does a copy of the zoo elsewhere."""
    captions = [s.caption for s in all_specs("train")[:40]]
    shapes = build_toy_text_encoder(tmp_path / "shapes", captions, dim=16, max_length=16)
    assert toy_field(shapes) == [True, True] and knows_only_toy_captions(shapes)
    folder, _ = toy  # its corpus has colours and shapes toy/shapes.py does not know (a star, ...)
    assert toy_field(folder) == [False, False] and not knows_only_toy_captions(folder)
    real = build_flux_text(tmp_path / "real")
    assert toy_field(real) == [None, None] and not knows_only_toy_captions(real)
    assert toy_field(ROOT / "zoo" / "text") == [True, True]
    copy = shutil.copytree(ROOT / "zoo", tmp_path / "elsewhere", symlinks=True)
    for name in ("base", "krea", "dcgen-1k", "dcgen-4k"):
        assert knows_only_toy_captions(ROOT / "zoo" / name) and knows_only_toy_captions(copy / name)
    assert not knows_only_toy_captions(tmp_path / "nothing")


def test_toy_prompts_complete_the_background_and_note_the_rest(capsys):
    """A caption without its background gets a black one, said aloud (the toy captions always name
    one); whole captions and prompts no background can complete stay as they are, with one note."""
    assert toy_prompts(["a red circle above a blue square"]) == [
        "a red circle above a blue square on a black background"
    ]
    assert (
        "sampling 'a red circle above a blue square on a black background'"
        in capsys.readouterr().out
    )
    given = [
        "a green circle left of a red square on a white background",
        "a cat on a mat",
        "a red circle above x",
    ]
    assert toy_prompts(given) == given
    out = capsys.readouterr().out
    assert "sampling" not in out and out.count("note: the toy zoo knows only the captions") == 1
    assert "not a shapes caption: 'a cat on a mat'" in out
