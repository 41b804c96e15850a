"""lora.py, the training loop of stages 2 and 3: smoke run, DDP = one process, kill + resume = uninterrupted, the guide
loss identity, NaN handling, wrong inputs.

Run: python -m pytest -q tests/test_lora_stage.py
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora
import training
from common import UsageError, load_ckpt
from data import LatentCache

ROOT = Path(__file__).resolve().parents[1]


def make_cache(
    folder: Path, n=12, C=4, h=8, w=8, L=5, D=32, V=16, shard=5, seed=0, latent="teacher", nan=False
):
    """A synthetic latent cache in align.py's format (random latents and text states), for the tiny FLUX preset."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards = []
    for i, start in enumerate(range(0, n, shard)):
        m = min(shard, n - start)
        z = torch.randn(m, C, h, w, generator=g) * (float("nan") if nan else 1)
        tensors = {
            latent: z,
            "txt": torch.randn(m, L, D, generator=g),
            "y": torch.randn(m, V, generator=g),
        }
        save_file(tensors, folder / f"shard_{i:05d}.safetensors")
        shards.append({"file": f"shard_{i:05d}.safetensors", "rows": m})
    save_file({"txt": torch.zeros(1, L, D), "y": torch.zeros(1, V)}, folder / "null.safetensors")
    meta = {"count": n, "shards": shards, "shapes": {latent: [C, h, w], "txt": [L, D], "y": [V]}}
    (folder / "meta.json").write_text(json.dumps(meta | {f"{latent}_ae": "", "text": ""}))
    return folder


def args(cache, out, *extra):
    return [
        "--preset",
        "tiny",
        "--rank",
        "0",
        "--cache",
        str(cache),
        "--latent",
        "teacher",
        "--out_dir",
        str(out),
        "--batch_size",
        "4",
        "--warmup",
        "2",
        "--sample_every",
        "0",
        "--log_every",
        "1",
        *extra,
    ]


