"""plan.py against reality: predicted peak memory vs the peak of the same training step run on this CPU (a fresh
process per case), predicted forward FLOPs vs a hook count, depth extrapolation vs a direct trace, check_fits, CLI.

Run: python -m pytest -q tests/test_plan.py

The measured quantity is the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs after a
warm-up) minus its resident memory just before the model is built. glibc would keep freed blocks in its heap and
inflate that peak, so the child runs with MALLOC_MMAP_THRESHOLD_=65536 (every tensor above 64 KB is its own mmap,
returned to the OS when freed) and MALLOC_ARENA_MAX=1; then RSS follows the live tensor bytes that plan.py counts.
"""

import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import plan  # noqa: E402
from models.flux import PRESETS, Flux  # noqa: E402

# Two models, each with sizes chosen so the step's own memory (activations, gradients, AdamW) is
# hundreds of MB, far above the few MB of allocator and library noise: the toy at 32x32 latents (256
# tokens) in fp32, and a real FLUX-width model (D 3072, 24 heads, 1 double + 1 single block, 0.5 B
# parameters) in bf16 as the recipe trains.
FLUX_WIDTH = dataclasses.replace(PRESETS["dcgen-flux-1k"], depth=1, depth_single=1)
MODELS = {
    "toy": dict(
        params=PRESETS["toy"],
        embed=PRESETS["toy-f32c16"],
        micro_batch=12,
        latent_hw=(32, 32),
        embed_hw=(32, 32),
        txt_len=64,
        dtype="fp32",
        lora_rank=32,
    ),
    "flux-width": dict(
        params=FLUX_WIDTH,
        embed=FLUX_WIDTH,
        micro_batch=2,
        latent_hw=(16, 16),
        embed_hw=(32, 32),
        txt_len=64,
        dtype="bf16",
        lora_rank=64,
    ),
}
# embed has no blocks, so no grad checkpointing: one case per model
CASES = [(m, "embed", 0) for m in MODELS] + [
    (m, s, c) for m in MODELS for s in ("head", "lora") for c in (0, 1)
]
RESULTS = []  # (model, stage, ckpt, predicted MB, measured MB), printed at the end of the module


def kwargs_of(model: str, stage: str, ckpt: bool) -> tuple[plan.FluxParams, dict]:
    m = MODELS[model]
    params = m["embed"] if stage == "embed" else m["params"]
    kw = dict(
        micro_batch=m["micro_batch"],
        latent_hw=m["embed_hw"] if stage == "embed" else m["latent_hw"],
        txt_len=m["txt_len"],
        dtype=m["dtype"],
        grad_checkpointing=bool(ckpt),
        lora_rank=m["lora_rank"],
    )
    # the toy's base is the f8c4 toy (2x2 patches), its DC-AE 1.5 student is f32
    if stage == "embed":
        kw.update(teacher=PRESETS["toy"] if model == "toy" else None, ae_factor=32)
    return params, kw


def rss_mb(field: str = "VmRSS") -> float:
    line = next(
        ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field)
    )
    return int(line.split()[1]) / 1024


