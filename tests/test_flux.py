"""models/flux.py against diffusers' FluxTransformer2DModel: same outputs from the same saved folder.

Run: python -m pytest -q tests/test_flux.py
"""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel

from models.flux import PRESETS, Flux, FluxParams, position_ids, rope

from flux_reference import inputs, run_diffusers, tiny_diffusers


# (latent channels, patch): base FLUX (16×2×2 tokens, here 4×2×2) and DC-Gen-FLUX (32 channels,
# patch 1)
@pytest.mark.parametrize("C,p,guidance", [(4, 2, True), (32, 1, True), (32, 1, False)])
def test_parity_with_diffusers(tmp_path, C, p, guidance):
    ref = tiny_diffusers(C * p * p, guidance)
    ref.save_pretrained(tmp_path)
    ours = Flux.from_pretrained(tmp_path, patch_size=p)
    x, t, txt, y, g = inputs(C, 6 * p, 10 * p)  # non-square latent, batch 2
    g = g if guidance else None
    with torch.no_grad():
        expected = run_diffusers(ref, x, t, txt, y, g, p)
        out = ours(x, t, txt, y, g)
    assert out.shape == x.shape
    assert expected.abs().mean() > 0.1  # the comparison is not between two near-zero tensors
    assert (out - expected).abs().max() < 1e-5


def test_sharded_folder_and_dtype(tmp_path):
    ref = tiny_diffusers(16, True)
    ref.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 3
    stored = Flux.from_pretrained(tmp_path, patch_size=2)  # keeps the stored dtype
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())
    ours = Flux.from_pretrained(tmp_path, patch_size=2, dtype=torch.float32)
    ref = ref.float()
    x, t, txt, y, g = inputs(4, 8, 6)
    with torch.no_grad():
        assert (ours(x, t, txt, y, g) - run_diffusers(ref, x, t, txt, y, g, 2)).abs().max() < 1e-5


def test_mismatched_config_names_key_and_shapes(tmp_path):
    tiny_diffusers(16, True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["in_channels"] = 32  # the weights were made for 16-dim tokens
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'x_embedder.weight'.*\(48, 16\).*\(48, 32\)"):
        Flux.from_pretrained(tmp_path)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(
        FileNotFoundError, match=r"not a FLUX transformer folder.*config.json.*notes.txt"
    ):
        Flux.from_pretrained(tmp_path)


def test_our_config_round_trips_through_diffusers(tmp_path):
    """The config we write is one diffusers builds the same architecture from (what lora.py --merge relies on)."""
    ours = Flux(PRESETS["tiny"])
    cfg = ours.diffusers_config()
    ref = FluxTransformer2DModel.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
    assert {k: v.shape for k, v in ref.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }
    assert Flux.params_from_diffusers(cfg) == PRESETS["tiny"]


def test_flux_dev_preset_is_12b_on_meta():
    with torch.device("meta"):
        ours = Flux(PRESETS["flux-dev"])
        ref = FluxTransformer2DModel(guidance_embeds=True)
    n = sum(p.numel() for p in ours.parameters())
    assert all(p.is_meta for p in ours.parameters())  # nothing allocated
    assert n == sum(p.numel() for p in ref.parameters()) == 11_901_408_320
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


@pytest.mark.parametrize("name", ["dcgen-flux-1k", "dcgen-flux-4k"])
def test_dcgen_presets_change_only_embedder_and_head(name):
    with torch.device("meta"):
        base, new = Flux(PRESETS["flux-dev"]), Flux(PRESETS[name])
    a, b = base.state_dict(), new.state_dict()
    changed = {k for k in a if a[k].shape != b[k].shape}
    assert changed == {"x_embedder.weight", "proj_out.weight", "proj_out.bias"}
    assert b["x_embedder.weight"].shape == (3072, PRESETS[name].in_channels)


def test_rope_rotates_pairs_by_position():
    """A token at position 0 is not rotated, and q·k after RoPE depends only on the position difference."""
    from models.flux import apply_rope

    pe = rope(position_ids(0, 4, 4).float(), (4, 6, 6), 10_000)
    assert pe.shape == (16, 8) and torch.allclose(pe[0], torch.ones(8, dtype=torch.complex64))
    q, k = (
        torch.randn(1, 1, 1, 16).expand(1, 16, 1, 16),  # (B, L, H, d): one vector at 16 positions
        torch.randn(1, 1, 1, 16).expand(1, 16, 1, 16),
    )
    qr, kr = apply_rope(q, pe), apply_rope(k, pe)
    dots = (qr[0, :, 0, None] * kr[0, None, :, 0]).sum(-1)  # (16, 16)
    # (0,0)->(0,1) vs (1,0)->(1,1): same offset
    assert torch.allclose(dots[0, 1], dots[4, 5], atol=1e-5)
    assert not torch.allclose(dots[0, 1], dots[0, 2], atol=1e-3)
    x = torch.randn(2, 16, 3, 16)  # a rotation keeps each pair's norm
    assert torch.allclose(
        apply_rope(x, pe).unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1)
    )


def test_tiny_forward_backward_and_checkpointing():
    torch.manual_seed(0)
    model = Flux(FluxParams(**{**PRESETS["tiny"].__dict__}))
    x, t = torch.randn(2, 4, 4, 6), torch.rand(2)
    txt, y, g = torch.randn(2, 5, 32), torch.randn(2, 16), torch.full((2,), 3.5)
    out = model(x, t, txt, y, g)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    model.zero_grad()
    model.grad_checkpointing = True
    model(x, t, txt, y, g).square().mean().backward()
    assert all(torch.allclose(p.grad, grads[n], atol=1e-6) for n, p in model.named_parameters())
    with pytest.raises(AssertionError, match="guidance"):
        model(x, t, txt, y, None)


@torch.no_grad()
def test_channel_prefix_uses_the_first_columns_and_rows():
    """DC-AE 1.5 augmented training: a latent prefix x[:, :c] runs as a model whose embedder and head were cut to
    the first c channels (official AdaptivePatchEmbed / AdaptiveFinalLayer)."""
    torch.manual_seed(0)
    full = Flux(FluxParams(**{**PRESETS["tiny"].__dict__, "in_channels": 8}))
    small = Flux(FluxParams(**{**PRESETS["tiny"].__dict__, "in_channels": 3}))
    sd = full.state_dict()
    k = 3 * 2 * 2  # c channels × p² positions: the (c, p1, p2) token layout puts them first
    sd["x_embedder.weight"] = sd["x_embedder.weight"][:, :k]
    sd["proj_out.weight"], sd["proj_out.bias"] = sd["proj_out.weight"][:k], sd["proj_out.bias"][:k]
    small.load_state_dict(sd)
    x, t, txt, y, g = (
        torch.randn(2, 8, 4, 6),
        torch.rand(2),
        torch.randn(2, 5, 32),
        torch.randn(2, 16),
        torch.ones(2),
    )
    with pytest.raises(ValueError, match="latent has 3 channels, the model 8.*adaptive_channels"):
        full(x[:, :3], t, txt, y, g)  # a prefix by accident is an error
    full.adaptive_channels = True
    assert torch.allclose(full(x[:, :3], t, txt, y, g), small(x[:, :3], t, txt, y, g), atol=1e-6)
    assert full(x[:, :3], t, txt, y, g).shape == (2, 3, 4, 6)
