"""DC-AE and FLUX VAE: parity with diffusers, real parameter counts, adaptive channels, tiling, bad-input errors.

Run: python -m pytest -q tests/test_autoencoders.py
"""

import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL

from common import save_pretrained
from models import dcae, vae
from models.autoencoder import PRESETS, autoencoder_params, build_autoencoder, load_autoencoder
from models.tiling import blend_ramp, check_image_size, tile_starts, tiled


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight off its init (norm weights 1, biases 0) and give BatchNorms real statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)


@pytest.mark.parametrize("name", ["tiny", "tiny-1.5", "tiny-sana"])
def test_dcae_matches_diffusers(tmp_path, name):
    # "tiny": a 1.0-type config with ResBlock and EfficientViT stages, multi-scale attention,
    # BatchNorm, shortcuts; "tiny-1.5": the 1.5 layout (stage 0 empty, no latent shortcuts);
    # "tiny-sana": stride-2 conv / nearest-up.
    p = dcae.PRESETS["tiny-1.5" if name == "tiny-1.5" else "tiny"]
    if name == "tiny-sana":
        p = dataclasses.replace(p, downsample_block_type="Conv", upsample_block_type="interpolate")
    ref = AutoencoderDC(**dataclasses.asdict(p)).eval()
    _perturb(ref)
    ref.save_pretrained(tmp_path)
    ours = load_autoencoder(tmp_path)
    assert isinstance(ours, dcae.DCAE) and ours.spatial_factor == 8
    # non-square, batch 2
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        # diffusers leaves the scaling to the pipeline
        z_ref = ref.encode(x).latent * p.scaling_factor
        x_ref = ref.decode(z_ref / p.scaling_factor).sample
        z, x_rec = ours.encode(x), ours.decode(z_ref)
    assert z.shape == (2, p.latent_channels, 8, 12)
    assert (z - z_ref).abs().max() <= 1e-4 and (x_rec - x_ref).abs().max() <= 1e-4
    assert x_ref.abs().mean() > 0.1  # a non-trivial output


def test_half_precision_weights_are_upcast_on_cpu_unless_asked(tmp_path):
    """The zoo stores AEs in fp16; CPU convolutions have no fast fp16 path, so dtype None on a CPU means fp32."""
    AutoencoderDC(**dataclasses.asdict(dcae.PRESETS["tiny-1.5"])).half().save_pretrained(tmp_path)
    assert next(load_autoencoder(tmp_path).parameters()).dtype == torch.float32
    assert next(load_autoencoder(tmp_path, dtype=torch.float16).parameters()).dtype == torch.float16


def test_vae_matches_diffusers(tmp_path):
    p = vae.PRESETS["tiny-vae"]
    cfg = {k: v for k, v in vae.VAE(p).config().items() if k != "_class_name"}
    ref = AutoencoderKL(**cfg).eval()
    _perturb(ref)
    ref.save_pretrained(tmp_path)
    ours = load_autoencoder(tmp_path)
    assert isinstance(ours, vae.VAE) and not ours.adaptive
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        # FluxPipeline's normalisation
        z_ref = (ref.encode(x).latent_dist.mean - p.shift_factor) * p.scaling_factor
        x_ref = ref.decode(z_ref / p.scaling_factor + p.shift_factor).sample
        z, x_rec = ours.encode(x), ours.decode(z_ref)
    assert z.shape == (2, 4, 16, 24)
    assert (z - z_ref).abs().max() <= 1e-4 and (x_rec - x_ref).abs().max() <= 1e-4


def test_our_folders_load_in_diffusers(tmp_path):
    """The diffusers layout we write (common.save_pretrained + ae.config()) is a real diffusers folder."""
    torch.manual_seed(0)
    ours = dcae.DCAE(dcae.PRESETS["tiny-1.5"])
    save_pretrained(tmp_path / "dc", ours.state_dict(), ours.config())
    ref = AutoencoderDC.from_pretrained(tmp_path / "dc").eval()
    kl = vae.VAE(vae.PRESETS["tiny-vae"])
    save_pretrained(tmp_path / "kl", kl.state_dict(), kl.config())
    ref_kl = AutoencoderKL.from_pretrained(tmp_path / "kl").eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (ours.decoder(ours.encoder(x)) - ref(x).sample).abs().max() <= 1e-5
        assert (
            kl._decode(kl.posterior(x)[0]) - ref_kl.decode(ref_kl.encode(x).latent_dist.mean).sample
        ).abs().max() <= 1e-5


def test_one_dispatch_between_the_two_classes(tmp_path):
    """Params pick the class, a config dict its params, and load_autoencoder reads back what a stage writes."""
    for name, cls in (("tiny-1.5", dcae.DCAE), ("tiny-vae", vae.VAE)):
        ae = build_autoencoder(PRESETS[name], tile_px=None)
        assert (
            type(ae) is cls
            and ae.tile_px is None
            and autoencoder_params(ae.config()) == PRESETS[name]
        )
        save_pretrained(tmp_path / name, ae.state_dict(), ae.config())
        back = load_autoencoder(tmp_path / name)
        assert (
            type(back) is cls
            and not back.training
            and back.state_dict().keys() == ae.state_dict().keys()
        )
    with pytest.raises(ValueError, match="ckpt has _class_name 'FluxTransformer2DModel'"):
        autoencoder_params({"_class_name": "FluxTransformer2DModel"}, "ckpt")