def measure(model: str, stage: str, ckpt: bool) -> dict:
    """In this (fresh) process: warm up on the tiny preset, then build the stage's model on the CPU as plan.py
    traces it (AdamW's states created, as after a first step) and run a real training step; report its peak."""
    params, kw = kwargs_of(model, stage, ckpt)
    dtype = torch.bfloat16 if kw["dtype"] == "bf16" else torch.float32
    guide = params.guidance_embed and stage != "embed"
    teacher = kw.get("teacher") or dataclasses.replace(params, in_channels=16, patch_size=2)
    grid = (teacher.in_channels * teacher.patch_size**2, 32 // (8 * teacher.patch_size))

    def run(params, b, hw, steps):
        with torch.device("meta"):
            net = plan.build_model(
                stage, params, dtype, kw["lora_rank"] if stage == "lora" else 0, grid[0]
            )
        net = net.to_empty(device="cpu")
        with torch.no_grad():
            # values do not change memory; fill_ is fast where normal_ takes seconds
            for p in net.parameters():
                p.fill_(0.01)
        net.grad_checkpointing = kw["grad_checkpointing"]
        opt, ema = plan.make_optimizer(net, stage, foreach=False)
        null = {
            "txt": torch.randn(1, kw["txt_len"], params.context_in_dim),
            "y": torch.randn(1, params.vec_in_dim),
        }

        def amp():
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

        for _ in range(steps):
            batch = plan.make_batch(stage, params, b, hw, kw["txt_len"], grid)
            # as lora.py: batch, step, repeat
            plan.train_step(stage, net, opt, ema, batch, null, amp, guide, 1)
            del batch
        return net

    tiny = dataclasses.replace(
        PRESETS["tiny"], guidance_embed=params.guidance_embed, context_in_dim=32
    )
    run(
        dataclasses.replace(tiny, in_channels=params.in_channels, patch_size=params.patch_size),
        1,
        (4, 4),
        2,
    )
    before = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    net = run(params, kw["micro_batch"], kw["latent_hw"], 1)
    return {
        "peak_mb": rss_mb("VmHWM") - before,
        "weights_mb": sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20,
    }


@pytest.fixture(scope="module", autouse=True)
def measured():
    """Every case's measuring child, started with the module's first test and run two at a time (one thread each:
    this machine has 2 cores) while the other tests run; the comparisons come last in this file."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_ARENA_MAX": "1",
        "OMP_NUM_THREADS": "1",
    }
    env["PYTHONPATH"] = str(ROOT)

    def child(case):
        argv = [sys.executable, __file__, json.dumps(case)]
        run = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    pool = ThreadPoolExecutor(2)
    futures = {case: pool.submit(child, list(case)) for case in CASES}
    yield lambda *case: futures[case].result()
    pool.shutdown()
    print("\nmodel      stage ckpt  predicted MB  measured MB  ratio")
    for model, stage, ckpt, pred, got in RESULTS:
        print(f"{model:<10} {stage:<5} {ckpt:>4}  {pred:12.1f}  {got:11.1f}  {pred / got:.3f}")


def test_build_model_matches_the_stages():
    """plan.build_model sets dtypes and requires_grad exactly as training.prepare does for lora.py (LoRA on the
    model's targets + latent layers) and align.py --stage head (no LoRA targets, latent layers only)."""
    training = pytest.importorskip("training", reason="the training loop module is mid-edit")
    for rank, targets in ((8, Flux.lora_targets), (1, ())):
        want = training.prepare(
            Flux(PRESETS["tiny"]).to(torch.bfloat16), rank, float(rank), targets, Flux.latent_layers
        )
        got = plan.build_model("lora" if targets else "head", PRESETS["tiny"], torch.bfloat16, rank)
        describe = lambda m: {
            n: (p.dtype, p.requires_grad, tuple(p.shape)) for n, p in m.named_parameters()
        }  # noqa: E731
        assert describe(got) == describe(want)


def counted_linear_flops(model: nn.Module, *args, **kwargs) -> float:
    """tests/test_bench.py's hook count: 2·in·out FLOPs per token of every nn.Linear on a (B, tokens, features)
    input; LoRALinear is an nn.Linear, and so are its lora_A and lora_B, so adapters are counted too."""
    total = [0.0]

    def hook(module, inputs, output):
        x = inputs[0]
        if x.ndim == 3:
            total[0] += 2.0 * x.shape[0] * x.shape[1] * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return total[0]


@pytest.mark.parametrize("stage,rank", [("sample", 0), ("lora", 4)])
def test_forward_flops_equal_the_hook_count(stage, rank):
    p = PRESETS["tiny"]
    torch.manual_seed(0)
    model = plan.build_model(stage, p, torch.float32, rank)
    B, hw, L = 2, (8, 6), 5
    x, txt, y = (
        torch.randn(B, p.in_channels, *hw),
        torch.randn(B, L, p.context_in_dim),
        torch.randn(B, p.vec_in_dim),
    )
    counted = counted_linear_flops(model, x, torch.rand(B), txt, y, guidance=torch.ones(B))
    pred = plan.predict(
        stage, p, micro_batch=B, latent_hw=hw, txt_len=L, lora_rank=rank, dtype="fp32"
    )
    # here: it imports the text encoders' library, which the measuring children need not load
    import bench

    attention = B * bench.flux_flops(p, hw[0] * hw[1] // 4, L)["attention"]
    assert pred["forward_flops"] - attention == counted


def test_step_flops_as_executed():
    """The traced FLOPs: sampling = one forward plus the conditioning MLPs on (B, D) vectors (t, w and pooled-text
    embedders, every AdaLN), which the token count skips; grad checkpointing adds exactly one forward of the blocks."""
    p, kw = FLUX_WIDTH, dict(micro_batch=2, latent_hw=(8, 8), txt_len=16)
    sample = plan.predict("sample", p, **kw)
    D = p.hidden_size
    vectors = (
        2 * (256 * D + D * D) + (p.vec_in_dim * D + D * D) + 12 * D * D + 3 * D * D + 2 * D * D
    )
    assert sample["flops"] - sample["forward_flops"] == 2 * 2 * vectors
    off = plan.predict("head", p, **kw, guide=False)
    on = plan.predict("head", p, **kw, guide=False, grad_checkpointing=True)
    # minus embedders and head
    blocks = sample["forward_flops"] - 2 * 2 * (64 * 32 * 3072 + 16 * 4096 * 3072)
    assert abs((on["flops"] - off["flops"]) - blocks) < 0.01 * blocks


@pytest.mark.parametrize("stage,ckpt", [("lora", False), ("lora", True)])
def test_depth_extrapolation_is_exact(stage, ckpt):
    """Per-block terms from 1+1, 2+1, 1+2 blocks predict a 4+4-block model's direct trace."""
    p = dataclasses.replace(PRESETS["dcgen-flux-1k"], depth=4, depth_single=4)
    kw = dict(micro_batch=2, latent_hw=(16, 16), txt_len=64, grad_checkpointing=ckpt, lora_rank=64)
    pred = plan.predict(stage, p, **kw)
    rank = 64 if stage == "lora" else 0
    direct = plan.trace(stage, p, 2, (16, 16), 64, "bf16", ckpt, 1, rank, True, 1, (64, 2), "cuda")
    persistent = direct["weights"] + direct["optimizer"]
    assert pred["peak"] == pytest.approx(
        persistent + max(direct["peak_step"], direct["peak_optimizer"]), rel=1e-9
    )
    assert pred["flops"] == pytest.approx(direct["flops"], rel=1e-9)


def test_check_fits(monkeypatch):
    model = Flux.__new__(Flux)  # check_fits reads only .params
    model.params = PRESETS["dcgen-flux-1k"]
    kw = dict(
        micro_batch=64,
        latent_hw=(16, 16),
        txt_len=256,
        dtype="bf16",
        grad_checkpointing=False,
        fsdp_world=1,
    )
    kw.update(lora_rank=0, guide=False, aug_k=1)
    plan.check_fits("head", model, **kw, device=torch.device("cpu"))  # a CPU run is never checked
    peak = plan.predict("head", model.params, **kw)["peak"]
    ckpt = plan.predict("head", model.params, **{**kw, "grad_checkpointing": True})["peak"]
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: (0, (peak + ckpt) / 2 / 0.95)
    )
    with pytest.raises(SystemExit, match="--grad_checkpointing") as e:
        plan.check_fits("head", model, **kw, device=torch.device("cuda", 0))
    assert "\n" not in str(e.value) and "largest micro-batch that fits" in str(e.value)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 1.1 * peak / 0.95))
    plan.check_fits("head", model, **kw, device=torch.device("cuda", 0))


