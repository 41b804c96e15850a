"""Hand-rolled LoRA (Hu et al., 2021, arXiv 2106.09685) for any nn.Linear:

    y = W x + b + (alpha / r) · B A x,    A: (r, in) random,  B: (out, r) zero at init,

so training starts exactly at the base model and only A and B (r·(in + out) numbers per layer) are learned.
DC-Gen §3.3 (paper.md A.3) puts rank = alpha = 256 on every attention and MLP linear of every FLUX block
(`Flux.lora_targets`) and keeps the new `x_embedder` and `proj_out` fully trainable. Keys follow PEFT/diffusers
(`<module>.lora_A.weight`, `<module>.lora_B.weight`), so a LoRA saved here loads into diffusers + peft and back.
"""

from __future__ import annotations

import json
import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Linear):
    """An nn.Linear plus a low-rank update. It shares (does not copy) the base layer's weight and bias, so the
    state-dict keys of the base weights are unchanged and a base checkpoint still loads into the injected model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the frozen base W, b
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.merged = False  # True when B·A has been added into W (then the branch is skipped)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)  # down-projection A (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)  # up-projection B (out, r)
        self.lora_dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the injected model equals the base model

    def delta(self) -> Tensor:
        """The update (alpha / r)·B·A as a full (out, in) matrix, computed in float32."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        a = self.lora_A.weight.dtype  # the branch may be fp32 beside a bf16 base (lora.py --dtype bf16), as in peft
        return y + (self.scale * self.lora_B(self.lora_A(self.lora_dropout(x.to(a))))).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def inject_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: tuple[str, ...] | None = None,
    trainable: tuple[str, ...] = (),
) -> list[str]:
    """Freeze `model`, wrap every nn.Linear whose full name matches a `targets` regex (default: the model's
    `lora_targets`, e.g. DC-Gen's FLUX list) in a LoRALinear, and unfreeze the modules named in `trainable` (e.g. the
    model's `latent_layers`, "x_embedder" and "proj_out"). Returns the wrapped names."""
    targets = model.lora_targets if targets is None else targets
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and any(re.fullmatch(t, n) for t in targets)]
    if not names:
        raise ValueError(f"no nn.Linear of {type(model).__name__} matches the LoRA targets {targets}")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha, dropout))  # A, B require grad
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W <- W + (alpha / r)·B·A in every LoRA layer; the forward then skips the branch (same outputs, less work)."""
    for m in lora_layers(model).values():
        if not m.merged:
            m.weight += m.delta().to(m.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (exact up to rounding in W's dtype)."""
    for m in lora_layers(model).values():
        if m.merged:
            m.weight -= m.delta().to(m.weight.dtype)
            m.merged = False


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge, then put plain nn.Linear layers back: a model with the base architecture and the merged weights."""
    merge_lora(model)
    for name, m in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        setattr(model.get_submodule(parent), child, plain)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the LoRA tensors, PEFT-named: `transformer_blocks.0.attn.to_q.lora_A.weight`, ..."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def load_lora_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Load a lora_state_dict into an injected model; every LoRA tensor must be present and nothing else given."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(sd, strict=False)


def diffusers_lora(model: nn.Module, prefix: str = "transformer") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of diffusers' LoRA file (`pytorch_lora_weights.safetensors`): keys
    `transformer.<module>.lora_A.weight`, and the peft LoraConfig (r, lora_alpha, targets) under the metadata key
    "lora_adapter_metadata", so `FluxPipeline.load_lora_weights` rebuilds the same alpha / r scale."""
    layers = lora_layers(model)
    m = next(iter(layers.values()))
    config = {"r": m.rank, "lora_alpha": m.alpha, "lora_dropout": m.lora_dropout.p, "target_modules": sorted(layers)}
    tensors = {f"{prefix}.{k}": v for k, v in lora_state_dict(model).items()}
    metadata = {f"{prefix}.{k}": v for k, v in config.items()}
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(metadata)}