# the real models, built on the meta device: parameter counts in millions (encoder, decoder) and
# tensor counts
REAL = {
    "dc-ae-f32c32-sana-1.1": (153.0, 159.2, 375),  # diffusers AutoencoderDC, the released config
    # diffusers AutoencoderDC, our inferred mapping of dc_ae_f64_1_5
    "dc-ae-1.5-f64c128": (306.5, 408.3, 340),
    "dc-ae-1.5-f32c128": (228.6, 295.0, 296),
    "dc-ae-f32c32-in-1.0": (123.2, 200.2, 362),
    "dc-ae-f64c128-in-1.0": (264.6, 412.3, 418),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_presets_on_meta(name):
    with torch.device("meta"):
        m = dcae.DCAE(dcae.PRESETS[name])
        ref = AutoencoderDC(**dataclasses.asdict(dcae.PRESETS[name]))
    enc, dec, n = REAL[name]
    count = lambda mod: round(sum(t.numel() for t in mod.parameters()) / 1e6, 1)
    assert (count(m.encoder), count(m.decoder), len(m.state_dict())) == (enc, dec, n)
    assert {k: v.shape for k, v in m.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_flux_vae_preset_on_meta():
    with torch.device("meta"):
        m = vae.VAE(vae.PRESETS["flux-vae"])
    assert round(sum(t.numel() for t in m.parameters()) / 1e6, 1) == 83.8 and m.spatial_factor == 8


def test_adaptive_prefix_equals_zero_mask():
    """DC-AE 1.5: decoding the first c channels == decoding the full latent with channels >= c zeroed (the mask)."""
    torch.manual_seed(0)
    ae = dcae.DCAE(dcae.PRESETS["tiny-1.5"]).eval()
    _perturb(ae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        for c in (1, 3, 8):
            masked = torch.cat([z[:, :c], torch.zeros_like(z[:, c:])], 1)
            assert (ae.decode(z[:, :c]) - ae.decode(masked)).abs().max() <= 1e-5
            assert torch.equal(ae.encode(x, channels=c), z[:, :c])
        # the dropped channels did matter
        assert (ae.decode(z[:, :2]) - ae.decode(z)).abs().max() > 1e-3


def test_tiling_blends_exactly():
    """Weights of overlapping neighbours sum to 1; a local operator tiled equals it untiled."""
    assert torch.allclose(blend_ramp(8, 2, "cpu")[-2:] + blend_ramp(8, 2, "cpu")[:2], torch.ones(2))
    # overlap 8: a dead margin of 2 at each shared edge, then a ramp over 4
    ramp = blend_ramp(24, 8, "cpu")
    assert ramp[:2].eq(0).all() and ramp[-2:].eq(0).all() and ramp[6:-6].eq(1).all()
    assert torch.allclose(ramp[-8:] + ramp[:8], torch.ones(8))
    # an image border: no neighbour, no ramp
    assert blend_ramp(24, 8, "cpu", start=False)[:8].eq(1).all()
    assert tile_starts(40, 16, 4) == [0, 12, 24] and tile_starts(10, 16, 4) == [0]
    x = torch.randn(1, 4, 40, 56)
    # pointwise in the input: no edge effects
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=4) * 2
    assert torch.allclose(tiled(up, x, 16, 4, 4), up(x), atol=1e-6)
    down = lambda t: torch.nn.functional.avg_pool2d(t, 4)
    assert torch.allclose(tiled(down, x, 16, 4, 0.25), down(x), atol=1e-6)
    ae = dcae.DCAE(dcae.PRESETS["tiny-1.5"], tile_px=None)
    # set after construction (sample.py --tile_px, bench.py): the overlap follows the tile size
    ae.tile_px = 256
    assert ae.overlap_px == 64


def test_tiled_autoencoder_equals_untiled_when_local():
    """With every 3x3 kernel reduced to its centre tap, each latent pixel maps to its own f x f block only, so tiled
    encode/decode must equal the one-pass result: this checks the AE's tile coordinates, scales and blending."""
    torch.manual_seed(0)
    ae = dcae.DCAE(dcae.PRESETS["tiny-1.5"], tile_px=None).eval()
    with torch.no_grad():
        for m in ae.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                centre = m.weight[..., 1, 1].clone()
                m.weight.zero_()[..., 1, 1] = centre
        x = torch.rand(1, 3, 64, 136) * 2 - 1
        z = ae.encode(x)  # (1, 8, 8, 17)
        rec = ae.decode(z)
        # 4x4-latent tiles overlapping by 2 latents; last tiles flush
        ae.tile_px, ae.tile_overlap_px = 32, 16
        z_tiled, rec_tiled = ae.encode(x), ae.decode(z)
    assert z_tiled.shape == z.shape == (1, 8, 8, 17) and rec_tiled.shape == rec.shape == (
        1,
        3,
        64,
        136,
    )
    assert (z_tiled - z).abs().max() <= 1e-5 and (rec_tiled - rec).abs().max() <= 1e-5


def test_bad_inputs(tmp_path):
    ae = dcae.DCAE(dcae.PRESETS["tiny"])  # f8, 1.0-type: not adaptive
    with pytest.raises(ValueError, match=r"nearest valid sizes: height 96 or 104, width 64"):
        ae.encode(torch.zeros(1, 3, 100, 64))
    with pytest.raises(ValueError, match="nearest valid sizes: height 8, width 8"):
        check_image_size(5, 3, 8, "x")
    with pytest.raises(ValueError, match="adaptive"):
        ae.decode(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="not adaptive"):
        vae.VAE(vae.PRESETS["tiny-vae"]).encode(torch.zeros(1, 3, 16, 16), channels=2)
    with pytest.raises(
        FileNotFoundError, match=r"not a diffusers autoencoder .*expected config.json"
    ):
        load_autoencoder(tmp_path)  # empty folder
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(
        ValueError, match="expected an autoencoder: 'AutoencoderKL'.*'AutoencoderDC'"
    ):
        load_autoencoder(tmp_path)
    with pytest.raises(ValueError, match="expected 'AutoencoderDC'"):
        dcae.DCAE.from_pretrained(tmp_path)
