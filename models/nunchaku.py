"""Nunchaku's on-disk SVDQuant FLUX checkpoint, written from our quantised model (pure tensor code, no file I/O),
and whether the real Nunchaku can load it here (`nunchaku_problem`, for quantize.py --check).

One `.safetensors` file (`nunchaku/merge_safetensors.py`): metadata `config` (diffusers transformer config.json),
`comfy_config`, `model_class`, `quantization_config`; tensors with Nunchaku's v1 block names (`qkv_proj`, `mlp_fc1`,
`lora_down`, `smooth`, ...), which both loaders read: the C++ NunchakuFluxTransformer2dModel directly, and
NunchakuFluxTransformer2DModelV2 after `convert_flux_state_dict` renames them (`qkv_proj` -> `attn.to_qkv`,
`lora_down` -> `proj_down`, `smooth` -> `smooth_factor`, ...; nunchaku/models/transformers/transformer_flux_v2.py).
Everything outside the blocks keeps its diffusers name, in bf16.

Per W4A4 layer (DeepCompressor backend/nunchaku/convert.py: convert_to_nunchaku_w4x4y16_linear_state_dict and
utils.py: convert_to_nunchaku_w4x4y16_linear_weight, NunchakuWeightPacker with warp_n = 128), out/in padded to 128:

    qweight   int8 (out, in/2)          4-bit codes in the MMA tile order of pack_weight
    wscales   NVFP4: float8_e4m3fn (in/16, out), pack_micro_scale;  INT4: bf16 (in/64, out), pack_scale
    wtscale   bf16 (1,)                 NVFP4 per-tensor scale of an unfused layer
    wcscales  bf16 (out,)               NVFP4 per-channel scale of fused q/k/v (their three tensor scales)
    bias, smooth, smooth_orig   bf16 (out,) / (in,)   pack_scale order; smooth_orig = smooth (fuse_when_possible: false)
    lora_down bf16 (in, r), lora_up bf16 (out, r)     pack_lowrank_weight; lora_down = L_down / λ

AdaLN linears are AWQ W4A16 (TinyChat layout; convert_to_nunchaku_w4x16_linear_weight): rows reordered from
[chunks, D] to [D, chunks], +1 folded into the scale chunks of the bias, qweight int32 (out/4, in/2), wscales and
wzeros bf16 (in/64 rounded up by ceil_num_groups, out).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from models.svdquant import SVDQuantLinear, W4A16Linear

# v1 on-disk layer name -> our linears, fused along the output in this order (convert.py
# local_name_map)
DOUBLE_LAYERS = {
    "qkv_proj": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "qkv_proj_context": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "out_proj": ("attn.to_out.0",),
    "out_proj_context": ("attn.to_add_out",),
    "mlp_fc1": ("ff.net.0.proj",),
    "mlp_fc2": ("ff.net.2",),
    "mlp_context_fc1": ("ff_context.net.0.proj",),
    "mlp_context_fc2": ("ff_context.net.2",),
}
SINGLE_LAYERS = {
    "qkv_proj": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "out_proj": ("proj_out.linears.0",),
    "mlp_fc1": ("proj_mlp",),
    "mlp_fc2": ("proj_out.linears.1",),
}
DOUBLE_NORMS = {
    "norm_q": "attn.norm_q",
    "norm_k": "attn.norm_k",
    "norm_added_q": "attn.norm_added_q",
    "norm_added_k": "attn.norm_added_k",
}
SINGLE_NORMS = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}
DOUBLE_ADANORM = {"norm1.linear": 6, "norm1_context.linear": 6}  # name -> chunks (adanorm_splits)
SINGLE_ADANORM = {"norm.linear": 3}

# NunchakuWeightPacker(bits=4, warp_n=128): output tile; input tile mem_k · num_k_unrolls = 64 · 2
WARP_N = 128


def pad(t: Tensor, multiples: tuple[int, ...], fill: float = 0) -> Tensor:
    """Pad every dim i at the end to a multiple of multiples[i], with `fill` (backend/utils.py:
    pad)."""
    shape = [-(-n // m) * m for n, m in zip(t.shape, multiples)]
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def pack_w4(codes: Tensor) -> Tensor:
    """4-bit codes (n, k) -> int8 (n, k/2) in Nunchaku's MMA tile order (utils.py:
        NunchakuWeightPacker.pack_weight).

    n = (tile, 8 packs, 2, 8 lanes), k = (tile of 64, 2, 4 lanes, 8 nibbles of one 32-bit register);
        a warp reads the permutation (n tile, k tile, n pack, n lane, k lane, n sub, k sub, nibble) as
        consecutive 32-bit words."""
    w = pad(codes.to(torch.int32) & 0xF, (WARP_N, 2 * 64))
    n, k = w.shape
    w = w.reshape(n // 128, 8, 2, 8, k // 64, 2, 4, 8).permute(0, 4, 1, 3, 6, 2, 5, 7)
    # 8 nibbles of a little-endian int32 = 4 bytes of (low nibble, high nibble)
    w = w.reshape(-1, 4, 2)
    return (w[..., 0] | (w[..., 1] << 4)).to(torch.uint8).view(torch.int8).reshape(n, k // 2)


def pack_micro_scales(s: Tensor) -> Tensor:
    """NVFP4 group-16 scales (out, in/16) -> float8_e4m3fn (in/16, out) in the order of `mma ...
    block_scale.scale_vec::4X` (utils.py: pack_micro_scale): lane 4·l + q holds outputs 32·p + 8·q +
    l of p = 0..3, each as 4 consecutive group scales (one 64-wide k tile)."""
    s = pad(s.float(), (WARP_N, 64 // 16), fill=1).to(torch.float8_e4m3fn)
    n, groups = s.shape
    # (tile, ktile, l, q, p, kgroup)
    s = s.reshape(n // 128, 4, 4, 8, groups // 4, 4).permute(0, 4, 3, 2, 1, 5)
    return s.reshape(-1, n)


def pack_scales(s: Tensor, group_pad: int = 2) -> Tensor:
    """16-bit per-output values (out,) or group scales (out, G) -> packed bf16 ((out,) or (G, out))
    in the order of the mma.m16n8 accumulator (utils.py: pack_scale, warp_n 128: s_pack_size 4, 32
    lanes): lane 4·a + c holds outputs 16·a + 8·b + 2·c + d for b, d in {0, 1}. Padded outputs (and
    groups, to an even count) are filled with 1."""
    vector = s.ndim == 1
    s = pad(
        s.to(torch.bfloat16).reshape(s.shape[0], -1), (WARP_N, 1 if vector else group_pad), fill=1
    )
    n, groups = s.shape
    # (tile, group, a, c, b, d)
    s = s.reshape(n // 128, 8, 2, 4, 2, groups).permute(0, 5, 1, 3, 2, 4)
    return s.reshape(-1) if vector else s.reshape(-1, n)


def pack_lowrank(w: Tensor, down: bool) -> Tensor:
    """Low-rank factor -> bf16 in 16x16 MMA fragments (utils.py: pack_lowrank_weight). down: L_down
    (r, in) -> (in, r); up: L_up (out, r) -> (out, r). The big dim is padded to 128, both to 16 (the
    rank to a multiple of 16)."""
    w = pad(w.to(torch.bfloat16), (16, WARP_N) if down else (WARP_N, 16))
    if down:  # (r, c): the MMA's n is the rank, k the input
        r, c = w.shape
        w = w.reshape(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3)
    else:  # (c, r): n is the output, k the rank
        c, r = w.shape
        w = w.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    # (c pack, r pack, 16 n, 16 k) -> (c pack, r pack, n lane, k lane, n sub, k sub, 2 values of one
    # register)
    w = w.reshape(c // 16, r // 16, 2, 8, 2, 4, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return w.reshape(c, r)


def svdq_layer(parts: list[SVDQuantLinear]) -> dict[str, Tensor]:
    """One Nunchaku W4A4 layer from our linears fused along the output
    (convert_to_nunchaku_w4x4y16_linear_weight)."""
    first = parts[0]
    if first.proj_down.device.type != "meta":  # fused parts share their input: same λ and L_down
        assert all(
            torch.equal(p.smooth, first.smooth) and torch.equal(p.proj_down, first.proj_down)
            for p in parts
        )
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])
    qweight, wscales, wcscales = cat("qweight"), cat("wscales"), cat("wcscales")
    # NOTE(deviation): DeepCompressor never exports rank 0; for the RTN ablation we write a zero
    # rank-16 branch, since every Nunchaku W4A4 layer has one (its packer pads ranks to multiples of
    # 16).
    down, up = first.proj_down, cat("proj_up")
    if first.rank == 0:
        down, up = down.new_zeros(16, first.in_features), up.new_zeros(up.shape[0], 16)
    sd = {"qweight": pack_w4(qweight)}
    if first.fp4:
        sd["wscales"] = pack_micro_scales(wscales)
        if len(parts) > 1:  # fused q/k/v: three tensor scales become per-channel wcscales
            sd["wcscales"] = pack_scales(wcscales)
        else:  # the first element of the packed (all equal) per-channel vector
            sd["wtscale"] = wcscales[:1].to(torch.bfloat16)
    # one group per row (in = 64) is packed as a vector: pack_scale(group_size=-1) when group size
    # == in
    else:
        sd["wscales"] = pack_scales(wscales[:, 0] if wscales.shape[1] == 1 else wscales)
    sd["bias"] = pack_scales(cat("bias"))
    sd["smooth"] = pack_scales(first.smooth)
    sd["smooth_orig"] = sd["smooth"].clone()
    sd["lora_down"] = pack_lowrank(down, down=True)
    sd["lora_up"] = pack_lowrank(up, down=False)
    return sd


def pack_awq_w4(q: Tensor) -> Tensor:
    """Unsigned 4-bit (out, in) -> int32 (out/4, in/2), TinyChat's GEMV order
    (backend/tinychat/utils.py: pack_w4): 16-bit word t of a 32-input block holds inputs t, t+8,
    t+16, t+24; rows go in 4-row x 64-input tiles."""
    oc, ic = q.shape
    w = q.to(torch.int32).reshape(-1, 4, 8)
    w = w[:, 0] | (w[:, 1] << 4) | (w[:, 2] << 8) | (w[:, 3] << 12)  # (oc·ic/32, 8) 16-bit words
    w = w.reshape(oc // 4, 4, ic // 64, 16).permute(0, 2, 1, 3).reshape(oc // 4, ic)
    return w.to(torch.int16).view(torch.int32)


def awq_layer(m: W4A16Linear, chunks: int) -> dict[str, Tensor]:
    """AdaLN linear -> Nunchaku AWQ W4A16 (convert_to_nunchaku_w4x16_linear_weight with
    adanorm_splits = chunks)."""
    out, inp = m.qweight.shape
    interleave = lambda t: (
        t.reshape(chunks, out // chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    )
    # Nunchaku reads the output as view(B, D, chunks): row j·chunks + c <- row c·D + j. Its AdaLN
    # adds no 1 to the scales (scale_shift=0), so the 1 of x·(1 + scale) goes into the bias of the
    # scale chunks (indices 1 and -2).
    delta = torch.zeros(chunks, dtype=torch.bfloat16, device=m.bias.device)
    delta[1] = delta[-2] = 1
    bias = (interleave(m.bias.to(torch.bfloat16)).reshape(out // chunks, chunks) + delta).reshape(
        out
    )
    q = interleave(m.qweight).to(torch.int32) + 7  # zero point 7: unsigned [0, 14]
    s = interleave(m.wscales)  # (out, G) bf16
    groups = inp // 64
    # ceil_num_groups: 8 groups per int32 pack, an even number of packs for group 64
    packs = -(-groups // 8)
    padded = (packs + packs % 2) * 8
    wscales = torch.zeros(padded, out, dtype=torch.bfloat16, device=s.device)
    wzeros = torch.zeros_like(wscales)
    wscales[:groups] = s.t()
    # dequant: q_u·s + z = (q + 7)·s - 7·s
    wzeros[:groups] = (7 * s.float()).t().to(torch.bfloat16).neg()
    return {"qweight": pack_awq_w4(q), "wscales": wscales, "wzeros": wzeros, "bias": bias}


def nunchaku_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """All tensors of the Nunchaku file for a quantised Flux (quantized_structure layout; meta
    tensors work)."""
    sd, used = {}, set()
    for kind, layers, norms, adanorm in (
        ("transformer_blocks", DOUBLE_LAYERS, DOUBLE_NORMS, DOUBLE_ADANORM),
        ("single_transformer_blocks", SINGLE_LAYERS, SINGLE_NORMS, SINGLE_ADANORM),
    ):
        for i, block in enumerate(getattr(model, kind)):
            p = f"{kind}.{i}"
            for disk, ours in layers.items():
                sd.update(
                    {
                        f"{p}.{disk}.{k}": v
                        for k, v in svdq_layer([block.get_submodule(n) for n in ours]).items()
                    }
                )
                used.update(f"{p}.{n}." for n in ours)
            for disk, ours in norms.items():
                sd[f"{p}.{disk}.weight"] = block.get_submodule(ours).weight.to(torch.bfloat16)
                used.add(f"{p}.{ours}.")
            for name, chunks in adanorm.items():
                sd.update(
                    {
                        f"{p}.{name}.{k}": v
                        for k, v in awq_layer(block.get_submodule(name), chunks).items()
                    }
                )
                used.add(f"{p}.{name}.")
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    for k, v in model.state_dict().items():
        if not k.startswith(blocks):
            sd[k] = v.to(torch.bfloat16)  # embedders, norm_out, proj_out: diffusers names, 16-bit
        elif not any(k.startswith(u) for u in used):
            raise ValueError(f"{k} has no place in Nunchaku's FLUX layout")
    return sd


def check_rank(model: nn.Module, groups: list[list[list[str]]], rank: int) -> None:
    """One rank for every layer (Nunchaku builds each from the file's single `rank`): the smallest
    layer bounds it."""
    layer_of = model.get_submodule
    # each a list of linears fused along the output (q/k/v)
    fused = [layer for g in groups for layer in g]
    small = min(
        min(sum(layer_of(n).out_features for n in layer), layer_of(layer[0]).in_features)
        for layer in fused
    )
    if rank > small:
        raise ValueError(
            f"--rank {rank} exceeds this model's smallest W4A4 layer ({small} features in or "
            f"out), which cannot hold it; give --rank {small} or less"
        )


def nunchaku_metadata(model: nn.Module, fp4: bool, rank: int) -> dict[str, str]:
    """The file's metadata, as nunchaku/merge_safetensors.py writes it. `rank` is the packed rank
    (lora_down's second dim: a multiple of 16), which NunchakuFluxTransformer2DModelV2 builds its
    layers with."""
    p = model.params
    fmt = {"dtype": "fp4_e2m1_all" if fp4 else "int4", "group_size": 16 if fp4 else 64}
    quantization_config = {
        "method": "svdquant",
        "weight": {**fmt, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None},
        "activation": {**fmt, "scale_dtype": "fp8_e4m3_nan" if fp4 else None},
        "rank": rank,
    }
    # ComfyUI-nunchaku builds its model wrapper from this (nodes/models/configs/flux.1-dev.json;
    # BFL's FluxParams).
    comfy_config = {
        "model_class": "Flux" if p.guidance_embed else "FluxSchnell",
        "model_config": {
            "axes_dim": list(p.axes_dim),
            "context_in_dim": p.context_in_dim,
            "depth": p.depth,
            "depth_single_blocks": p.depth_single,
            "disable_unet_model_creation": True,
            "guidance_embed": p.guidance_embed,
            "hidden_size": p.hidden_size,
            "image_model": "flux",
            "in_channels": p.in_channels,
            "mlp_ratio": p.mlp_ratio,
            "num_heads": p.num_heads,
            "out_channels": p.in_channels,
            "patch_size": p.patch_size,
            "qkv_bias": True,
            "theta": p.theta,
            "vec_in_dim": p.vec_in_dim,
        },
    }
    return {
        "config": json.dumps(model.diffusers_config()),
        "comfy_config": json.dumps(comfy_config),
        "model_class": "NunchakuFluxTransformer2dModel",
        "quantization_config": json.dumps(quantization_config),
    }


def nunchaku_problem(fp4: bool) -> str | None:
    """Why Nunchaku's FLUX loader cannot run here, or None. Imports nothing (the real package loads
    CUDA code)."""
    spec = importlib.util.find_spec("nunchaku")
    if spec is None:
        return (
            "Nunchaku is not installed. It ships CUDA wheels on its GitHub releases (github.com/nunchaku-tech/"
            "nunchaku/releases), not on PyPI, whose `nunchaku` is an unrelated package."
        )
    try:
        dist = importlib.metadata.distribution("nunchaku")
        found = f"{dist.metadata['Name']} {dist.version} ({dist.metadata.get('Summary', 'no summary')!r})"
    except importlib.metadata.PackageNotFoundError:
        dist, found = None, f"a package without metadata at {spec.origin}"
    loader = [
        Path(p) / "models/transformers/transformer_flux_v2.py"
        for p in spec.submodule_search_locations or []
    ]
    summary = (dist.metadata.get("Summary") or "") if dist else ""
    if "piece-wise linear" in summary.lower() or not any(p.is_file() for p in loader):
        return (
            f"the installed `nunchaku` is the wrong package: {found}. PyPI's `nunchaku` is an unrelated library "
            "(piece-wise linear segmentation) without nunchaku.models.transformers.transformer_flux_v2; run "
            "`pip uninstall nunchaku` and install Nunchaku's wheel from its GitHub releases."
        )
    if not torch.cuda.is_available():
        return "Nunchaku needs a CUDA GPU and none is visible."
    sm = "".join(map(str, torch.cuda.get_device_capability()))
    # nunchaku/utils.py: check_hardware_compatibility
    ok = ("120", "121") if fp4 else ("75", "80", "86", "89")
    if sm not in ok:
        return (
            f"this GPU is sm_{sm}; Nunchaku runs {'NVFP4' if fp4 else 'INT4'} only on sm_{'/'.join(ok)} "
            "(no 4-bit tensor-core kernels for it; Hopper sm_90 is not supported at all)."
        )
    return None