def run(argv, torchrun=0, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={torchrun}",
        ]
        if torchrun
        else [sys.executable]
    )
    return subprocess.run(
        [*launcher, "lora.py", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=check,
    )


def losses(out: Path) -> dict[int, float]:
    lines = [
        ln
        for ln in (out / "log.txt").read_text().splitlines()
        if ln.startswith("step ") and "| loss " in ln
    ]
    return {
        int(ln.split()[1].split("/")[0]): float(ln.split("| loss ")[1].split()[0]) for ln in lines
    }


def test_smoke_two_steps_checkpoint_keys(tmp_path):
    cache = make_cache(tmp_path / "cache")
    lora.main(
        lora.parse_config(lora.Config, args(cache, tmp_path / "out", "--steps", "2", "--rank", "4"))
    )
    ckpt = load_ckpt(tmp_path / "out" / "ckpt_0000002.pt")
    keys = set(ckpt["model"])
    assert keys and all(
        ".lora_A." in k or ".lora_B." in k or k.split(".")[0] in ("x_embedder", "proj_out")
        for k in keys
    )
    assert {"x_embedder.weight", "proj_out.weight"} <= keys and keys == set(ckpt["ema"])
    assert ckpt["step"] == 2 and ckpt["config"]["rank"] == 4 and ckpt["optimizer"]["state"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["steps"] == 2
    assert sorted(losses(tmp_path / "out")) == [1, 2]


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_ranks_equal_one_process(tmp_path, fsdp):
    """torchrun with 2 ranks of 2 samples = 1 process of 4 samples: the same parameters after 3 steps."""
    cache = make_cache(tmp_path / "cache")
    extra = ["--steps", "3", "--rank", "4", *(["--fsdp"] if fsdp else [])]
    run(args(cache, tmp_path / "one", *extra[:4]))
    r = run(args(cache, tmp_path / "two", *extra), torchrun=2, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (
        load_ckpt(tmp_path / "one" / "ckpt_0000003.pt"),
        load_ckpt(tmp_path / "two" / "ckpt_0000003.pt"),
    )
    assert one["model"].keys() == two["model"].keys()
    diff = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    print(
        f"{'FSDP' if fsdp else 'DDP'} 2 ranks vs 1 process after 3 steps: max abs parameter difference {diff:.2e}"
    )
    assert diff < 1e-5
    assert max((one["ema"][k] - two["ema"][k]).abs().max().item() for k in one["ema"]) < 1e-5
    assert all(
        abs(losses(tmp_path / "one")[s] - losses(tmp_path / "two")[s]) < 1e-5 for s in (1, 2, 3)
    )


def test_killed_run_resumes_exactly(tmp_path):
    """Kill the run after step 4 (last checkpoint: step 3); --resume repeats steps 4, 5, 6 of the uninterrupted run."""
    cache = make_cache(tmp_path / "cache")
    run(args(cache, tmp_path / "full", "--steps", "6", "--save_every", "3"))
    out = tmp_path / "killed"
    cmd = [sys.executable, "lora.py", *args(cache, out, "--steps", "40", "--save_every", "3")]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "log.txt").exists() and "step 0000004" in (out / "log.txt").read_text()
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(out.glob("ckpt_*.pt")).name in ("ckpt_0000003.pt", "ckpt_0000006.pt")
    for ckpt in out.glob("ckpt_*.pt"):  # keep only step 3's, as if the kill came right after step 4
        if ckpt.name != "ckpt_0000003.pt":
            ckpt.unlink()
    (out / "log.txt").unlink()
    run(args(cache, out, "--steps", "6", "--save_every", "3", "--resume"))
    full, resumed = losses(tmp_path / "full"), losses(out)
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == full[s] for s in (4, 5, 6))
    a, b = load_ckpt(tmp_path / "full" / "ckpt_0000006.pt"), load_ckpt(out / "ckpt_0000006.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


class DistilledToy(torch.nn.Module):
    """A 'guidance-distilled' model whose output is exactly v_u + w·(v_c - v_u), with v_c the true velocity."""

    params = type("P", (), {"patch_size": 1, "guidance_embed": True})

    def __init__(self, x0, noise):
        super().__init__()
        self.x0, self.noise, self.scale = x0, noise, torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, txt, y, guidance):
        # = noise - x0 on the path of (x0, noise)
        v_c = self.scale * (x - self.x0) / t[:, None, None, None]
        v_u = 0.3 * x + 2.0  # anything: what the model does without the caption
        uncond = (txt == 0).all(dim=(1, 2))[:, None, None, None]  # the null caption
        w = guidance[:, None, None, None]
        return torch.where(uncond, v_u, v_u + w * (v_c - v_u))


def test_guide_loss_recovers_the_conditional_velocity():
    B, C, h, w = 8, 3, 4, 4
    x0 = torch.randn(B, C, h, w)
    g = torch.Generator().manual_seed(3)
    # what training.draw draws first
    noise = torch.randn((B, C, h, w), generator=torch.Generator().manual_seed(3))
    model = DistilledToy(x0, noise)
    cond, null = (
        {"txt": torch.ones(B, 2, 3), "y": torch.ones(B, 2)},
        {"txt": torch.zeros(1, 2, 3), "y": torch.zeros(1, 2)},
    )

    def loss(g):  # lora.py's guide-loss term, without text dropout
        x_t, sigma, v, _, w = training.draw(x0, g, B, 0, 3.0, 0.0, 1.0, 14.0)
        return training.guide_loss(model, model, x_t, sigma, v, cond, null, w)

    assert loss(g) < 1e-8  # (v_g - (1 - w)·v_u) / w = v_c exactly, whatever w in [1, 14]
    model.scale.data.fill_(1.1)  # a model whose v_c is off by 10% is penalised
    assert loss(torch.Generator().manual_seed(3)) > 1e-3


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cache = make_cache(tmp_path / "cache", nan=True)
    nan = r"loss is nan at step 1 \(non-finite cached values in shard_0000\d\.safetensors rows \d"
    nan += r".*\); last good checkpoint: None"
    with pytest.raises(UsageError, match=nan):
        lora.main(lora.parse_config(lora.Config, args(cache, tmp_path / "out", "--steps", "3")))
    assert not list((tmp_path / "out").glob("ckpt_*.pt"))
    cache = make_cache(tmp_path / "cache2")
    out = tmp_path / "diverge"
    diverged = (
        r"at step \d+ \(batch shard_\d+\.safetensors rows \d.* is finite: the model diverged\); "
    )
    diverged += r"last good checkpoint: .*ckpt_\d{7}\.pt"
    with pytest.raises(UsageError, match=diverged):
        lora.main(
            lora.parse_config(
                lora.Config, args(cache, out, "--steps", "50", "--save_every", "1", "--lr", "1e30")
            )
        )
    last = load_ckpt(max(out.glob("ckpt_*.pt")))
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_model_that_does_not_fit_the_cache_fails_before_training(tmp_path):
    cache = make_cache(tmp_path / "cache", C=8)
    with pytest.raises(ValueError, match=r"latents of 4 channels.*shape \(8, 8, 8\)"):
        lora.main(lora.parse_config(lora.Config, args(cache, tmp_path / "out", "--steps", "2")))
    assert (
        not (tmp_path / "out" / "log.txt").exists()
        or "step" not in (tmp_path / "out" / "log.txt").read_text()
    )


def test_validation_loss_is_logged_and_deterministic(tmp_path):
    cache, val = make_cache(tmp_path / "cache"), make_cache(tmp_path / "val", n=5, seed=1)
    lora.main(
        lora.parse_config(
            lora.Config,
            args(
                cache, tmp_path / "out", "--steps", "2", "--val_cache", str(val), "--val_every", "1"
            ),
        )
    )
    lines = [
        ln for ln in (tmp_path / "out" / "log.txt").read_text().splitlines() if "val_loss" in ln
    ]
    assert [ln.split()[1] for ln in lines] == ["0000001/0000002", "0000002/0000002"]
    c = lora.Config(preset="tiny", rank=0, batch_size=2, shift="flux", shift_value=3.0)
    model = lora.build_model(c, torch.float32)
    a, b = (training.validate(model, LatentCache(val), "teacher", c, "cpu") for _ in range(2))
    # same points every call; a random model's velocity error is O(1) per element
    assert a == b and 0.5 < a < 10


def test_clip_grad_zero_means_no_clipping(tmp_path):
    """--clip_grad 0 turns clipping off (it must not scale every gradient to zero and freeze the run)."""
    cache = make_cache(tmp_path / "cache")
    for name, clip in (("off", "0"), ("loose", "1e9")):
        lora.main(
            lora.parse_config(
                lora.Config, args(cache, tmp_path / name, "--steps", "2", "--clip_grad", clip)
            )
        )
    off, loose = (load_ckpt(tmp_path / n / "ckpt_0000002.pt")["model"] for n in ("off", "loose"))
    cfg = lora.Config(preset="tiny", rank=0, cache=str(cache), latent="teacher")
    torch.manual_seed(cfg.seed)  # the initial weights, as lora.main builds them
    init = lora.build_model(cfg, torch.float32).state_dict()
    assert all(torch.equal(off[k], loose[k]) for k in off)
    assert not torch.equal(off["x_embedder.weight"], init["x_embedder.weight"])


def test_flow_matching_loss_on_a_guidance_model(tmp_path):
    """--loss fm on a guidance-distilled model (the plain-FM ablation of the guide loss) trains its w = 1 velocity."""
    cache = make_cache(tmp_path / "cache")
    lora.main(
        lora.parse_config(
            lora.Config, args(cache, tmp_path / "out", "--steps", "2", "--loss", "fm")
        )
    )
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "loss flow matching" in log and sorted(losses(tmp_path / "out")) == [1, 2]


def test_bf16_lora_run_validates(tmp_path):
    """Under --dtype bf16 the frozen weights are bf16 and the trainable ones fp32: validation (and previews) must run
    under autocast as the loss does, or the first mixed matmul fails."""
    cache, val = make_cache(tmp_path / "cache"), make_cache(tmp_path / "val", n=5, seed=1)
    extra = [
        "--steps",
        "2",
        "--rank",
        "4",
        "--dtype",
        "bf16",
        "--val_cache",
        str(val),
        "--val_every",
        "1",
    ]
    lora.main(lora.parse_config(lora.Config, args(cache, tmp_path / "out", *extra)))
    vals = [
        ln for ln in (tmp_path / "out" / "log.txt").read_text().splitlines() if "val_loss" in ln
    ]
    assert len(vals) == 2 and all(0.1 < float(ln.split()[-1]) < 10 for ln in vals)


def test_augmented_training_adds_prefix_terms(tmp_path):
    """--prefixes: each step's loss is the mean over the full latent and a channel prefix, so it differs from
    the plain run's on the same draws; prefixes none shorter than the latent are an error, not a silent no-op."""
    cache = make_cache(tmp_path / "cache")
    base = ["--steps", "1", "--rank", "4", "--loss", "fm"]
    lora.main(lora.parse_config(lora.Config, args(cache, tmp_path / "plain", *base)))
    lora.main(
        lora.parse_config(lora.Config, args(cache, tmp_path / "aug", *base, "--prefixes", "2"))
    )
    assert losses(tmp_path / "plain")[1] != losses(tmp_path / "aug")[1]
    with pytest.raises(
        SystemExit, match=r"--prefixes \(4,\): none is shorter than the latent.s 4 channels"
    ):
        lora.main(
            lora.parse_config(lora.Config, args(cache, tmp_path / "bad", *base, "--prefixes", "4"))
        )


def test_merge_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    """--merge loads only the trainable tensors: a renamed or missing one must fail, not merge the base unchanged."""
    cache = make_cache(tmp_path / "cache")
    lora.main(
        lora.parse_config(lora.Config, args(cache, tmp_path / "out", "--steps", "1", "--rank", "4"))
    )
    ckpt = load_ckpt(tmp_path / "out" / "ckpt_0000001.pt")
    name = next(k for k in ckpt["ema"] if ".lora_B." in k)
    ckpt["ema"]["renamed." + name] = ckpt["ema"].pop(name)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError,
        match=r"unknown tensors \['renamed\..*missing trainable tensors \['" + re.escape(name),
    ):
        lora.merge(lora.Config(merge=str(tmp_path / "bad.pt"), out_dir=str(tmp_path / "merged")))
    assert not (tmp_path / "merged").exists()
