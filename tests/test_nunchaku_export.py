"""Nunchaku export: an independent unpacker gives back our quantised tensors bit-exactly, and the file's names, shapes
and dtypes are what NunchakuFluxTransformer2DModelV2.from_pretrained loads (tiny model, and the real 19 + 38 x 3072
layout on the meta device).

Run: python -m pytest -q tests/test_nunchaku_export.py
"""

import json
from dataclasses import replace

import pytest
import torch
from nunchaku_reference import (
    unpack_awq_w4,
    unpack_lowrank,
    unpack_micro_scales,
    unpack_scales,
    unpack_w4,
    v2_expected,
    v2_load,
)

from models.flux import PRESETS, Flux
from models.nunchaku import DOUBLE_LAYERS, SINGLE_LAYERS, nunchaku_metadata, nunchaku_state_dict
from models.svdquant import SVDQuantLinear, W4A16Linear, flux_layers, quantized_structure

BF16 = torch.bfloat16
E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
E4M3 = E4M3[E4M3.float().isfinite() & (E4M3.float() > 0)]  # positive finite FP8 values


def bits(t):
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int16)


@torch.no_grad()
def random_quantized(params, fp4: bool, rank: int, seed: int = 0) -> Flux:
    """A Flux in quantized_structure layout with random codes, scales and branches (fused parts share λ and L_down)."""
    g = torch.Generator().manual_seed(seed)
    rnd16 = lambda *s: torch.randn(*s, generator=g).to(BF16)
    model = quantized_structure(Flux(params), fp4, rank)
    groups, w4a16 = flux_layers(model)
    for layer in (layer for group in groups for layer in group):
        lam, down = (
            (
                torch.rand(
                    params.hidden_size * 0 + model.get_submodule(layer[0]).in_features, generator=g
                )
                + 0.5
            ),
            None,
        )
        for name in layer:
            m: SVDQuantLinear = model.get_submodule(name)
            down = rnd16(rank, m.in_features) if down is None else down
            n, G = m.wscales.shape
            m.qweight.copy_(torch.randint(0, 16, m.qweight.shape, generator=g) - (0 if fp4 else 8))
            if fp4:
                m.wscales.copy_(E4M3[torch.randint(0, len(E4M3), (n, G), generator=g)])
                m.wcscales.fill_(torch.rand((), generator=g).item())  # one tensor scale per linear
            else:
                m.wscales.copy_(torch.rand(n, G, generator=g).to(BF16))
            m.smooth.copy_(lam)
            m.proj_down.copy_(down)
            m.proj_up.copy_(rnd16(*m.proj_up.shape))
            m.bias.copy_(rnd16(n))
    for name in w4a16:
        m: W4A16Linear = model.get_submodule(name)
        m.qweight.copy_(torch.randint(-7, 8, m.qweight.shape, generator=g))
        m.wscales.copy_(torch.rand(m.wscales.shape, generator=g).to(BF16))
        m.bias.copy_(rnd16(m.out_features))
    return model


@pytest.mark.parametrize("fp4", [True, False])
# 64: everything padded (to 128 / 16 groups); 128: only the AdaLN scales
@pytest.mark.parametrize("hidden", [64, 128])
def test_unpacking_the_export_gives_back_every_tensor_bit_exactly(fp4, hidden):
    params = (
        PRESETS["tiny"]
        if hidden == 64
        else replace(PRESETS["tiny"], hidden_size=128, axes_dim=(16, 24, 24))
    )
    model = random_quantized(params, fp4, rank=16)
    sd = nunchaku_state_dict(model)
    seen = set()
    for kind, layers in (
        ("transformer_blocks", DOUBLE_LAYERS),
        ("single_transformer_blocks", SINGLE_LAYERS),
    ):
        for i, block in enumerate(getattr(model, kind)):
            for disk, ours in layers.items():
                parts = [block.get_submodule(n) for n in ours]
                p, cat = (
                    f"{kind}.{i}.{disk}",
                    lambda a, parts=parts: torch.cat([getattr(m, a) for m in parts]),
                )
                out, inp, G = (
                    sum(m.out_features for m in parts),
                    parts[0].in_features,
                    parts[0].wscales.shape[1],
                )
                assert torch.equal(
                    unpack_w4(sd[f"{p}.qweight"])[:out, :inp], cat("qweight").int() & 0xF
                )
                assert unpack_w4(sd[f"{p}.qweight"])[out:].eq(0).all()  # padded rows are code 0
                if fp4:
                    assert sd[f"{p}.wscales"].dtype == torch.float8_e4m3fn
                    assert torch.equal(
                        bits(unpack_micro_scales(sd[f"{p}.wscales"])[:out, :G]),
                        bits(cat("wscales")),
                    )
                    if len(parts) > 1:  # fused q/k/v: three tensor scales as per-channel wcscales
                        assert torch.equal(
                            bits(unpack_scales(sd[f"{p}.wcscales"])[:out]), bits(cat("wcscales"))
                        )
                        assert f"{p}.wtscale" not in sd
                    else:
                        assert (
                            sd[f"{p}.wtscale"].shape == (1,)
                            and sd[f"{p}.wtscale"].item() == parts[0].wcscales[0]
                        )
                else:
                    ws = unpack_scales(sd[f"{p}.wscales"])
                    ws = ws[:out, None] if ws.ndim == 1 else ws[:out, :G]
                    assert torch.equal(bits(ws), bits(cat("wscales")))
                    assert f"{p}.wtscale" not in sd and f"{p}.wcscales" not in sd
                assert torch.equal(bits(unpack_scales(sd[f"{p}.bias"])[:out]), bits(cat("bias")))
                for k in ("smooth", "smooth_orig"):
                    assert torch.equal(
                        bits(unpack_scales(sd[f"{p}.{k}"])[:inp]), bits(parts[0].smooth)
                    )
                down, up = (
                    unpack_lowrank(sd[f"{p}.lora_down"], down=True),
                    unpack_lowrank(sd[f"{p}.lora_up"], False),
                )
                assert (
                    torch.equal(bits(down[:16, :inp]), bits(parts[0].proj_down))
                    and down[:, inp:].eq(0).all()
                )
                assert torch.equal(bits(up[:out]), bits(cat("proj_up")))
                seen.add(p)
            for name, chunks in (
                ("norm1.linear", 6),
                ("norm1_context.linear", 6),
                ("norm.linear", 3),
            ):
                if not hasattr(block, name.split(".")[0]):
                    continue
                m, p = block.get_submodule(name), f"{kind}.{i}.{name}"
                D, G = m.out_features // chunks, m.in_features // 64
                # file row j·chunks + c
                order = torch.arange(m.out_features).reshape(chunks, D).T.reshape(-1)
                assert torch.equal(unpack_awq_w4(sd[f"{p}.qweight"]) - 7, m.qweight[order].int())
                assert torch.equal(bits(sd[f"{p}.wscales"][:G].T), bits(m.wscales[order]))
                assert sd[f"{p}.wscales"][G:].eq(0).all() and sd[f"{p}.wscales"].shape[0] % 16 == 0
                assert torch.equal(
                    sd[f"{p}.wzeros"][:G].T, (-(7 * m.wscales[order].float())).to(BF16)
                )
                # scale chunks get +1
                one = torch.tensor([c in (1, chunks - 2) for c in range(chunks)]).repeat(D)
                assert torch.equal(
                    bits(sd[f"{p}.bias"]), bits((m.bias[order] + one.to(BF16)).to(BF16))
                )
    assert len(seen) == 8 * params.depth + 4 * params.depth_single
    for k, v in model.state_dict().items():
        if not k.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            assert torch.equal(sd[k], v.to(BF16)), k  # the 16-bit remainder, diffusers names
    assert torch.equal(
        sd["transformer_blocks.0.norm_added_k.weight"],
        model.transformer_blocks[0].attn.norm_added_k.weight.to(BF16),
    )


