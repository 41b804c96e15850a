"""quantize.py as a stage: a tiny end-to-end run (calibrate, quantise, save, export, reload), --dry_run, the ablation
mode, and --check refusing PyPI's unrelated `nunchaku` with a clear message.

Run: python -m pytest -q tests/test_quantize.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import quantize
from common import save_ckpt, save_pretrained
from models.flux import PRESETS, Flux
from models.svdquant import SVDQuantLinear, W4A16Linear, is_quantized, load_quantized
from runs import quant_ablation

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--num_grids",
    "2",
    "--lowrank_iters",
    "2",
    "--calib_batches",
    "2",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices run on one thread: two OpenMP threads on a busy 2-core machine spin ~100x longer in small QRs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "quantize.py", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize("precision", ["nvfp4", "int4"])
def test_tiny_end_to_end(tmp_path, precision):
    quantize.main([*FAST, "--precision", precision, "--out_dir", str(tmp_path), "--name", "tiny"])
    tag = "fp4" if precision == "nvfp4" else "int4"
    export = tmp_path / f"svdq-{tag}_r32-tiny.safetensors"
    assert {"config.json", "log.txt", "transformer", export.name} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == precision
    log = (tmp_path / "log.txt").read_text()
    assert "group 013/013" in log and "quantize |" in log and "save |" in log
    # the emulated model reloads, is quantised, and stays close to the random fp32 model it came
    # from
    assert is_quantized(tmp_path / "transformer")
    model = load_quantized(tmp_path / "transformer")
    assert isinstance(model.transformer_blocks[0].attn.to_q, SVDQuantLinear)
    assert isinstance(model.single_transformer_blocks[1].norm.linear, W4A16Linear)
    assert isinstance(model.proj_out, torch.nn.Linear)  # the head stays 16-bit
    torch.manual_seed(0)
    ref = Flux(PRESETS["tiny"]).eval()  # same seed as quantize.py: the same random weights
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    txt, y, g = torch.randn(1, 6, 32), torch.randn(1, 16), torch.tensor([3.5])
    with torch.no_grad():
        v, v_ref = model(x, t, txt, y, g), ref(x, t, txt, y, g)
    assert 0 < ((v - v_ref).norm() / v_ref.norm()).item() < 0.3
    with safe_open(export, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert json.loads(meta["quantization_config"])["weight"]["dtype"] == (
        "fp4_e2m1_all" if tag == "fp4" else "int4"
    )
    assert json.loads(meta["config"])["num_single_layers"] == 2 and meta["model_class"].startswith(
        "NunchakuFlux"
    )
    assert (
        "transformer_blocks.0.qkv_proj.qweight" in keys
        and "single_transformer_blocks.1.mlp_fc2.lora_up" in keys
    )
    assert ("transformer_blocks.0.mlp_fc2.wtscale" in keys) == (tag == "fp4")


def test_dry_run_prints_the_layer_plan(tmp_path, capsys):
    quantize.main([*FAST, "--dry_run", "--out_dir", str(tmp_path)])
    assert (
        "W4A4 linears 24 in 13 smoothing groups | W4A16 AdaLN linears 4" in capsys.readouterr().out
    )
    assert (tmp_path / "config.json").exists() and not (tmp_path / "transformer").exists()


def test_model_folder_and_recorded_calibration_inputs(tmp_path):
    """--model reads a diffusers-layout folder (Flux.from_pretrained), --calib_file recorded inputs (x, t, txt, y)."""
    torch.manual_seed(1)
    model = Flux(PRESETS["tiny"])
    save_pretrained(tmp_path / "base", model.state_dict(), model.diffusers_config())
    n = 3
    calib = dict(
        x=torch.randn(n, 4, 8, 8),
        t=torch.rand(n),
        txt=torch.randn(n, 5, 32),
        y=torch.randn(n, 16),
        guidance=torch.full((n,), 3.5),
    )
    save_ckpt(calib, tmp_path / "calib.safetensors")
    base, recorded, out = (str(tmp_path / n) for n in ("base", "calib.safetensors", "q"))
    quantize.main(
        [
            "--model",
            base,
            "--calib_file",
            recorded,
            "--precision",
            "int4",
            "--method",
            "rtn",
            "--out_dir",
            out,
        ]
    )
    # 3 samples, batch size 2
    assert "calib | batches 2 | layers 16" in (tmp_path / "q" / "log.txt").read_text()
    q = load_quantized(tmp_path / "q" / "transformer")
    assert (
        q.transformer_blocks[0].attn.to_q.rank == 0
        and q.transformer_blocks[0].attn.to_q.smooth.eq(1).all()
    )
    with safe_open(tmp_path / "q" / "svdq-int4_r0-model.safetensors", "pt") as f:
        # RTN: a zero rank-16 branch
        assert json.loads(f.metadata()["quantization_config"])["rank"] == 16
        assert f.get_slice("transformer_blocks.0.qkv_proj.lora_up").get_shape() == [256, 16]
    # not on noise
    with pytest.raises(ValueError, match="transformer folder: calibrate it on inputs recorded"):
        quantize.main(["--model", base, "--out_dir", str(tmp_path / "q2")])


def test_a_rank_no_layer_can_hold_is_refused_before_quantising(tmp_path):
    with pytest.raises(
        ValueError, match=r"--rank 80 exceeds this model's smallest W4A4 layer \(64 .*--rank 64"
    ):
        quantize.main([*FAST, "--rank", "80", "--out_dir", str(tmp_path)])
    assert not (tmp_path / "transformer").exists()


def test_ablation_mode_svdquant_beats_rtn(tmp_path):
    quant_ablation.main(
        [
            *FAST,
            "--preset",
            "tiny",
            "--out_dir",
            str(tmp_path),
            "--outlier_channels",
            "4",
            "--rank",
            "8",
        ]
    )
    rows = {
        (r["precision"], r["method"]): r
        for r in json.loads((tmp_path / "ablation.json").read_text())
    }
    floor = rows[("-", "adaln-w4a16-only")]
    assert len(rows) == 5 and floor["output_rel_err"] > 0 and floor["layer_rel_err"] is None
    for p in ("nvfp4", "int4"):
        for metric in ("output_rel_err", "layer_rel_err"):
            assert 0 < rows[(p, "svdquant")][metric] < rows[(p, "rtn")][metric], rows


def test_check_names_the_unrelated_pypi_package(tmp_path):
    """PyPI's `nunchaku` 0.16.1 ("piece-wise linear segments") under the real one's name: --check refuses, says why."""
    site = tmp_path / "site"
    (site / "nunchaku").mkdir(parents=True)
    (site / "nunchaku" / "__init__.py").write_text(
        "from .nunchaku import *  # the PyPI package's layout\n"
    )
    (site / "nunchaku" / "nunchaku.py").write_text("class Nunchaku:\n    pass\n")
    dist = site / "nunchaku-0.16.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: nunchaku\nVersion: 0.16.1\n"
        "Summary: Optimally partitioning data into piece-wise linear segments.\nAuthor: Yu Huo\n"
    )
    r = run([*FAST, "--check", "--out_dir", str(tmp_path / "out")], env={"PYTHONPATH": str(site)})
    assert r.returncode != 0
    assert (
        "wrong package" in r.stderr
        and "nunchaku 0.16.1" in r.stderr
        and "piece-wise linear" in r.stderr
    )
    assert not (tmp_path / "out" / "transformer").exists()  # refused before quantising


def test_check_without_nunchaku_says_it_is_not_installed(tmp_path):
    with pytest.raises(SystemExit, match="Nunchaku is not installed.*GitHub releases"):
        quantize.main([*FAST, "--check", "--out_dir", str(tmp_path)])


def test_check_glue_against_a_stand_in_with_diffusers_calling_convention(tmp_path, monkeypatch):
    """The --check comparison, with Nunchaku replaced by a stand-in that takes packed tokens + img_ids/txt_ids like
    NunchakuFluxTransformer2DModelV2.forward and places tokens by their ids: the same model must agree exactly."""

    class StandIn:
        @staticmethod
        def from_pretrained(path, device, torch_dtype):
            assert str(path).endswith(".safetensors") and torch_dtype == torch.bfloat16
            return StandIn()

        def __call__(
            self,
            hidden_states,
            encoder_hidden_states,
            pooled_projections,
            timestep,
            img_ids,
            txt_ids,
            guidance,
            return_dict,
        ):
            p, B, D = model.params.patch_size, hidden_states.shape[0], hidden_states.shape[2]
            rows, cols = img_ids[:, 1].long(), img_ids[:, 2].long()
            x = torch.zeros(
                B,
                D // p**2,
                p * (int(rows.max()) + 1),
                p * (int(cols.max()) + 1),
                dtype=hidden_states.dtype,
            )
            for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
                x[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = hidden_states[:, i].reshape(
                    B, -1, p, p
                )
            v = model(x, timestep, encoder_hidden_states, pooled_projections, guidance)
            out = torch.stack(
                [
                    v[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(B, -1)
                    for r, c in zip(rows.tolist(), cols.tolist())
                ],
                dim=1,
            )
            assert not return_dict and txt_ids.shape == (encoder_hidden_states.shape[1], 3)
            return (out,)

    quantize.main([*FAST, "--out_dir", str(tmp_path), "--name", "t"])
    model = load_quantized(tmp_path / "transformer")
    fake = type(sys)("transformer_flux_v2")
    fake.NunchakuFluxTransformer2DModelV2 = StandIn
    monkeypatch.setitem(sys.modules, "nunchaku.models.transformers.transformer_flux_v2", fake)
    cfg = quantize.Config(latent_hw=8, txt_len=5, calib_batch_size=2)
    quantize.nunchaku_check(
        tmp_path / "svdq-fp4_r32-t.safetensors",
        tmp_path / "transformer",
        cfg,
        "cpu",
        tmp_path / "c",
    )
    assert (tmp_path / "c").read_text().strip() == "check | nunchaku vs emulation | rel_err 0.0000"
    # a kernel 10 % off
    monkeypatch.setattr(model, "forward", lambda *a, f=model.forward: 1.1 * f(*a))
    with pytest.raises(SystemExit, match=r"differs from the emulation by 10\.0% \(> 5%\)"):
        quantize.nunchaku_check(
            tmp_path / "svdq-fp4_r32-t.safetensors",
            tmp_path / "transformer",
            cfg,
            "cpu",
            tmp_path / "c",
        )


def test_model_folder_is_calibrated_by_the_sampler_and_samples(tmp_path):
    """A model folder in, a model folder out: calibration runs the sampler over prompts, sample.py runs the result."""
    import sample

    from tiny_world import build_world

    world = build_world(tmp_path / "world")
    quantize.main(
        [
            "--model",
            str(world / "base"),
            "--device",
            "cpu",
            "--calib_count",
            "3",
            "--calib_steps",
            "2",
            "--calib_size",
            "16",
            "--calib_batch_size",
            "3",
            "--num_grids",
            "2",
            "--lowrank_iters",
            "2",
            "--rank",
            "4",
            "--out_dir",
            str(tmp_path / "q"),
        ]
    )
    log = (tmp_path / "q" / "log.txt").read_text()
    assert "calib | sampler 3 prompts x 2 steps" in log
    assert (tmp_path / "q" / "vae" / "config.json").is_file() and (
        tmp_path / "q" / "text_encoder_2"
    ).is_dir()
    paths = sample.main(
        [
            "--model",
            str(tmp_path / "q"),
            "--prompt",
            "a red circle",
            "--size",
            "16",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "q.png"),
        ]
    )
    assert paths[0].is_file()
