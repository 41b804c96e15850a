"""Hand-rolled LoRA (Hu et al., 2021, arXiv 2106.09685) for any nn.Linear:

    y = W x + b + (alpha / r) · B A x,    A: (r, in) random,  B: (out, r) zero at init,

so training starts exactly at the base model and only A and B (r·(in + out) numbers per layer) are learned.
DC-Gen §3.3 and its official trainer put rank = alpha = 256 on every attention and MLP linear of every FLUX block
(`Flux.lora_targets`) and keeps the new `x_embedder` and `proj_out` fully trainable. Keys follow PEFT/diffusers
(`<module>.lora_A.weight`, `<module>.lora_B.weight`), so a LoRA saved here loads into diffusers + peft and back;
`save_diffusers_lora` writes diffusers' LoRA file, the fully trained modules included, for `pipe.load_lora_weights`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.loading import atomic_write


class LoRALinear(nn.Linear):
    """An nn.Linear plus a low-rank update. It shares (does not copy) the base layer's weight and
    bias, so the state-dict keys of the base weights are unchanged and a base checkpoint still loads
    into the injected model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device="meta"
        )
        self.weight, self.bias = base.weight, base.bias  # the frozen base W, b
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.merged = False  # True when B·A has been added into W (then the branch is skipped)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        # down-projection A (r, in)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        # up-projection B (out, r)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
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
        # the branch may be fp32 beside a bf16 base (lora.py --dtype bf16), as in peft
        a = self.lora_A.weight.dtype
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
    """Freeze `model`, wrap every nn.Linear whose full name matches a `targets` regex (default: the
    model's `lora_targets`, e.g. DC-Gen's FLUX list) in a LoRALinear, and unfreeze the modules named
    in `trainable` (e.g. the model's `latent_layers`, "x_embedder" and "proj_out"). Returns the
    wrapped names."""
    targets = model.lora_targets if targets is None else targets
    model.requires_grad_(False)
    names = [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Linear and any(re.fullmatch(t, n) for t in targets)
    ]
    if not names:
        raise ValueError(
            f"no nn.Linear of {type(model).__name__} matches the LoRA targets {targets}"
        )
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        # A, B require grad
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha, dropout))
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W <- W + (alpha / r)·B·A in every LoRA layer; the forward then skips the branch (same
    outputs, less work)."""
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
    """Merge, then put plain nn.Linear layers back: a model with the base architecture and the
    merged weights."""
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
    """Load a lora_state_dict into an injected model; every LoRA tensor must be present and nothing
    else given."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"LoRA state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.load_state_dict(sd, strict=False)


# ----------------------------------------------------------------------------------------------------------------
# diffusers' LoRA file format

# the file name `FluxPipeline.load_lora_weights(folder)` looks for
LORA_FILE = "pytorch_lora_weights.safetensors"


def full_rank_lora(
    m: nn.Module, name: str, trained: dict, base: dict
) -> tuple[Tensor, Tensor, Tensor]:
    """A plain nn.Linear's change from `base` as an exact LoRA at scale 1: with dW = W - W_base (out, in)
    and r = min(in, out), A = I_r, B = dW if in <= out, else A = dW, B = I_r; and the bias change."""
    assert type(m) is nn.Linear, (
        f"full module {name} must be a plain nn.Linear, got {type(m).__name__}"
    )
    dW = trained[f"{name}.weight"].detach().float() - base[f"{name}.weight"].float()  # (out, in)
    db = torch.zeros(m.out_features)  # a layer without bias still gets lora_B.bias in peft
    if m.bias is not None:
        db = trained[f"{name}.bias"].detach().float() - base[f"{name}.bias"].float()  # (out,)
    r = min(dW.shape)
    A, B = (torch.eye(r), dW) if dW.shape[1] == r else (dW, torch.eye(r))  # B·A = dW exactly
    return A, B, db


