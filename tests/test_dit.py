"""models/dit.py against diffusers' DiTTransformer2DModel, models/c2i.py's samplers against DiTPipeline and
DDPMScheduler, models/uvit.py's channel prefixes, and the presets' parameter counts on the meta device.

Run: python -m pytest -q tests/test_dit.py
"""

import json
import math

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
)

from models.autoencoder import load_autoencoder
from models.c2i import class_ids, ddim_sample, ddpm_sample, dopri5, flow_sample
from models.dit import PRESETS, DiT
from models.uvit import PRESETS as UVIT_PRESETS
from models.uvit import UViT


def tiny_diffusers(C=4, p=2, learn_sigma=True, size=8, eps=1e-5, classes=1000, seed=0):
    """A tiny random diffusers DiT, weights far from init (the zero-initialised adaLN and head too),
    every block's embedder copy equal to block 0's as in converted DiT checkpoints."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=C,
        out_channels=2 * C if learn_sigma else C,
        num_layers=2,
        sample_size=size,
        patch_size=p,
        num_embeds_ada_norm=classes,
        norm_eps=eps,
    )
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.2)
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


@pytest.mark.parametrize(
    "C,p,learn_sigma,size,eps", [(4, 2, True, 8, 1e-5), (3, 1, False, 6, 1e-6)]
)
def test_dit_matches_diffusers(tmp_path, C, p, learn_sigma, size, eps):
    ref = tiny_diffusers(C, p, learn_sigma, size, eps, classes=10)
    ref.save_pretrained(tmp_path / "t")
    ours = DiT.from_pretrained(tmp_path / "t")
    assert ours.params.learn_sigma == learn_sigma and ours.params.patch_size == p
    for side in (size, size + 2 * p):  # the native grid and a larger one (stretched positions)
        x = torch.randn(3, C, side, side)
        t, y = torch.tensor([0.0, 500.0, 999.0]), torch.tensor([1, 10, 3])  # 10: the null class
        with torch.no_grad():
            want = ref(x, timestep=t, class_labels=y).sample
            assert torch.equal(ours(x, t, label=y), want)
    # and back: our save loads in diffusers with the same outputs
    ours.save_pretrained(tmp_path / "back")
    again = DiTTransformer2DModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(again(x, timestep=t, class_labels=y).sample, ours(x, t, label=y))


def test_dit_rejects_per_block_embedders(tmp_path):
    ref = tiny_diffusers(classes=10)
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1)
    ref.save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="per-block embedders"):
        DiT.from_pretrained(tmp_path / "t")


def dit_folder(tmp_path):
    """A facebook/DiT-XL-2-256-style folder: transformer, SD-VAE, DDIM scheduler, id2label."""
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.18215,
    ).eval()
    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    id2label = {str(i): f"class{i}, synonym{i}" for i in range(1000)}
    pipe = DiTPipeline(
        tiny_diffusers(), vae, sched, id2label={int(k): v for k, v in id2label.items()}
    )
    pipe.save_pretrained(tmp_path / "dit")
    index = tmp_path / "dit" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "id2label": id2label}))
    return pipe, tmp_path / "dit"


def test_ddim_sampler_matches_dit_pipeline(tmp_path):
    pipe, folder = dit_folder(tmp_path)
    model = DiT.from_pretrained(folder / "transformer")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    labels = [3, 999]
    for cfg in (4.0, 1.0):
        want = pipe(
            labels,
            guidance_scale=cfg,
            generator=torch.Generator().manual_seed(7),
            num_inference_steps=5,
            output_type="pt",
        ).images
        noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
        z = ddim_sample(model, noise, torch.tensor(labels), sched, steps=5, cfg=cfg)
        ae = load_autoencoder(folder / "vae")
        with torch.no_grad():
            img = (ae.decode(z) / 2 + 0.5).clamp(0, 1)
        assert (img - want).abs().max() < 1e-5, cfg
    index = json.loads((folder / "model_index.json").read_text())
    assert class_ids(["synonym5", "12", "class7"], index["id2label"]) == [5, 12, 7]
    with pytest.raises(ValueError, match="neither"):
        class_ids(["zebra"], index["id2label"])


def test_ddpm_learned_sigma_matches_diffusers_step():
    """DiT's ancestral sampler with the learned Σ against DDPMScheduler(variance_type=learned_range)
    fed the full 2C output, the same noise draws."""
    model = DiT(PRESETS["tiny"]).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.2)
    sched = DDPMScheduler(variance_type="learned_range", clip_sample=False)
    sched.set_timesteps(4)
    labels, noise = torch.tensor([3, 7]), torch.randn(2, 4, 8, 8)
    x, g = noise.clone(), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(
                torch.cat([x, x]),
                torch.full((4,), float(t)),
                torch.cat([labels, torch.full((2,), 1000)]),
            )
            eps = out[2:, :4] + 2.0 * (out[:2, :4] - out[2:, :4])
            x = sched.step(torch.cat([eps, out[:2, 4:]], 1), t, x, generator=g).prev_sample
    cfg = dict(sched.config)
    ours = ddpm_sample(
        model,
        noise,
        labels,
        cfg,
        4,
        cfg=2.0,
        spacing="leading",
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5)


def test_parameter_counts_on_meta():
    def count(cls, params):
        with torch.device("meta"):
            return sum(p.numel() for p in cls(params).parameters())

    # DiT-XL/2: 675 M in DiT Table 4, which counts its fixed 256 x 1152 sincos table (a frozen
    # nn.Parameter there, a buffer here): 674,834,720 + 294,912 = 675,129,632, the original count
    assert count(DiT, PRESETS["dit-xl-2-256"]) + 256 * 1152 == 675_129_632
    # U-ViT-H/2: 501 M (U-ViT Table 1)
    assert round(count(UViT, UVIT_PRESETS["uvit-h-2"]) / 1e6) == 501
    # USiT-2B as the official config builds it (depth 28 = 14 + 1 + 14 blocks, width 2048): 1.58 B
    assert round(count(UViT, UVIT_PRESETS["usit-2b"]) / 1e7) == 158


@pytest.mark.parametrize("cls,preset,p", [(DiT, "tiny", 2), (UViT, "tiny", 1)])
def test_channel_prefix(cls, preset, p):
    """A prefix x[:, :C'] runs the first C' input channels of the embedder and the head rows of
    channels :C' (and their Σ): the same as a model cut down to C' channels."""
    torch.manual_seed(0)
    params = (PRESETS if cls is DiT else UVIT_PRESETS)[preset]
    model = cls(params).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="prefix"):
        model(x[:, :2], t, y)
    model.adaptive_channels = True
    out = model(x[:, :2], t, y)
    small = cls(type(params)(**{**params.__dict__, "in_channels": 2})).eval()
    sd = model.state_dict()
    emb = "pos_embed.proj" if cls is DiT else "patch_embed.proj"
    head = "proj_out_2" if cls is DiT else "decoder_pred"
    sd[emb + ".weight"] = sd[emb + ".weight"][:, :2]
    w, b = model.head_rows(2)
    sd[head + ".weight"], sd[head + ".bias"] = w, b
    small.load_state_dict(sd)
    assert torch.equal(small(x[:, :2], t, y), out)
    assert out.shape[1] == (4 if cls is DiT else 2)  # ε and Σ of 2 channels


def test_flow_sample_sit_convention():
    """An official SiT model (t = 1 - σ, v = x1 - x0) and its twin in our convention sample the
    same latent."""
    model = UViT(UVIT_PRESETS["tiny"]).eval()

    class Sit(torch.nn.Module):
        null_label = model.null_label

        def forward(self, x, t, label):
            return -model(x, 1 - t, label)

    noise, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    a = flow_sample(model, noise, y, steps=3, cfg=2.0)
    b = flow_sample(Sit(), noise, y, steps=3, cfg=2.0, sit=True)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, noise)


def test_dopri5_reaches_the_exact_solution_to_its_tolerance():
    """A linear system (x(1) = e^A x0) and a time-dependent one (x(2) = x0·e^(sin 2)): the error
    follows the tolerance, and a tighter tolerance takes more evaluations."""
    torch.manual_seed(0)
    A, x0 = torch.randn(6, 6, dtype=torch.float64) * 0.7, torch.randn(6, dtype=torch.float64)
    exact = torch.linalg.matrix_exp(A) @ x0
    loose, n_loose = dopri5(lambda t, x: A @ x, x0, 0.0, 1.0, atol=1e-9, rtol=1e-3)
    tight, n_tight = dopri5(lambda t, x: A @ x, x0, 0.0, 1.0, atol=1e-9, rtol=1e-6)
    assert (loose - exact).abs().max() < 1e-2 and (tight - exact).abs().max() < 1e-5
    assert n_tight > n_loose
    x, _ = dopri5(lambda t, x: math.cos(t) * x, x0, 0.0, 2.0, atol=1e-10, rtol=1e-8)
    assert torch.allclose(x, x0 * math.exp(math.sin(2.0)), atol=1e-7)


def test_flow_sample_dopri5_is_the_limit_of_euler():
    """The same ODE: Euler's answer approaches dopri5's as its steps grow."""
    model = UViT(UVIT_PRESETS["tiny"]).eval()
    noise, y = (
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.tensor([1, 2]),
    )
    d = flow_sample(model, noise, y, steps=0, cfg=2.0, solver="dopri5")
    gaps = [(flow_sample(model, noise, y, steps=n, cfg=2.0) - d).abs().max() for n in (5, 400)]
    assert gaps[1] < gaps[0] and gaps[1] < 2e-3 and not torch.allclose(d, noise)


def test_gaussian_loss_vlb_vanishes_for_the_true_posterior():
    """DiT's loss: an oracle that returns the drawn noise and the posterior's own variance (v = -1)
    has zero ε MSE and zero KL at every t > 0; a wrong Σ costs more."""
    from models.c2i import alphas_cumprod, gaussian_loss

    x0 = torch.rand(8, 4, 4, 4) * 1.6 - 0.8
    g0 = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (8,), generator=g0)
    noise = torch.randn(x0.shape, generator=g0)
    assert (t > 0).all()

    class Oracle(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x_t, t_, label):
            return torch.cat([noise, torch.full_like(noise, self.v)], dim=1)

    loss = gaussian_loss(Oracle(-1.0), x0, {"label": None}, torch.Generator().manual_seed(5))
    worse = gaussian_loss(Oracle(1.0), x0, {"label": None}, torch.Generator().manual_seed(5))
    assert loss.abs() < 1e-5 and worse > 1e-3
    assert alphas_cumprod({})[-1] < 1e-4  # DiT's linear betas 1e-4 .. 0.02 over 1000 steps