def test_cli_prints_the_table(tmp_path, capsys):
    run = subprocess.run(
        [sys.executable, "plan.py", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0 and "--grad_checkpointing" in run.stdout
    out = tmp_path / "plan.json"
    stages = ["cache-512", "embed", "head", "merge-512", "sample-1k"]
    plan.main(
        [
            "--gpus",
            "8",
            "--depth",
            "1",
            "--depth_single",
            "1",
            "--markdown",
            "--out",
            str(out),
            "--stages",
            *stages,
        ]
    )
    printed = capsys.readouterr().out
    assert "| head | 64 |" in printed and "GPU-days" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == stages


@pytest.mark.parametrize("model,stage,ckpt", CASES)
def test_predicted_peak_matches_a_real_cpu_step(measured, model, stage, ckpt):
    params, kw = kwargs_of(model, stage, ckpt)
    predicted = plan.predict(stage, params, **kw, device="cpu")["peak"] / 2**20
    got = measured(model, stage, ckpt)["peak_mb"]
    RESULTS.append((model, stage, ckpt, predicted, got))
    assert got > 50, "the measured step must be well above the allocator's noise"
    assert abs(predicted / got - 1) < 0.15, f"predicted {predicted:.1f} MB, measured {got:.1f} MB"


if __name__ == "__main__":  # the measuring child: python tests/test_plan.py '["toy", "lora", 1]'
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(json.dumps(measure(*json.loads(sys.argv[1]))))


def test_a_stage_that_does_not_fit_gets_the_flag_to_change():
    """The CLI's note under its table, cheapest change first: checkpointing, then FSDP, then the batch."""
    cfg = plan.Config(gpus=8, grad_checkpointing=False, fsdp=False)
    row = {"stage": "lora", "best": 3}
    assert plan.advice(row, cfg, 1e9) == "--grad_checkpointing"
    cfg = plan.Config(gpus=8, grad_checkpointing=True, fsdp=False)
    assert plan.advice(row, cfg, 1e9) == "--fsdp"
    cfg = plan.Config(gpus=8, grad_checkpointing=True, fsdp=True)
    assert plan.advice(row, cfg, 1e9) == "--batch_size 24 (micro-batch 3)"
    assert plan.advice({"stage": "cache"}, cfg, 1e9).startswith("--tile_px")
