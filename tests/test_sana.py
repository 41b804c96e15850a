"""models/sana.py against diffusers' SanaTransformer2DModel: same outputs from the same saved folder.

Run: python -m pytest -q tests/test_sana.py
"""

import pytest
import torch
from diffusers import SanaTransformer2DModel

from models.sana import PRESETS, Sana, SanaParams


def tiny_diffusers(
    C: int, p: int, qk_norm: bool, guidance: bool = False, seed: int = 0
) -> SanaTransformer2DModel:
    """A tiny random diffusers SANA with the structure of the real one; weights far from init so bugs show."""
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(
        in_channels=C,
        out_channels=C,
        patch_size=p,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=3,
        cross_attention_head_dim=6,
        cross_attention_dim=16,
        caption_channels=24,
        qk_norm="rms_norm_across_heads" if qk_norm else None,
        guidance_embeds=guidance,
        timestep_scale=1.0,
    )
    for name, prm in model.named_parameters():
        is_norm = prm.ndim == 1 and "norm" in name
        prm.data = 1 + 0.2 * torch.randn_like(prm) if is_norm else 0.3 * torch.randn_like(prm)
    return model.eval()


def inputs(C, H, W, L=9, seed=1):
    """Batch 2, non-square latent, and a text mask that pads: 4 real tokens in sample 0, all 9 in sample 1."""
    g = torch.Generator().manual_seed(seed)
    x, txt = torch.randn(2, C, H, W, generator=g), torch.randn(2, L, 24, generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[0, 4:] = 0
    return x, torch.tensor([0.3, 0.85]), txt, mask


@pytest.mark.parametrize("C,p,qk_norm", [(8, 1, True), (4, 2, True), (8, 1, False)])
def test_parity_with_diffusers(tmp_path, C, p, qk_norm):
    ref = tiny_diffusers(C, p, qk_norm)
    ref.save_pretrained(tmp_path)
    ours = Sana.from_pretrained(tmp_path)
    x, t, txt, mask = inputs(C, 6 * p, 10 * p)
    with torch.no_grad():
        # SanaPipeline calls the transformer with the scheduler's timestep (1000·sigma) times
        # timestep_scale
        want = ref(
            x, encoder_hidden_states=txt, timestep=t * 1000 * 1.0, encoder_attention_mask=mask
        ).sample
        got = ours(x, t, txt, mask)
    assert got.shape == x.shape
    assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
    # the mask matters: changing a padded text token changes nothing, changing a real one changes
    # the output
    txt2 = txt.clone()
    txt2[0, 6] += 1.0
    with torch.no_grad():
        assert torch.equal(ours(x, t, txt2, mask), got)
        txt2[0, 1] += 1.0
        assert (ours(x, t, txt2, mask) - got).abs().max() > 1e-3


def test_guidance_embed_parity(tmp_path):
    """The SANA-Sprint layout (embedded guidance), which distill.py can give a CFG SANA."""
    ref = tiny_diffusers(8, 1, True, guidance=True)
    ref.save_pretrained(tmp_path)
    ours = Sana.from_pretrained(tmp_path)
    x, t, txt, mask = inputs(8, 4, 6)
    w = torch.tensor([4.5, 1.0])
    with torch.no_grad():
        # diffusers' SanaSprintPipeline multiplies w by guidance_embeds_scale before the call; ours
        # does it inside
        want = ref(
            x,
            encoder_hidden_states=txt,
            timestep=t * 1000,
            guidance=w * 0.1,
            encoder_attention_mask=mask,
        )
        got = ours(x, t, txt, mask, guidance=w)
    assert (got - want.sample).abs().max() < 1e-5
    with pytest.raises(AssertionError, match="guidance"):
        ours(x, t, txt, mask)


def test_our_config_round_trips_through_diffusers():
    """The config we write is one diffusers builds the same architecture from (what a merged save relies on)."""
    ours = Sana(PRESETS["tiny"])
    cfg = ours.diffusers_config()
    ref = SanaTransformer2DModel.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
    assert {k: v.shape for k, v in ref.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }
    assert Sana.params_from_diffusers(cfg) == PRESETS["tiny"]


def test_sana_1_6b_preset_on_meta():
    with torch.device("meta"):
        ours = Sana(PRESETS["sana-1.6b-1024"])
        # diffusers' defaults are SANA-1.6B's
        ref = SanaTransformer2DModel(qk_norm="rms_norm_across_heads")
    n = sum(prm.numel() for prm in ours.parameters())
    assert all(prm.is_meta for prm in ours.parameters())  # nothing allocated
    assert n == sum(prm.numel() for prm in ref.parameters()) == 1_604_641_952
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_dcgen_preset_changes_only_embedder_and_head():
    with torch.device("meta"):
        a, b = (
            Sana(PRESETS["sana-1.6b-1024"]).state_dict(),
            Sana(PRESETS["dcgen-sana-1.6b-f64c128"]).state_dict(),
        )
    assert {k for k in a if a[k].shape != b[k].shape} == {
        "patch_embed.proj.weight",
        "proj_out.weight",
        "proj_out.bias",
    }
    assert b["patch_embed.proj.weight"].shape == (2240, 128, 1, 1) and b[
        "proj_out.weight"
    ].shape == (128, 2240)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="interpolation_scale"):
        Sana.params_from_diffusers(
            {**Sana(PRESETS["tiny"]).diffusers_config(), "interpolation_scale": 1}
        )


def test_tiny_forward_backward_and_checkpointing():
    torch.manual_seed(0)
    model = Sana(SanaParams(**{**PRESETS["tiny"].__dict__, "patch_size": 2}))
    x, t, txt = torch.randn(2, 4, 4, 6), torch.rand(2), torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    model(x, t, txt, mask).square().mean().backward()
    grads = {n: prm.grad.clone() for n, prm in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    model.grad_checkpointing = True
    model(x, t, txt, mask).square().mean().backward()
    assert all(torch.allclose(prm.grad, grads[n], atol=1e-6) for n, prm in model.named_parameters())


@torch.no_grad()
def test_channel_prefix_uses_the_first_columns_and_rows():
    """DC-AE 1.5 augmented training: a latent prefix x[:, :c] runs as a model cut to the first c channels."""
    torch.manual_seed(0)
    full = Sana(SanaParams(**{**PRESETS["tiny"].__dict__, "in_channels": 8}))
    small = Sana(SanaParams(**{**PRESETS["tiny"].__dict__, "in_channels": 3}))
    sd = full.state_dict()
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"][:, :3]
    sd["proj_out.weight"], sd["proj_out.bias"] = sd["proj_out.weight"][:3], sd["proj_out.bias"][:3]
    small.load_state_dict(sd)
    x, t, txt, mask = (
        torch.randn(2, 8, 4, 6),
        torch.rand(2),
        torch.randn(2, 5, 24),
        torch.ones(2, 5),
    )
    with pytest.raises(ValueError, match="latent has 3 channels, the model 8.*adaptive_channels"):
        full(x[:, :3], t, txt, mask)  # a prefix by accident is an error
    full.adaptive_channels = True
    assert torch.allclose(full(x[:, :3], t, txt, mask), small(x[:, :3], t, txt, mask), atol=1e-6)
