"""bench.py's arithmetic and plumbing (never its timings: speed is measured by running bench.py, not by tests).

Run: python -m pytest -q tests/test_bench.py
"""

import dataclasses
import json

import torch
from torch import nn

import bench
from models.flux import PRESETS, Flux


def counted_linear_flops(model: nn.Module, *args, **kwargs) -> float:
    """2·in·out FLOPs per row of every nn.Linear applied to a token sequence (3-D input), counted by hooks."""
    total = [0.0]

    def hook(module, inputs, output):
        x = inputs[0]
        if x.ndim == 3:  # (B, tokens, features); the per-sample conditioning MLPs see (B, features)
            total[0] += 2.0 * x.shape[0] * x.shape[1] * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return total[0]


def test_flux_flops_count_every_token_linear():
    for p in (PRESETS["tiny"], dataclasses.replace(PRESETS["tiny"], in_channels=8, patch_size=1)):
        torch.manual_seed(0)
        model = Flux(p).eval()
        h = w = 8
        x = torch.randn(1, p.in_channels, h, w)
        txt, y = torch.randn(1, 5, p.context_in_dim), torch.randn(1, p.vec_in_dim)
        g = {"guidance": torch.ones(1)} if p.guidance_embed else {}
        counted = counted_linear_flops(model, x, torch.rand(1), txt, y, **g)
        tokens = (h // p.patch_size) * (w // p.patch_size)
        assert bench.flux_flops(p, tokens, 5)["linear"] == counted


def test_flux_pair_runs_and_reports_ratios(tmp_path):
    """Real FLUX width, no blocks: the embedders and heads of flux-dev vs dcgen-flux-1k, one timed repeat."""
    out = tmp_path / "bench.json"
    rows = bench.main(
        [
            "--pair",
            "flux",
            "--random_weights",
            "--depth",
            "0",
            "--depth_single",
            "0",
            "--sizes",
            "256",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--text_len",
            "8",
            "--no-memory",
            "--no-end_to_end",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    base, dcgen = rows
    assert (base["tokens"], dcgen["tokens"]) == (256, 64)  # f8 + 2x2 patches vs f32 + 1x1 at 256 px
    assert base["model"].startswith("flux-dev") and dcgen["model"].startswith("dcgen-flux-1k")
    assert dcgen["flops_ratio"] == base["flops"] / dcgen["flops"] > 1 and base["step_s"] > 0
    assert json.loads(out.read_text())["rows"][1]["tokens"] == 64


def test_profile_splits_a_step_into_matmul_attention_and_the_rest():
    """The toy pair (committed zoo) at 256 px: both roles' step time is split into the three families."""
    rows = bench.main(
        [
            "--pair",
            "toy",
            "--sizes",
            "256",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--profile",
            "--no-memory",
            "--no-end_to_end",
            "--device",
            "cpu",
            "--out",
            "",
        ]
    )
    for row in rows:
        prof = row["profile"]
        assert abs(prof["matmul_share"] + prof["attention_share"] + prof["other_share"] - 1) < 1e-6
        # both families were found by name
        assert prof["matmul_share"] > 0 and prof["attention_share"] > 0
        assert prof["matmul_gflops"] > 0 and prof["attention_gflops"] > 0


def test_timings_under_contention_are_flagged():
    """bench.py says when other processes kept the CPUs busy; a quiet machine gets no warning."""
    busy = {"busy": 0.6, "steal": 0.0, "load_per_core": 2.0, "omp_wait_policy": "PASSIVE"}
    assert bench.contention_note(busy).startswith("WARNING: timings taken under contention: 60% of")
    quiet = dict(busy, busy=0.02, load_per_core=0.1)
    assert bench.contention_note(quiet) == "" and bench.contention_note({}) == ""
    m = bench.cpu_busy(0.05)
    assert 0 <= m["busy"] <= 1 and 0 <= m["steal"] <= 1 and m["load_per_core"] >= 0
