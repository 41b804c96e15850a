"""ae15.py: a 2-step smoke run (checkpoint keys, log, samples, exported folder), exact --resume, --eval of the
exported folder, torchrun DDP == one process with the same global batch, the KL VAE + GAN path, LPIPS loading, and
the input checks.

Run: python -m pytest -q tests/test_ae15.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ae15
from common import draw_prefixes, load_ckpt, step_generator
from models.autoencoder import load_autoencoder
from models.dcae import DCAE
from models.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model",
    "tiny-1.5",
    "--size_px",
    "32",
    "--batch_size",
    "2",
    "--device",
    "cpu",
    "--log_every",
    "1",
    "--sample_every",
    "2",
    "--save_every",
    "1",
    "--eval_n",
    "2",
    "--warmup",
    "1",
]


def run(monkeypatch, *args):
    """Run ae15.main() in this process with the given flags."""
    monkeypatch.setattr(sys, "argv", ["ae15.py", *map(str, args)])
    ae15.main()


def step_lines(out: Path) -> list[str]:
    return [line for line in (out / "log.txt").read_text().splitlines() if line.startswith("step ")]


def test_smoke_resume_eval_ddp(tmp_path, monkeypatch):
    a, b, ddp = tmp_path / "a", tmp_path / "b", tmp_path / "ddp"
    run(monkeypatch, *TINY, "--steps", 2, "--out_dir", a)
    ckpt = load_ckpt(a / "ckpt_0000002.pt")
    assert (
        ckpt.keys() == {"model", "optimizer", "step", "config", "ae_config"} and ckpt["step"] == 2
    )
    assert (
        len(step_lines(a)) == 2
        and (a / "samples" / "0000002.png").is_file()
        and (a / "config.json").is_file()
    )
    # the exported diffusers-format folder, with a measured latent scale
    ae = load_autoencoder(a / "ae")
    assert isinstance(ae, DCAE) and ae.adaptive and ae.params.scaling_factor != dcae_default_scale()
    assert torch.equal(
        ae.state_dict()["decoder.conv_in.weight"], ckpt["model"]["decoder.conv_in.weight"]
    )

    # --resume from step 2 to 3 gives the same step-3 loss and weights as an uninterrupted 3-step run
    run(monkeypatch, *TINY, "--steps", 3, "--out_dir", a, "--resume")
    run(monkeypatch, *TINY, "--steps", 3, "--out_dir", b)
    assert step_lines(a)[-1].split("| dt")[0] == step_lines(b)[-1].split("| dt")[0]
    wa, wb = load_ckpt(a / "ckpt_0000003.pt")["model"], load_ckpt(b / "ckpt_0000003.pt")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)

    # --eval of the exported folder: PSNR / SSIM per prefix c' = C/8, C/4, C/2, C
    run(
        monkeypatch,
        "--eval",
        "--init",
        a / "ae",
        "--size_px",
        32,
        "--eval_n",
        2,
        "--device",
        "cpu",
        "--out_dir",
        a / "ev",
    )
    res = json.loads((a / "ev" / "eval.json").read_text())
    assert {"1", "2", "4", "8"} <= res.keys() and all(0 < res[c]["psnr"] < 60 for c in ("1", "8"))

    # torchrun, 2 ranks x batch 1 == 1 process x batch 2 (same samples per step, gradients averaged
    # by DDP)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "ae15.py",
        *TINY,
    ]
    cmd += ["--batch_size", "1", "--steps", "3", "--out_dir", str(ddp)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    wd = load_ckpt(ddp / "ckpt_0000003.pt")["model"]
    diff = torch.cat([(wd[k].float() - wb[k].float()).abs().flatten() for k in wb])
    # The all-reduced gradient equals the one-process gradient up to float summation order (~1e-9);
    # Adam divides by sqrt(v), which turns that into up to ~5e-5 on the rare weights whose gradient
    # is ~0: bound max and mean.
    assert diff.max() <= 1e-4 and diff.mean() <= 1e-7
    assert [line.split("| gnorm")[1][:7] for line in step_lines(ddp)] == [
        line.split("| gnorm")[1][:7] for line in step_lines(b)
    ]  # the global gradient norm of every step agrees to 3 decimals


def dcae_default_scale() -> float:
    return ae15.AE_PRESETS["tiny-1.5"].scaling_factor


def test_kl_vae_with_gan(tmp_path, monkeypatch):
    out = tmp_path / "vae"
    run(
        monkeypatch,
        *TINY,
        "--model",
        "tiny-vae",
        "--mask",
        "none",
        "--gan_weight",
        0.1,
        "--steps",
        2,
        "--out_dir",
        out,
    )
    ckpt = load_ckpt(out / "ckpt_0000002.pt")
    assert {"disc", "disc_opt"} <= ckpt.keys() and " kl " in step_lines(out)[-1]
    ae = load_autoencoder(out / "ae")
    # shift and scale measured on data at export
    assert isinstance(ae, VAE) and ae.params.shift_factor != 0.1


def test_zero_turns_samples_and_eval_off(tmp_path, monkeypatch):
    """--sample_every 0 / --eval_n 0: no grids, no eval; --save_every 0: the last checkpoint only."""
    out = tmp_path / "quiet"
    zero = ["--sample_every", 0, "--save_every", 0, "--eval_n", 0]
    run(monkeypatch, *TINY, *zero, "--steps", 2, "--out_dir", out)
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_0000002.pt"]
    assert not (out / "samples").exists() and (out / "ae" / "config.json").is_file()
    assert "eval channels" not in (out / "log.txt").read_text()


def test_bf16_autocast_trains_like_fp32(tmp_path, monkeypatch):
    for dtype in ("fp32", "bf16"):
        run(monkeypatch, *TINY, "--steps", 2, "--dtype", dtype, "--out_dir", tmp_path / dtype)
    loss = [
        float(step_lines(tmp_path / dtype)[-1].split("| loss ")[1].split()[0])
        for dtype in ("fp32", "bf16")
    ]
    assert loss[1] == pytest.approx(loss[0], rel=0.05)  # the same step-2 loss to bf16 precision
    w32, w16 = (
        load_ckpt(tmp_path / dtype / "ckpt_0000002.pt")["model"] for dtype in ("fp32", "bf16")
    )
    assert w16["encoder.conv_in.conv.weight"].dtype == torch.float32  # fp32 master weights ...
    # ... bf16 compute
    assert not torch.equal(w32["encoder.conv_in.conv.weight"], w16["encoder.conv_in.conv.weight"])


def test_lpips_loads_local_weights(tmp_path):
    torch.manual_seed(0)
    ref = ae15.LPIPS()
    vgg = {f"features.{k}": v for k, v in ref.features.state_dict().items()} | {
        "classifier.0.weight": torch.zeros(1)
    }
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    torch.save(
        {
            f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
            for i, c in enumerate((64, 128, 256, 512, 512))
        },
        tmp_path / "vgg.pth",
    )
    lpips = ae15.LPIPS.load(tmp_path)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max() < 1e-6 and (lpips(x, y) > 0).all() and lpips(x, y).shape == (2,)
    with pytest.raises(FileNotFoundError, match="must hold vgg16-397923af.pth"):
        ae15.LPIPS.load(tmp_path / "missing")


@pytest.mark.parametrize(
    "flags, error",
    [
        # a 1.0-type AE with latent shortcuts
        (["--model", "tiny"], "--mask prefix needs an adaptive AE"),
        (["--lpips_weight", "0.5"], "LPIPS/VGG weights cannot be downloaded"),
        (["--model", "nope"], "unknown --model 'nope'; choose from"),
        (["--eval", "--eval_n", "0"], "--eval needs images to evaluate"),
    ],
)
def test_bad_flags(tmp_path, monkeypatch, flags, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        run(monkeypatch, *TINY, *flags, "--steps", 1, "--out_dir", tmp_path)


@pytest.mark.parametrize("flag", ["--mask random", "--dtype fp16", "--device gpu"])
def test_enumerated_flags_take_only_their_values(tmp_path, monkeypatch, capsys, flag):
    with pytest.raises(SystemExit):
        run(monkeypatch, *TINY, *flag.split(), "--out_dir", tmp_path)
    assert (
        f"argument {flag.split()[0]}: invalid choice: '{flag.split()[1]}'"
        in capsys.readouterr().err
    )


def test_prefix_candidates_and_draws():
    # owl-wms/medgen's set (Overworldai/owl-wms#65)
    assert ae15.candidate_prefixes(128, ()) == list(range(16, 129, 4))
    # toy latents: multiples of C/8
    assert ae15.candidate_prefixes(16, ()) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert ae15.candidate_prefixes(16, (3, 5)) == [3, 5, 16]  # always including C
    # ae15 draws with common.draw_prefixes from the step's generator: the sequence ae15 drew before
    # that function existed (its own sample_prefixes), so the zoo's AE runs replay exactly
    # (semantics: tests/test_common.py)
    cands = ae15.candidate_prefixes(32, ())
    draws = [draw_prefixes(step_generator(1, s), cands, 3, True, 32) for s in range(4)]
    assert draws == [[32, 28, 8], [32, 32, 32], [32, 28, 8], [32, 12, 32]]
    assert [draw_prefixes(step_generator(1, s), cands, 1, True, 32) for s in range(4)] == [
        [28],
        [32],
        [28],
        [12],
    ]
