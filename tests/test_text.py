"""models/text.py against diffusers' FluxPipeline / SanaPipeline `encode_prompt`, on tiny offline folders; the
layout errors; and the toy zoo's text encoder (size, determinism, prompt separation).

Run: python -m pytest -q tests/test_text.py
"""

import inspect
import random
import shutil

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, SanaPipeline
from transformers import AutoTokenizer, CLIPTextModel, Gemma2Model, T5EncoderModel

import data
from models.sana import PRESETS, Sana, SanaParams
from models.text import SANA_INSTRUCTION, build_toy_text_encoder, drop_text, load_text_encoder

from tiny_text import build_flux_text, build_sana_text

PROMPTS = ["a red circle above a blue square", "A Photo of a CAT on the mat, 4k!", " "]
LONG = " ".join(["a cat on the mat"] * 30)  # > 77 CLIP tokens: truncated by both


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return build_flux_text(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def sana_folder(tmp_path_factory):
    return build_sana_text(tmp_path_factory.mktemp("sana"))


# The references run under no_grad like the pipelines' __call__: with grad enabled, SDPA on CPU takes another kernel
# and T5's states move by ~1e-5 (ours and diffusers' agree to 0.0 under no_grad).


def flux_pipeline(folder) -> FluxPipeline:
    """diffusers' FluxPipeline from the same folder; encode_prompt needs only the text parts."""
    return FluxPipeline(
        scheduler=None, vae=None, transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
    )  # fmt: skip


@pytest.mark.parametrize("max_length", [512, 256])
def test_flux_parity_with_diffusers(flux_folder, max_length):
    ours = load_text_encoder(flux_folder, max_length=max_length if max_length != 512 else None)  # None: 512
    assert ours.max_length == max_length
    ref = flux_pipeline(flux_folder)
    prompts = PROMPTS + [LONG]
    with torch.no_grad():
        txt, y, _ = ref.encode_prompt(prompts, prompt_2=None, device="cpu", max_sequence_length=max_length)
        null_txt, null_y, _ = ref.encode_prompt([""] * 2, prompt_2=None, device="cpu", max_sequence_length=max_length)
    got = ours(prompts)
    assert set(got) == {"txt", "y"}  # exactly Flux.forward's keyword arguments
    assert got["txt"].shape == (4, max_length, 24) and got["y"].shape == (4, 32)
    assert (got["txt"] - txt).abs().max() <= 1e-6 and (got["y"] - y).abs().max() <= 1e-6
    assert (got["y"][0] - got["y"][1]).abs().max() > 1e-3  # different prompts, different embeddings
    null = ours.null(2)
    assert (null["txt"] - null_txt).abs().max() <= 1e-6 and (null["y"] - null_y).abs().max() <= 1e-6
    assert ours.null(2)["txt"].data_ptr() == null["txt"].data_ptr()  # computed once, then cached


@pytest.mark.parametrize("max_length", [300, 12])
def test_sana_parity_with_diffusers(sana_folder, max_length):
    ours = load_text_encoder(sana_folder, max_length=max_length)
    ref = SanaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(sana_folder / "tokenizer"),
        text_encoder=Gemma2Model.from_pretrained(sana_folder / "text_encoder"),
        vae=None, transformer=None, scheduler=None,
    )  # fmt: skip
    # the instruction SanaPipeline.__call__ uses by default (encode_prompt's own default is None)
    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert chi == SANA_INSTRUCTION
    with torch.no_grad():
        txt, mask, neg_txt, neg_mask = ref.encode_prompt(
            PROMPTS, do_classifier_free_guidance=True, negative_prompt="", device="cpu",
            max_sequence_length=max_length, complex_human_instruction=chi,
        )  # fmt: skip
    got = ours(PROMPTS)
    assert set(got) == {"txt", "txt_mask"}  # exactly Sana.forward's keyword arguments
    assert got["txt"].shape == (3, max_length, 24) and got["txt_mask"].dtype == torch.bool
    assert (got["txt"] - txt).abs().max() <= 1e-6 and torch.equal(got["txt_mask"], mask.bool())
    null = ours.null(3)  # the negative prompt "" is encoded without the instruction
    assert (null["txt"] - neg_txt).abs().max() <= 1e-6 and torch.equal(null["txt_mask"], neg_mask.bool())
    if max_length == 300:  # BOS, the prompt, padding
        assert got["txt_mask"][:, 0].all() and not got["txt_mask"][:, -1].any()
        assert null["txt_mask"].sum() == 3  # only BOS is real in the empty prompt


def test_sana_encoder_feeds_the_backbone(sana_folder):
    """The point of the dict: `model(x, t, **encoder(prompts))` with no family-specific code."""
    enc = load_text_encoder(sana_folder, max_length=16)
    model = Sana(SanaParams(**{**PRESETS["tiny"].__dict__, "caption_channels": enc.txt_dim}))
    x, t = torch.randn(2, 4, 4, 6), torch.tensor([0.5, 0.9])
    with torch.no_grad():
        cond, null = model(x, t, **enc(["a cat", "a red square"])), model(x, t, **enc.null(2))
    assert cond.shape == x.shape and (cond - null).abs().max() > 1e-4
    half = load_text_encoder(sana_folder, dtype=torch.bfloat16, max_length=16)  # as stage scripts load real Gemma
    assert half(["a cat"])["txt"].dtype == torch.bfloat16 and model(x[:1], t[:1], **half(["a cat"])).isfinite().all()


def test_drop_text_takes_null_rows(flux_folder):
    enc = load_text_encoder(flux_folder, max_length=8)
    cond, null = enc(["a cat", "the mat", "a red circle"]), enc.null(3)
    mixed = drop_text(cond, null, torch.tensor([True, False, True]))
    for k in cond:
        assert torch.equal(mixed[k][0], null[k][0]) and torch.equal(mixed[k][1], cond[k][1])


