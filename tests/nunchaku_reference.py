"""Reference-side helpers for the Nunchaku export tests, restated from the Nunchaku / DeepCompressor sources (read, not
copied) independently of models/nunchaku.py:

- unpackers: the inverse of DeepCompressor's NunchakuWeightPacker (backend/nunchaku/utils.py) and TinyChat pack_w4
  (backend/tinychat/utils.py), written from their documented 10-dim tile shapes and permutations;
- what NunchakuFluxTransformer2DModelV2 (nunchaku/models/transformers/transformer_flux_v2.py) loads: a diffusers
  FluxTransformer2DModel whose linears `_patch_model` replaced by SVDQW4A4Linear / AWQW4A16Linear (their parameter
  shapes and dtypes from nunchaku/models/linear.py), and `from_pretrained`'s key handling (convert_flux_state_dict,
  patch_scale_key, strict load_state_dict).
"""

import torch
from diffusers import FluxTransformer2DModel

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


def unpermute(t: torch.Tensor, shape: tuple, perm: tuple) -> torch.Tensor:
    """Inverse of x.reshape(shape).permute(perm): t holds the permuted elements in order; returns them in `shape`."""
    inv = sorted(range(len(perm)), key=lambda i: perm[i])
    return t.reshape([shape[p] for p in perm]).permute(inv).reshape(shape)


