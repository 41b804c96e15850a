"""SVDQuant numerics (NVFP4 / INT4 fake quantisation), the emulated modules, and the per-layer algorithm of quantize.py.

Run: python -m pytest -q tests/test_svdquant.py
"""

import pytest
import torch
from torch import nn

import quantize
from models import svdquant
from models.flux import PRESETS, Flux
from models.svdquant import (
    E2M1_GRID,
    GELU_SHIFT,
    SplitLinear,
    SVDQuantLinear,
    W4A16Linear,
    dequantize_weight,
    e2m1_decode,
    e2m1_encode,
    encode,
    flux_layers,
    load_quantized,
    quantize_act,
    quantize_weight,
    round_e2m1,
    round_e4m3,
    split_proj_out,
)

E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[E4M3.isfinite()].unique()  # every finite FP8 value, sorted


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices run on one thread: two OpenMP threads on a busy 2-core machine spin ~100x longer in small QRs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# (a) fake quantisation


def test_e2m1_codebook_round_trips_and_ties():
    grid = torch.tensor(E2M1_GRID)
    values = torch.cat([grid, -grid[1:]])
    for ties_even in (True, False):
        # every codebook value is representable
        assert torch.equal(round_e2m1(values, ties_even), values)
    assert torch.equal(e2m1_decode(e2m1_encode(values)), values)
    # -0 -> code 0, like DeepCompressor's argmin
    assert e2m1_encode(torch.tensor([-0.0])).item() == 0
    # sign bit 8 + magnitude index
    assert e2m1_encode(torch.tensor([-6.0, 6.0])).tolist() == [15, 7]
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -5.0])
    # Nunchaku's kernel (cvt.rn): half to even mantissa; DeepCompressor's codebook: half towards
    # +inf.
    assert round_e2m1(mids, ties_even=True).tolist() == [0, 1, 1, 2, 2, 4, 4, -2, -4]
    assert round_e2m1(mids, ties_even=False).tolist() == [0.5, 1, 1.5, 2, 3, 4, 6, -2, -4]
    # saturates at 6
    assert round_e2m1(torch.tensor([7.0, -100.0, 0.2, -0.3]), True).tolist() == [6, -6, 0, -0.5]


def test_e4m3_rounding_matches_torch_float8_and_saturates_at_448():
    mids = (E4M3[1:] + E4M3[:-1]) / 2
    x = torch.cat(
        [
            E4M3,
            mids,
            torch.randn(20000) * 50,
            torch.rand(2000) * 2e-3,
            torch.tensor([449.0, 470.0, 1e6]),
        ]
    )
    expected = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()  # torch: round half to even
    assert torch.equal(round_e4m3(x, ties_even=True), expected)
    assert torch.equal(round_e4m3(mids, ties_even=False), E4M3[1:])  # DeepCompressor: ties go up
    assert round_e4m3(torch.tensor([1e6, -1e6]), ties_even=False).tolist() == [448.0, -448.0]


