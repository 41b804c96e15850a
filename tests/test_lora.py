"""models/lora.py: the LoRA invariants, and interchange with diffusers + peft in both directions.

Run: python -m pytest -q tests/test_lora.py
"""

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from common import save_ckpt
from models.flux import PRESETS, Flux
from models.lora import (
    LoRALinear,
    diffusers_lora,
    inject_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unload_lora,
    unmerge_lora,
)

from flux_reference import inputs, run_diffusers, tiny_diffusers


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    model = Flux(PRESETS["tiny"]).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x, txt, y = (
        torch.randn(2, 4, 4, 6, generator=g),
        torch.randn(2, 5, 32, generator=g),
        torch.randn(2, 16, generator=g),
    )
    return x, torch.tensor([0.2, 0.7]), txt, y, torch.tensor([3.5, 2.0])


def randomize_lora(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    for m in lora_layers(model).values():
        m.lora_B.weight.data = 0.1 * torch.randn(m.lora_B.weight.shape, generator=g)


@torch.no_grad()
def test_zero_b_equals_base():
    lin = torch.nn.Linear(16, 24)
    x = torch.randn(3, 5, 16)
    assert torch.equal(LoRALinear(lin, rank=4, alpha=4)(x), lin(x))  # one layer: bit-exact
    model = tiny_flux()
    base = model(*batch())
    inject_lora(model, rank=8, alpha=8)
    # The whole network agrees to float rounding only: the extra LoRA buffers shift the alignment of
    # temporary copies, and CPU BLAS kernels round differently on differently aligned data (seen: 1
    # ulp at `to_add_out`).
    assert (model(*batch()) - base).abs().max() < 1e-6


@torch.no_grad()
def test_merge_equals_unmerged_and_unmerge_restores():
    model = tiny_flux()
    base = model(*batch())
    inject_lora(model, rank=4, alpha=16)
    randomize_lora(model)
    weights = {n: m.weight.clone() for n, m in lora_layers(model).items()}
    unmerged = model(*batch())
    assert (unmerged - base).abs().max() > 1e-2  # the LoRA does something
    merge_lora(model)
    assert (model(*batch()) - unmerged).abs().max() < 1e-5
    unmerge_lora(model)
    assert all((m.weight - weights[n]).abs().max() < 1e-6 for n, m in lora_layers(model).items())
    assert (model(*batch()) - unmerged).abs().max() < 1e-5
    unload_lora(model)  # plain nn.Linear again, merged weights
    assert not lora_layers(model) and not lora_state_dict(model)
    assert (model(*batch()) - unmerged).abs().max() < 1e-5
    assert set(model.state_dict()) == set(Flux(PRESETS["tiny"]).state_dict())


def test_only_lora_and_named_modules_train():
    model = tiny_flux()
    names = inject_lora(model, rank=4, alpha=4, trainable=("x_embedder", "proj_out"))
    # 1 double block: 8 attention + 4 MLP linears; 2 single blocks: q, k, v, proj_mlp, proj_out each
    assert len(names) == 12 + 2 * 5 and "proj_out" not in names and "x_embedder" not in names
    # AdaLN linears and embedders are not targets
    assert not any("norm" in n or "embed" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert lora == set(lora_state_dict(model)) and len(lora) == 2 * len(names)
    assert trainable - lora == {
        "x_embedder.weight",
        "x_embedder.bias",
        "proj_out.weight",
        "proj_out.bias",
    }
    model(*batch()).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_flux_dev_lora_rank_256_trains_about_1_billion():
    """LoRA r = 256 on all block linears of the 12B base (DC-Gen dc_ai/t2icore/models/base.py, models/flux.py):
    ~1.05 B trainable (paper: "1.1B")."""
    with torch.device("meta"):
        model = Flux(PRESETS["flux-dev"])
    names = inject_lora(model, rank=256, alpha=256, trainable=("x_embedder", "proj_out"))
    assert len(names) == 19 * 12 + 38 * 5
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 1.04e9 < n < 1.06e9


@torch.no_grad()
def test_lora_loads_into_diffusers_via_peft(tmp_path):
    """Our LoRA file, in diffusers' pipeline format, loads with peft's key naming and gives our outputs."""
    ref = tiny_diffusers(16, True)
    ref.save_pretrained(tmp_path / "base")
    ours = Flux.from_pretrained(tmp_path / "base", patch_size=2)
    # scale 3: the file must give alpha / r = 3 (it is folded into B)
    inject_lora(ours, rank=4, alpha=12)
    randomize_lora(ours)
    tensors, metadata = diffusers_lora(ours)
    save_ckpt(tensors, tmp_path / "lora" / "pytorch_lora_weights.safetensors", metadata=metadata)
    ref.load_lora_adapter(
        str(tmp_path / "lora"),
        weight_name="pytorch_lora_weights.safetensors",
        prefix="transformer",
        adapter_name="dcgen",
    )
    x, t, txt, y, g = inputs(4, 8, 6)
    expected = run_diffusers(ref, x, t, txt, y, g, 2)
    ref.disable_adapters()
    # the adapter was active
    assert (run_diffusers(ref, x, t, txt, y, g, 2) - expected).abs().max() > 1e-2
    assert (ours(x, t, txt, y, g) - expected).abs().max() < 1e-5


@torch.no_grad()
def test_peft_lora_loads_into_ours(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    ref = tiny_diffusers(16, True)
    ref.save_pretrained(tmp_path)
    ours = Flux.from_pretrained(tmp_path, patch_size=2)
    names = inject_lora(ours, rank=4, alpha=4)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=names), ref)
    for n, p in ref.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    load_lora_state_dict(ours, get_peft_model_state_dict(ref))
    x, t, txt, y, g = inputs(4, 8, 6)
    assert (ours(x, t, txt, y, g) - run_diffusers(ref, x, t, txt, y, g, 2)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(ours, {})


def test_lora_linear_shares_base_weights():
    base = torch.nn.Linear(6, 5)
    m = LoRALinear(base, rank=2, alpha=2)
    assert m.weight is base.weight and m.bias is base.bias
    assert set(m.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