def test_missing_parts_are_named(flux_folder, sana_folder, tmp_path):
    broken = shutil.copytree(flux_folder, tmp_path / "flux")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=r"FLUX text layout is missing tokenizer_2/ \(T5 tokenizer\)"):
        load_text_encoder(broken)
    broken = shutil.copytree(sana_folder, tmp_path / "sana")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"SANA text layout is missing tokenizer/"):
        load_text_encoder(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected the layout of FLUX"):
        load_text_encoder(tmp_path / "empty")


def test_a_weight_missing_from_a_text_encoder_is_an_error(flux_folder, tmp_path):
    """transformers fills a missing weight with random numbers and only logs it; the loader must refuse."""
    broken = shutil.copytree(flux_folder, tmp_path / "flux")
    (weights,) = (broken / "text_encoder_2").glob("*.safetensors")
    sd = safetensors.torch.load_file(weights)
    name = next(k for k in sd if k.endswith("layer_norm.weight"))
    safetensors.torch.save_file({k: v for k, v in sd.items() if k != name}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"text_encoder_2: the weights do not fit its config.json"):
        load_text_encoder(broken)


# ----------------------------------------------------------------------------------------------------------------
# the toy zoo's text encoder

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES, RELATIONS = ["circle", "square", "triangle", "star"], ["above", "below", "left of", "right of"]


def caption(c1, s1, rel, c2, s2, bg):
    return f"a {c1} {s1} {rel} a {c2} {s2} on a {bg} background"


def random_parts(rng):
    c1, c2 = rng.sample(COLORS, 2)
    return [c1, rng.choice(SHAPES), rng.choice(RELATIONS), c2, rng.choice(SHAPES), rng.choice(COLORS)]


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
    assert load_text_encoder(folder, max_length=256).max_length == 32  # the training length request is capped
    again = load_text_encoder(build_toy_text_encoder(tmp_path / "again", corpus, seed=0))
    other = load_text_encoder(build_toy_text_encoder(tmp_path / "other", corpus, seed=1))
    a, b, c = enc(corpus[:2]), again(corpus[:2]), other(corpus[:2])
    assert torch.equal(a["txt"], b["txt"]) and torch.equal(a["y"], b["y"])  # same seed, same encoder
    assert (a["txt"] - c["txt"]).abs().max() > 0.1  # another seed, another encoder
    oov = enc(["a zebra-striped hexagon 42"])  # unknown words map to <unk>: no crash
    assert torch.isfinite(oov["txt"]).all()
    # the toy follows diffusers' FLUX path exactly, like the real encoders
    with torch.no_grad():
        txt, y, _ = flux_pipeline(folder).encode_prompt(corpus[:3], prompt_2=None, device="cpu", max_sequence_length=32)
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
    n = 12  # real tokens of these captions ("a c s r a c s on a c background </s>"; "left of" adds one)
    d_swap = torch.stack([set_distance(a["txt"][i, :n], swapped["txt"][i, :n]) for i in range(32)]).mean()
    d_rand = torch.stack([set_distance(a["txt"][i, :n], rand["txt"][i, :n]) for i in range(32)]).mean()
    cos_y = torch.nn.functional.cosine_similarity(a["y"], rand["y"])
    cos_txt = torch.nn.functional.cosine_similarity(a["txt"].flatten(1), rand["txt"].flatten(1))
    print(f"toy separation: set distance swap/random {d_swap / d_rand:.2f}; cosine of random pairs y "
          f"{cos_y.mean():.3f} txt {cos_txt.mean():.3f}")  # fmt: skip
    assert d_swap / d_rand > 0.2
    assert (a["y"] - swapped["y"]).norm(dim=-1).min() > 1e-3
    assert cos_txt.max() < 0.99


def side_probe(enc, captions, fit):
    """Accuracy of a ridge-regression read-out of the side (data.caption_roles) from colour words' T5 states, fitted
    on the first `fit` captions and scored on the rest."""
    h = enc(captions)["txt"]
    x, y = [], []
    for state, c in zip(h, captions, strict=True):
        for i, (word, r) in enumerate(zip(c.split(), data.caption_roles(c), strict=True)):
            if word in data.COLORS:
                x.append(state[i])
                y.append(r)
    x, y = torch.stack(x), torch.tensor(y)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    n = 2 * fit  # two colour words per caption
    w = torch.linalg.solve(x[:n].T @ x[:n] + 1e-3 * torch.eye(x.shape[1]), x[:n].T @ F.one_hot(y[:n], 4).float())
    return ((x[n:] @ w).argmax(1) == y[n:]).float().mean().item()


def test_toy_pretraining_makes_the_side_readable(tmp_path):
    """Pretrained with roles (pretrain_toy_t5), the toy T5 says in every colour word's state, linearly, which side of
    the picture that object goes: what the toy DiT needs to follow the word order (README "The toy zoo")."""
    specs = data.all_specs("train")
    captions = [specs[i].caption for i in random.Random(0).sample(range(len(specs)), 600)]
    roles = [data.caption_roles(c) for c in captions]
    acc = {}
    for steps in (0, 100):
        folder = build_toy_text_encoder(tmp_path / f"s{steps}", captions[:300], roles=roles[:300] if steps else None,
                                        pretrain_steps=steps)  # fmt: skip
        with torch.no_grad():
            acc[steps] = side_probe(load_text_encoder(folder), captions, fit=300)
    print(f"side of a colour word read linearly from its T5 state: random {acc[0]:.3f}, pretrained {acc[100]:.3f}")
    assert acc[100] >= 0.99 and acc[0] < acc[100] - 0.03
