"""Reference-side helpers shared by the FLUX tests: a tiny random diffusers FluxTransformer2DModel and its forward
on packed tokens, exactly as diffusers' FluxPipeline (2×2 patches) and DC-Gen's pipeline (1×1 patches) call it."""

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from models.flux import position_ids


def tiny_diffusers(token_dim: int, guidance: bool, seed: int = 0) -> FluxTransformer2DModel:
    """A tiny random diffusers FLUX with the structure of the real one; weights far from init so bugs show."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=token_dim,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    for name, p in model.named_parameters():
        is_norm = p.ndim == 1 and "norm" in name
        p.data = 1 + 0.2 * torch.randn_like(p) if is_norm else 0.15 * torch.randn_like(p)
    return model.eval()


def run_diffusers(model, x, t, txt, y, guidance, p):
    """diffusers' forward on packed tokens, exactly as FluxPipeline (p=2) or DC-Gen's pipeline (p=1) packs them."""
    B, C, H, W = x.shape
    if p == 2:
        tokens = FluxPipeline._pack_latents(x, B, C, H, W)  # (B, H/2·W/2, 4C)
    else:
        tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # 1×1 packing of DC-Gen's pipeline
    ids = position_ids(txt.shape[1], H // p, W // p)
    out = model(
        hidden_states=tokens,
        encoder_hidden_states=txt,
        pooled_projections=y,
        timestep=t,
        img_ids=ids[txt.shape[1] :],
        txt_ids=ids[: txt.shape[1]],
        guidance=guidance,
        return_dict=False,
    )[0]
    if p == 2:
        return FluxPipeline._unpack_latents(out, H * 8, W * 8, vae_scale_factor=8)  # (B, C, H, W)
    return out.reshape(B, H, W, C).permute(0, 3, 1, 2)


def inputs(C, H, W, txt_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, H, W, generator=g)
    txt, y = torch.randn(2, txt_len, 24, generator=g), torch.randn(2, 12, generator=g)
    return x, torch.tensor([0.3, 0.85]), txt, y, torch.tensor([3.5, 1.0])