def diffusers_lora(
    model: nn.Module,
    prefix: str = "transformer",
    full: tuple[str, ...] = (),
    base: dict[str, Tensor] | None = None,
    state_dict: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of diffusers' LoRA file: keys
    `<prefix>.<module>.lora_A.weight` (PEFT names), and under the metadata key
    "lora_adapter_metadata" the peft LoraConfig as JSON, each field prefixed (`{"transformer.r":
    256, "transformer.lora_alpha": 256, ...}`), which diffusers turns into the LoraConfig as is. The
    alpha / r scale is folded into B (B' = (alpha / r)·B, lora_alpha = r): loaders that miss the
    metadata assume alpha = r (diffusers does for `transformer.load_lora_adapter(file)` and for a
    metadata-less file), and so still build the same update.

    `full` names plain nn.Linear modules trained in full (DC-Gen: `Flux.latent_layers`, x_embedder and proj_out).
    diffusers' Flux loader has no format for full weights: kohya `.diff`/`.diff_b` keys are dropped; peft's
    `modules_to_save` cannot single out the top-level `proj_out` (it matches names by suffix, so it also hits
    `single_transformer_blocks.*.proj_out`, and fails); a plain `transformer.x_embedder.weight` key is only loaded by
    accident (peft's `load_state_dict(strict=False, assign=True)`): the parameter takes the file's dtype and device,
    and unload_lora_weights / set_adapters leave it alone. So each full module is written as an exact full-rank LoRA of
    its change from `base`, its weights in the model folder the LoRA will be loaded onto (the run's --init): with
    dW = W - W_base (out, in) and r = min(in, out),
        A = I_r, B = dW  if in <= out,    A = dW, B = I_r  otherwise,    lora_B.bias = b - b_base,
    at scale 1 (rank_pattern = alpha_pattern = r, anchored with "^" so `proj_out` is not `*.proj_out`). peft's
    `lora_bias` is one switch for all layers, so every other LoRA layer gets a zero `lora_B.bias`. `base` maps
    `<module>.weight` / `.bias` to tensors. `state_dict` overrides the model's own trainable tensors by their
    state-dict names (e.g. lora.py's EMA: `{"transformer_blocks.0.attn.to_q.lora_A.weight": ..., "x_embedder.weight":
    ...}`); give full (unsharded) tensors."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: save the full model instead")
    ranks = {m.rank for m in layers.values()}
    assert len(ranks) == 1, f"diffusers' LoraConfig holds one rank here, got {sorted(ranks)}"
    rank = ranks.pop()
    own = model.state_dict()
    trained = {
        k: v
        for k, v in own.items()
        if ".lora_A." in k or ".lora_B." in k or k.rpartition(".")[0] in full
    }
    unknown = sorted((state_dict or {}).keys() - trained.keys())
    if unknown:
        raise ValueError(
            f"state_dict names no LoRA tensor or tensor of the full modules {full}: {unknown[:3]}"
        )
    trained.update(state_dict or {})
    tensors = {}
    for name, m in layers.items():
        tensors[f"{prefix}.{name}.lora_A.weight"] = trained[f"{name}.lora_A.weight"].detach()
        tensors[f"{prefix}.{name}.lora_B.weight"] = (
            m.scale * trained[f"{name}.lora_B.weight"].detach().float()
        )
    # peft's `target_modules` as one regex, matched in full: the exact layers, no suffix matches
    config = {"r": rank, "lora_alpha": rank, "lora_bias": bool(full)}
    config["target_modules"] = "|".join(re.escape(n) for n in [*sorted(layers), *full])
    if full:
        assert base is not None, (
            f"full modules {full} are written as changes from `base`: give their base weights"
        )
        for name, m in layers.items():
            # the switch is global in peft
            tensors[f"{prefix}.{name}.lora_B.bias"] = torch.zeros(m.out_features)
        config["rank_pattern"], config["alpha_pattern"] = {}, {}
    for name in full:
        A, B, db = full_rank_lora(model.get_submodule(name), name, trained, base)
        tensors[f"{prefix}.{name}.lora_A.weight"] = A
        tensors[f"{prefix}.{name}.lora_B.weight"] = B
        tensors[f"{prefix}.{name}.lora_B.bias"] = db
        pattern = f"^{re.escape(name)}"  # "^": this module only, not every `*.proj_out`
        config["rank_pattern"][pattern] = min(A.shape[0], B.shape[1])
        config["alpha_pattern"][pattern] = min(A.shape[0], B.shape[1])  # scale alpha / r = 1
    metadata = {f"{prefix}.{k}": v for k, v in config.items()}
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}


def save_diffusers_lora(
    model: nn.Module,
    folder: str | Path,
    full: tuple[str, ...] = (),
    base: dict[str, Tensor] | None = None,
    state_dict: dict[str, Tensor] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    prefix: str = "transformer",
) -> Path:
    """Atomically write `folder/pytorch_lora_weights.safetensors` (see diffusers_lora for `full`, `base` and
    `state_dict`), every tensor cast to `dtype` (bf16: the dtype FLUX is served in; half of fp32's size). diffusers
    then loads the LoRA and the full modules in one call, onto the model folder `base` came from (the run's --init):
        pipe = FluxPipeline.from_pretrained(init_folder)
        pipe.load_lora_weights(folder)  # or pipe.transformer.load_lora_adapter(folder, weight_name=LORA_FILE,
                                        #                                        prefix="transformer")"""
    tensors, metadata = diffusers_lora(model, prefix, full, base, state_dict)
    tensors = {k: v.to("cpu", dtype).contiguous() for k, v in tensors.items()}
    path = Path(folder) / LORA_FILE
    atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors, metadata=metadata)))
    return path