def unpack_w4(packed: torch.Tensor) -> torch.Tensor:
    """int8 (n, k/2) -> nibbles (n, k) int32. pack_weight: reshape (n/128, 8, 2, 8, 1, k/64, 1, 2, 4, 8), permute
    (0, 5, 6, 1, 3, 8, 2, 7, 4, 9), 8 nibbles per little-endian int32 (nibble j at bits 4j)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    b = packed.view(torch.uint8).reshape(-1).to(torch.int32)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1)
    return unpermute(
        nibbles, (n // 128, 8, 2, 8, 1, k // 64, 1, 2, 4, 8), (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
    ).reshape(n, k)


def unpack_micro_scales(packed: torch.Tensor) -> torch.Tensor:
    """fp8 (G, n) -> (n, G). pack_micro_scale (warp_n 128): view (n/128, 1, 4, 4, 8, G/4, 4), permute
    (0, 5, 1, 4, 3, 2, 6)."""
    G, n = packed.shape
    return unpermute(
        packed.reshape(-1), (n // 128, 1, 4, 4, 8, G // 4, 4), (0, 5, 1, 4, 3, 2, 6)
    ).reshape(n, G)


def unpack_scales(packed: torch.Tensor) -> torch.Tensor:
    """bf16 (n,) or (G, n) -> (n,) or (n, G). pack_scale (warp_n 128, s_pack_size 4, 32 lanes): reshape
    (n/128, 1, 8, 2, 4, 2, G), permute (0, 6, 1, 2, 4, 3, 5)."""
    n, G = packed.shape[-1], packed.numel() // packed.shape[-1]
    out = unpermute(
        packed.reshape(-1), (n // 128, 1, 8, 2, 4, 2, G), (0, 6, 1, 2, 4, 3, 5)
    ).reshape(n, G)
    return out[:, 0] if packed.ndim == 1 else out


def unpack_lowrank(packed: torch.Tensor, down: bool) -> torch.Tensor:
    """pack_lowrank_weight inverse: down (in, r) -> (r, in); up (out, r) -> (out, r). 16x16 fragments
    (c pack, r pack, 2, 8, 1, 2, 4, 2) permuted (0, 1, 3, 6, 2, 5, 4, 7); down's fragments are ordered (c, r) from
    (r, c)."""
    c, r = packed.shape
    frags = unpermute(
        packed.reshape(-1), (c // 16, r // 16, 2, 8, 1, 2, 4, 2), (0, 1, 3, 6, 2, 5, 4, 7)
    )
    frags = frags.reshape(c // 16, r // 16, 16, 16)
    if down:  # (c packs, r packs, 16 r, 16 c) <- view(r packs, 16, c packs, 16).permute(2, 0, 1, 3)
        return frags.permute(1, 2, 0, 3).reshape(r, c)
    # <- view(c packs, 16, r packs, 16).permute(0, 2, 1, 3)
    return frags.permute(0, 2, 1, 3).reshape(c, r)


def unpack_awq_w4(packed: torch.Tensor) -> torch.Tensor:
    """int32 (oc/4, ic/2) -> unsigned nibbles (oc, ic). TinyChat pack_w4: 16-bit words w[t] = q[t] | q[t+8] << 4 |
    q[t+16] << 8 | q[t+24] << 12 per 32 inputs, then view (oc/4, 4, ic/64, 16).permute(0, 2, 1, 3)."""
    oc, ic = packed.shape[0] * 4, packed.shape[1] * 2
    words = packed.view(torch.int16).to(torch.int32) & 0xFFFF  # (oc/4, ic)
    words = unpermute(words.reshape(-1), (oc // 4, 4, ic // 64, 16), (0, 2, 1, 3)).reshape(-1, 8)
    q = torch.stack([(words >> (4 * i)) & 0xF for i in range(4)], dim=1)  # (oc·ic/32, 4, 8)
    return q.reshape(oc, ic)


# ----------------------------------------------------------------------------------------------------------------
# what NunchakuFluxTransformer2DModelV2.from_pretrained does with the file


def convert_flux_state_dict(sd: dict) -> dict:
    """transformer_flux_v2.py: convert_flux_state_dict (v1 on-disk names -> v2 module names), restated."""
    out = {}
    for k, v in sd.items():
        n = k
        if "single_transformer_blocks." in k:
            for a, b in ((".qkv_proj.", ".attn.to_qkv."), (".out_proj.", ".attn.to_out.")):
                n = n.replace(a, b) if a in k else n
            n = n.replace(".norm_k.", ".attn.norm_k.").replace(".norm_q.", ".attn.norm_q.")
        elif "transformer_blocks." in k:
            for a, b in (
                (".mlp_context_fc1.", ".ff_context.net.0.proj."),
                (".mlp_context_fc2.", ".ff_context.net.2."),
                (".mlp_fc1.", ".ff.net.0.proj."),
                (".mlp_fc2.", ".ff.net.2."),
                (".qkv_proj_context.", ".attn.add_qkv_proj."),
                (".qkv_proj.", ".attn.to_qkv."),
                (".out_proj.", ".attn.to_out.0."),
                (".out_proj_context.", ".attn.to_add_out."),
            ):
                if a in k:
                    n = k.replace(a, b)
                    break
            for a in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                n = n.replace(f".{a}.", f".attn.{a}.") if f".attn.{a}." not in n else n
        else:
            out[k] = v
            continue
        n = n.replace(".lora_down", ".proj_down").replace(".lora_up", ".proj_up")
        n = (
            n.replace(".smooth_orig", ".smooth_factor_orig")
            if ".smooth_orig" in k
            else n.replace(".smooth", ".smooth_factor")
        )
        out[n] = v
    return out


def v2_expected(config: dict, fp4: bool, rank: int) -> tuple[dict, set]:
    """{key: (shape, dtype)} of NunchakuFluxTransformer2DModelV2 built from `config` (bf16), and the names of its
    SVDQW4A4Linear modules. Starts from diffusers' own FluxTransformer2DModel and applies `_patch_model`."""
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(
            {k: v for k, v in config.items() if not k.startswith("_")}
        )
    sd = {k: (tuple(v.shape), BF16) for k, v in model.state_dict().items()}
    D = model.inner_dim
    svdq_modules = set()

    def drop(prefix, names):
        for n in names:
            for p in ("weight", "bias"):
                sd.pop(f"{prefix}{n}.{p}")

    def svdq(name, i, o):  # linear.py: SVDQW4A4Linear parameters (bias=True for every FLUX linear)
        g = 16 if fp4 else 64
        sd.update(
            {
                f"{name}.qweight": ((o, i // 2), torch.int8),
                f"{name}.bias": ((o,), BF16),
                f"{name}.wscales": ((i // g, o), FP8 if fp4 else BF16),
                f"{name}.smooth_factor": ((i,), BF16),
                f"{name}.smooth_factor_orig": ((i,), BF16),
                f"{name}.proj_down": ((i, rank), BF16),
                f"{name}.proj_up": ((o, rank), BF16),
            }
        )
        if fp4:
            sd[f"{name}.wcscales"] = ((o,), BF16)
        svdq_modules.add(name)

    def awq(name, i, o):  # linear.py: AWQW4A16Linear, group 64
        sd.update(
            {
                f"{name}.qweight": ((o // 4, i // 2), torch.int32),
                f"{name}.bias": ((o,), BF16),
                f"{name}.wscales": ((i // 64, o), BF16),
                f"{name}.wzeros": ((i // 64, o), BF16),
            }
        )

    for b in range(len(model.transformer_blocks)):
        p = f"transformer_blocks.{b}."
        drop(
            p,
            [
                "norm1.linear",
                "norm1_context.linear",
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
                "attn.add_q_proj",
                "attn.add_k_proj",
                "attn.add_v_proj",
                "attn.to_out.0",
                "attn.to_add_out",
                "ff.net.0.proj",
                "ff.net.2",
                "ff_context.net.0.proj",
                "ff_context.net.2",
            ],
        )
        awq(p + "norm1.linear", D, 6 * D)
        awq(p + "norm1_context.linear", D, 6 * D)
        svdq(p + "attn.to_qkv", D, 3 * D)
        svdq(p + "attn.add_qkv_proj", D, 3 * D)
        svdq(p + "attn.to_out.0", D, D)
        svdq(p + "attn.to_add_out", D, D)
        for ff in ("ff", "ff_context"):
            svdq(f"{p}{ff}.net.0.proj", D, 4 * D)
            svdq(f"{p}{ff}.net.2", 4 * D, D)
    for b in range(len(model.single_transformer_blocks)):
        p = f"single_transformer_blocks.{b}."
        drop(p, ["norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"])
        awq(p + "norm.linear", D, 3 * D)
        svdq(p + "attn.to_qkv", D, 3 * D)
        svdq(p + "attn.to_out", D, D)
        svdq(p + "mlp_fc1", D, 4 * D)
        svdq(p + "mlp_fc2", 4 * D, D)
    return sd, svdq_modules


def v2_load(file_sd: dict, expected: dict, svdq_modules: set, fp4: bool) -> list[str]:
    """Problems NunchakuFluxTransformer2DModelV2.from_pretrained would hit loading `file_sd` (empty = it loads):
    convert_flux_state_dict, patch_scale_key (missing keys other than wcscales; dtype mismatches; wtscale popped from
    nvfp4 layers), then load_state_dict(strict=True) shapes and unexpected keys."""
    sd, problems = convert_flux_state_dict(file_sd), []
    for k, (shape, dtype) in expected.items():
        if k not in sd:
            if not k.endswith(".wcscales"):
                problems.append(f"missing {k}")
        elif sd[k].dtype != dtype or tuple(sd[k].shape) != shape:
            problems.append(f"{k}: file {tuple(sd[k].shape)} {sd[k].dtype}, model {shape} {dtype}")
    if fp4:
        for name in svdq_modules:
            sd.pop(f"{name}.wtscale", None)
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    return problems
