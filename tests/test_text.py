"""models/text.py against diffusers' FluxPipeline / SanaPipeline `encode_prompt`, on tiny offline folders; the
layout errors. The toy zoo's text encoder is tested in tests/test_toy_text.py.

Run: python -m pytest -q tests/test_text.py
"""

import inspect
import shutil

import pytest
import safetensors.torch
import torch
from diffusers import FluxPipeline, SanaPipeline
from transformers import AutoTokenizer, CLIPTextModel, Gemma2Model, T5EncoderModel

from models.sana import PRESETS, Sana, SanaParams
from models.text import SANA_INSTRUCTION, drop_text, load_text_encoder

from tiny_text import build_flux_text, build_sana_text

PROMPTS = ["a red circle above a blue square", "A Photo of a CAT on the mat, 4k!", " "]
LONG = " ".join(["a cat on the mat"] * 30)  # > 77 CLIP tokens: truncated by both


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return build_flux_text(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def sana_folder(tmp_path_factory):
    return build_sana_text(tmp_path_factory.mktemp("sana"))


# The references run under no_grad like the pipelines' __call__: with grad enabled, SDPA on CPU
# takes another kernel and T5's states move by ~1e-5 (ours and diffusers' agree to 0.0 under
# no_grad).


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


@pytest.mark.parametrize("max_length", [512, 256])
def test_flux_parity_with_diffusers(flux_folder, max_length):
    # None: 512
    ours = load_text_encoder(flux_folder, max_length=max_length if max_length != 512 else None)
    assert ours.max_length == max_length
    ref = flux_pipeline(flux_folder)
    prompts = PROMPTS + [LONG]
    with torch.no_grad():
        txt, y, _ = ref.encode_prompt(
            prompts, prompt_2=None, device="cpu", max_sequence_length=max_length
        )
        null_txt, null_y, _ = ref.encode_prompt(
            [""] * 2, prompt_2=None, device="cpu", max_sequence_length=max_length
        )
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
        vae=None,
        transformer=None,
        scheduler=None,
    )
    # the instruction SanaPipeline.__call__ uses by default (encode_prompt's own default is None)
    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert chi == SANA_INSTRUCTION
    with torch.no_grad():
        txt, mask, neg_txt, neg_mask = ref.encode_prompt(
            PROMPTS,
            do_classifier_free_guidance=True,
            negative_prompt="",
            device="cpu",
            max_sequence_length=max_length,
            complex_human_instruction=chi,
        )
    got = ours(PROMPTS)
    assert set(got) == {"txt", "txt_mask"}  # exactly Sana.forward's keyword arguments
    assert got["txt"].shape == (3, max_length, 24) and got["txt_mask"].dtype == torch.bool
    assert (got["txt"] - txt).abs().max() <= 1e-6 and torch.equal(got["txt_mask"], mask.bool())
    null = ours.null(3)  # the negative prompt "" is encoded without the instruction
    assert (null["txt"] - neg_txt).abs().max() <= 1e-6 and torch.equal(
        null["txt_mask"], neg_mask.bool()
    )
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
    # as stage scripts load real Gemma
    half = load_text_encoder(sana_folder, dtype=torch.bfloat16, max_length=16)
    assert (
        half(["a cat"])["txt"].dtype == torch.bfloat16
        and model(x[:1], t[:1], **half(["a cat"])).isfinite().all()
    )


def test_drop_text_takes_null_rows(flux_folder):
    enc = load_text_encoder(flux_folder, max_length=8)
    cond, null = enc(["a cat", "the mat", "a red circle"]), enc.null(3)
    mixed = drop_text(cond, null, torch.tensor([True, False, True]))
    for k in cond:
        assert torch.equal(mixed[k][0], null[k][0]) and torch.equal(mixed[k][1], cond[k][1])


def test_missing_parts_are_named(flux_folder, sana_folder, tmp_path):
    broken = shutil.copytree(flux_folder, tmp_path / "flux")
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(
        FileNotFoundError, match=r"FLUX text layout is missing tokenizer_2/ \(T5 tokenizer\)"
    ):
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
    safetensors.torch.save_file(
        {k: v for k, v in sd.items() if k != name}, weights, metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match=r"text_encoder_2: the weights do not fit its config.json"):
        load_text_encoder(broken)