@pytest.mark.parametrize("fp4", [True, False])
def test_tiny_export_names_and_shapes_are_what_nunchaku_v2_loads(fp4):
    """Width 128: every name, shape and dtype matches the loader, except the AdaLN W4A16 scale rows, which
    DeepCompressor's TinyChat packer pads to 16 groups (ceil_num_groups) while Nunchaku allocates in/64 = 2."""
    params = replace(PRESETS["tiny"], hidden_size=128, axes_dim=(16, 24, 24))
    model = random_quantized(params, fp4, rank=32)
    sd, meta = nunchaku_state_dict(model), nunchaku_metadata(model, fp4, 32)
    expected, svdq = v2_expected(json.loads(meta["config"]), fp4, rank=32)
    problems = v2_load(sd, expected, svdq, fp4)
    awq_rows = [
        p
        for p in problems
        if (".wscales:" in p or ".wzeros:" in p) and "(16, " in p and "(2, " in p
    ]
    assert problems == awq_rows and len(awq_rows) == 2 * (2 * params.depth + params.depth_single)


@pytest.mark.parametrize("preset", ["flux-dev", "dcgen-flux-4k"])
@pytest.mark.parametrize("fp4", [True, False])
def test_real_layout_on_meta_loads_into_nunchaku_v2_exactly(preset, fp4):
    """The real 19 + 38 x 3072 blocks (and DC-Gen's 128-channel 1x1-patch embedder): not one missing, unexpected,
    misshapen or mistyped tensor for the v2 loader, with `rank` from the metadata."""
    with torch.device("meta"):
        model = quantized_structure(Flux(PRESETS[preset]), fp4, rank=32)
    sd, meta = nunchaku_state_dict(model), nunchaku_metadata(model, fp4, 32)
    config, qc = json.loads(meta["config"]), json.loads(meta["quantization_config"])
    assert (config["num_layers"], config["num_single_layers"], config["in_channels"]) == (
        19,
        38,
        64 if preset == "flux-dev" else 128,
    )
    assert qc == {
        "method": "svdquant",
        "rank": 32,
        "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
        if fp4
        else {"dtype": "int4", "scale_dtype": None, "group_size": 64},
        "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16}
        if fp4
        else {"dtype": "int4", "scale_dtype": None, "group_size": 64},
    }
    comfy = json.loads(meta["comfy_config"])
    assert comfy["model_class"] == "Flux" and comfy["model_config"]["hidden_size"] == 3072
    expected, svdq = v2_expected(config, fp4, rank=qc["rank"])
    assert v2_load(sd, expected, svdq, fp4) == []
    assert len(svdq) == 8 * 19 + 4 * 38
    n_wtscale = sum(k.endswith(".wtscale") for k in sd)
    # NVFP4 unfused layers; fused q/k/v carry wcscales
    assert n_wtscale == (6 * 19 + 3 * 38 if fp4 else 0)
    assert sd["transformer_blocks.0.qkv_proj.qweight"].shape == (9216, 1536)
    assert sd["single_transformer_blocks.0.mlp_fc2.lora_down"].shape == (12288, 32)
    assert sd["transformer_blocks.0.norm1.linear.qweight"].shape == (18432 // 4, 1536)