@pytest.mark.parametrize("fp4", [True, False])
def test_weight_quantisation_groups_scales_and_exact_round_trip(fp4):
    g = 16 if fp4 else 64
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    w[5, 17] = 300.0  # one huge weight: its group scale is the largest
    q, s, t = quantize_weight(w, fp4)
    assert q.shape == w.shape and s.shape == (48, 256 // g) and t.shape == ()
    deq = q * s.repeat_interleave(g, dim=1) * t
    assert torch.equal(dequantize_weight(encode(q, fp4), s, t.expand(48), fp4), deq)
    if fp4:
        assert set(q.abs().unique().tolist()) <= set(E2M1_GRID)
        # micro-scales are FP8, the largest one saturated at 448
        assert torch.isin(s, E4M3).all() and s.max() == 448
        # the per-tensor scale is bf16 (Nunchaku's wtscale)
        assert t == t.to(torch.bfloat16).float()
        # the outlier is represented by the largest code
        assert (w[5, 17] - deq[5, 17]).abs() <= 0.05 * 300
    else:
        assert q.min() >= -8 and q.max() <= 7 and torch.equal(q, q.round())
        assert torch.equal(s, s.to(torch.bfloat16).float()) and t == 1
    # every group's largest |w| is within half a quantisation step of the grid's top value
    assert ((deq - w).abs() <= 0.5 * s.repeat_interleave(g, 1) * t * (2 if fp4 else 1) + 1e-6).all()
    # quantising the dequantised weight again gives the same codes
    q2, s2, t2 = quantize_weight(deq, fp4)
    assert torch.equal(q2, q) and torch.equal(s2, s) and t2 == t


def test_activation_quantisation_groups_and_saturation():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64)
    for fp4, g in ((True, 16), (False, 64)):
        xq = quantize_act(x, fp4)
        assert xq.shape == x.shape
        rel = (xq - x).norm() / x.norm()
        assert 0.02 < rel < 0.2, rel  # 4-bit error: present, bounded
        # a group's quantisation depends only on its own g inputs
        y = x.clone()
        y[..., :g] *= 100
        assert torch.equal(quantize_act(y, fp4)[..., g:], xq[..., g:])
    # amax/6 = 833 > 448: the FP8 scale saturates, values clip to 6·448
    big = torch.full((1, 16), 5000.0)
    assert quantize_act(big, fp4=True).max().item() == 6 * 448
    u = torch.rand(2, 64) + GELU_SHIFT
    uq = quantize_act(u, fp4=False, unsigned=True)
    s = u.amax(-1, keepdim=True) / 15  # unsigned INT4: 16 levels on [0, amax]
    assert ((uq / s.bfloat16().float()).round() - uq / s.bfloat16().float()).abs().max() < 1e-4
    assert quantize_act(torch.zeros(2, 16), fp4=True).eq(0).all()  # all-zero group: no NaN


# ----------------------------------------------------------------------------------------------------------------
# (b) modules


