"""models/lora.save_diffusers_lora: a DC-Gen LoRA (LoRA A/B on the backbone, x_embedder and proj_out trained in full)
loads with one diffusers call, `FluxPipeline.load_lora_weights(folder)`, onto the model folder the run started from,
and gives our merged model's outputs. The pipeline is a real FluxPipeline holding only the transformer (the other
components None: load_lora_weights needs a pipeline object, not its text encoders or VAE).

Run: python -m pytest -q tests/test_diffusers_lora.py
"""

import copy
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open

from models.flux import Flux
from models.lora import LORA_FILE, inject_lora, lora_layers, save_diffusers_lora, unload_lora

from flux_reference import inputs, run_diffusers, tiny_diffusers

RANK, ALPHA = 4, 12  # scale 3: the file must carry alpha, not just the rank


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """The model folder a LoRA run starts from (lora.py --init)."""
    folder = tmp_path_factory.mktemp("init")
    tiny_diffusers(16, True).save_pretrained(folder)
    return folder


def trained(init):
    """Our model as lora.py builds it, after 'training': LoRA B random (non-zero), the latent layers random. Returns
    it and the latent layers' weights in `init` (their base)."""
    model = Flux.from_pretrained(init, patch_size=2)
    inject_lora(model, RANK, ALPHA, targets=Flux.lora_targets, trainable=Flux.latent_layers)
    base = {
        f"{n}.{k}": v.clone()
        for n in Flux.latent_layers
        for k, v in model.get_submodule(n).state_dict().items()
    }
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))
        for n in Flux.latent_layers:
            for p in model.get_submodule(n).parameters():
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model, base


def pipeline(init):
    """A FluxPipeline around a fresh copy of the transformer in `init`."""
    transformer = FluxTransformer2DModel.from_pretrained(init).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


# x, t, txt, y, guidance: 4 channels in 2x2 patches = 16 = the tiny model's token width
X = inputs(4, 8, 6)


@torch.no_grad()
def out(model):
    if isinstance(model, Flux):
        return model(*X)
    return run_diffusers(model, *X, 2)


@torch.no_grad()
def test_load_lora_weights_gives_our_merged_model(init, tmp_path):
    model, base = trained(init)
    expected = out(unload_lora(copy.deepcopy(model)))  # LoRA merged into plain nn.Linear layers
    assert (out(model) - expected).abs().max() < 1e-5 * expected.abs().max()
    path = save_diffusers_lora(
        model, tmp_path, full=Flux.latent_layers, base=base, dtype=torch.float32
    )
    assert path == tmp_path / LORA_FILE
    pipe = pipeline(init)
    before = out(pipe.transformer)
    # the user's line: the folder; the file has diffusers' default name
    pipe.load_lora_weights(tmp_path)
    got = out(pipe.transformer)
    assert (got - before).abs().max() > 0.1 * expected.abs().max()  # the LoRA does something
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    pipe.fuse_lora()  # fusing folds everything, the full modules included, into the base weights
    pipe.unload_lora_weights()
    assert (out(pipe.transformer) - expected).abs().max() < 1e-5 * expected.abs().max()


@torch.no_grad()
def test_full_modules_matter_and_the_file_needs_no_metadata(init, tmp_path):
    """The check above can fail: leaving out the latent layers changes the output. The scale alpha / r = 3 is in the
    tensors, so a loader that drops the metadata (diffusers then assumes alpha = r) builds the same model. And
    unload_lora_weights() gives back the --init model: the full modules are stored as changes from it."""
    model, base = trained(init)
    expected = out(unload_lora(copy.deepcopy(model)))
    save_diffusers_lora(model, tmp_path / "lora_only", dtype=torch.float32)  # no full modules
    pipe = pipeline(init)
    pipe.load_lora_weights(tmp_path / "lora_only")
    assert (out(pipe.transformer) - expected).abs().max() > 0.1 * expected.abs().max()

    path = save_diffusers_lora(
        model, tmp_path / "full", full=Flux.latent_layers, base=base, dtype=torch.float32
    )
    pipe = pipeline(init)
    before = out(pipe.transformer)
    # the file's tensors without its metadata: diffusers infers the ranks from the shapes and alpha
    # = rank
    state_dict = FluxPipeline.lora_state_dict(path)
    FluxPipeline.load_lora_into_transformer(
        state_dict, network_alphas=None, transformer=pipe.transformer
    )
    assert (out(pipe.transformer) - expected).abs().max() < 1e-5 * expected.abs().max()
    pipe.unload_lora_weights()
    assert (out(pipe.transformer) - before).abs().max() < 1e-6 * before.abs().max()


def test_file_layout_override_and_dtype(init, tmp_path):
    """Keys and metadata as diffusers expects; `state_dict` (e.g. the EMA weights) replaces the model's tensors;
    bf16 on disk by default; bad input fails loudly."""
    model, base = trained(init)
    ema = {
        k: torch.full_like(v, 0.5)
        for k, v in model.state_dict().items()
        if ".lora_" in k or "x_embedder" in k
    }
    path = save_diffusers_lora(model, tmp_path, full=Flux.latent_layers, base=base, state_dict=ema)
    with safe_open(path, "pt") as f:
        meta, keys = json.loads(f.metadata()["lora_adapter_metadata"]), set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    n = len(lora_layers(model))
    assert len(keys) == 3 * (n + 2) and all(
        k.startswith("transformer.") and ".lora_" in k for k in keys
    )
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert (
        meta["transformer.r"] == meta["transformer.lora_alpha"] == RANK
        and meta["transformer.lora_bias"]
    )
    # min(16 in, 48 out)
    assert meta["transformer.rank_pattern"] == {"^x_embedder": 16, "^proj_out": 16}
    # scale 1: the exact change
    assert meta["transformer.alpha_pattern"] == meta["transformer.rank_pattern"]
    a, b = (f"transformer.transformer_blocks.0.attn.to_q.lora_{x}.weight" for x in "AB")
    # the override, not the model's A
    assert torch.equal(tensors[a], torch.full_like(tensors[a], 0.5))
    # the scale folded into B
    assert torch.equal(tensors[b], torch.full_like(tensors[b], 0.5 * ALPHA / RANK))
    dW = 0.5 - base["x_embedder.weight"]  # x_embedder: A = I, B = W_ema - W_base
    assert torch.equal(tensors["transformer.x_embedder.lora_B.weight"], dW.bfloat16())
    # proj_out: A = W - W_base, B = I (no override)
    proj = model.proj_out.weight.detach() - base["proj_out.weight"]
    assert torch.equal(tensors["transformer.proj_out.lora_A.weight"], proj.bfloat16())
    with pytest.raises(ValueError, match="state_dict names no LoRA tensor"):
        save_diffusers_lora(model, tmp_path, state_dict={"context_embedder.weight": torch.zeros(1)})
    with pytest.raises(AssertionError, match="give their base weights"):
        save_diffusers_lora(model, tmp_path, full=Flux.latent_layers)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_diffusers_lora(Flux.from_pretrained(init, patch_size=2), tmp_path)