def test_svdquant_linear_full_rank_without_residual_equals_the_linear():
    """rank = full: the 16-bit branch is the whole (smoothed) weight and the 4-bit residual is zero, so
    y = x·(L_down/λ)ᵀ·L_upᵀ + b = x·Wᵀ + b, whatever the smoothing."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    lam = (torch.rand(64) + 0.5).bfloat16().float()
    U, S, Vh = torch.linalg.svd(lin.weight.detach().double() * lam, full_matrices=False)
    m = SVDQuantLinear(64, 48, rank=48, fp4=True, dtype=torch.float32)
    m.smooth.copy_(lam)
    m.proj_down.copy_(Vh / lam)  # lora_down / smooth
    m.proj_up.copy_(U * S)
    m.bias.copy_(lin.bias.detach())
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(m(x), lin(x), atol=1e-5, rtol=1e-5)


def test_split_linear_and_w4a16_linear():
    torch.manual_seed(0)
    lin = nn.Linear(80, 16)
    split = SplitLinear.from_linear(lin, [16, 64])
    x = torch.randn(3, 80)
    torch.testing.assert_close(split(x), lin(x))
    assert split.linears[0].bias is None and torch.equal(split.linears[1].bias, lin.bias)
    ada = nn.Linear(128, 96)
    q, s, _ = quantize_weight(ada.weight.detach(), fp4=False)
    w4a16 = W4A16Linear(128, 96, dtype=torch.float32)
    w4a16.load_state_dict(dict(qweight=encode(q, False), wscales=s, bias=ada.bias))
    v = torch.randn(2, 128)
    torch.testing.assert_close(w4a16(v), v @ (q * s.repeat_interleave(64, 1)).T + ada.bias)
    assert 0 < ((w4a16(v) - ada(v)).norm() / ada(v).norm()).item() < 0.2


# ----------------------------------------------------------------------------------------------------------------
# calibration and the per-layer algorithm


def test_calibrate_hooks_collect_extremes_and_a_uniform_row_sample():
    lin = nn.Sequential(nn.Linear(8, 8))
    xs = [torch.randn(4, 10, 8) for _ in range(3)]
    stats = quantize.calibrate(lin, lambda: [lin(x) for x in xs], ["0"], rows=16)
    allx = torch.cat([x.reshape(-1, 8) for x in xs])
    assert torch.equal(stats["0"].max, allx.amax(0)) and torch.equal(stats["0"].min, allx.amin(0))
    assert stats["0"].x.shape == (16, 8)
    assert all((allx == r).all(-1).any() for r in stats["0"].x)  # the sample is made of real rows
    assert not lin[0]._forward_pre_hooks  # hooks removed
    with pytest.raises(RuntimeError, match="never ran"):
        quantize.calibrate(lin, lambda: None, ["0"])


def make_layer(fp4, outliers=True, seed=0, name="lin", gelu=False):
    torch.manual_seed(seed)
    x = torch.randn(512, 256)
    if outliers:
        x[:, :4] *= 30  # a few large input channels, as real activations have
    if gelu:
        x = torch.nn.functional.gelu(x, approximate="tanh")  # a post-GELU input (>= -0.17)
    st = quantize.InputStats(512, torch.Generator())
    st.update(x)
    lin = nn.Linear(256, 96)
    lin.weight.data = torch.randn(96, 256) / 16
    model = nn.ModuleDict({"ff": nn.ModuleDict({"net": nn.ModuleDict({"2": lin})})})
    return model, quantize.make_layer(
        model, [name if name != "lin" else "ff.net.2"], st, fp4, "cpu"
    )


@pytest.mark.parametrize("fp4", [True, False])
def test_svdquant_beats_rtn_and_refinement_never_hurts(fp4):
    _, layer = make_layer(fp4)
    cfg = quantize.Config(num_grids=4, lowrank_iters=6, rank=16)
    _, _, (rtn,) = quantize.svdquant_group([layer], quantize.Config(method="rtn"), fp4)
    lam, (alpha, _), (svdq,) = quantize.svdquant_group([layer], cfg, fp4)
    one_shot = svdquant.refine(layer, lam, cfg.rank, 1, cfg, fp4)
    assert svdq.err <= one_shot.err  # keeps the best iterate
    assert svdq.err < 0.5 * rtn.err  # smoothing + low rank absorb the outlier channels
    assert alpha > 0 and rtn.down.shape == (0, 256) and svdq.down.shape == (16, 256)


def test_install_reproduces_the_objective_in_the_module():
    """The module built from a search result computes the output the search scored, incl. INT4's unsigned, shifted
    post-GELU input whose shift is compensated in the bias."""
    for fp4 in (True, False):
        model, layer = make_layer(fp4, seed=1, gelu=True)
        assert layer.shift == (0.0 if fp4 else GELU_SHIFT)  # ff.net.2: shifted under INT4 only
        cfg = quantize.Config(num_grids=4, lowrank_iters=3, rank=8)
        lam, _, (res,) = quantize.svdquant_group([layer], cfg, fp4)
        quantize.install(model, layer, lam, res, fp4)
        m = model.get_submodule("ff.net.2")
        assert m.act_shift == layer.shift
        err = (m(layer.x) - layer.b - layer.y).square().sum().item()
        assert err == pytest.approx(res.err, rel=0.02)  # same up to the bf16 rounding of L_down/λ
        assert res.err < 0.01 * layer.y.square().sum().item()


def test_quantized_model_saves_and_reloads_bit_exactly(tmp_path):
    torch.manual_seed(0)
    model = Flux(PRESETS["tiny"]).eval()
    split_proj_out(model)
    groups, _ = flux_layers(model)
    cfg = quantize.Config(
        num_grids=2, lowrank_iters=2, precision="int4", latent_hw=4, txt_len=5, calib_batches=1
    )
    batches = list(quantize.random_batches(model.params, cfg, 0, 1))
    ref = quantize.run_batches(model, batches)[0]
    stats = quantize.calibrate(
        model, lambda: quantize.run_batches(model, batches), [g[0] for gr in groups for g in gr]
    )
    quantize.quantize_model(model, stats, cfg)
    out = quantize.run_batches(model, batches)[0]
    # quantised, still the same function roughly
    assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.3
    assert isinstance(model.single_transformer_blocks[0].proj_out.linears[1], SVDQuantLinear)
    # INT4 post-GELU input is unsigned
    assert model.transformer_blocks[0].ff.net[2].act_shift == GELU_SHIFT
    assert model.transformer_blocks[0].ff.net[0].proj.act_shift == 0.0
    from common import save_pretrained

    save_pretrained(
        tmp_path,
        model.state_dict(),
        {**model.diffusers_config(), "_svdquant": {"precision": "int4", "rank": 32}},
    )
    reloaded = load_quantized(tmp_path)
    assert torch.equal(quantize.run_batches(reloaded, batches)[0], out)
