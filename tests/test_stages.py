"""The DC-Gen stages end to end on a tiny world: align.py cache -> embed -> head, lora.py -> --merge (loaded by
diffusers), distill.py; and their bad-input errors.

Run: python -m pytest -q tests/test_stages.py
"""

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel

import align
import distill
import lora
from common import load_ckpt
from data import LatentCache
from models.pipeline import load_pipeline, write_pipeline
from models.sana import PRESETS as SANA_PRESETS
from models.sana import Sana

from tiny_world import SIZE, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = build_world(tmp_path_factory.mktemp("world"))
    align.main(
        [
            "--stage",
            "cache",
            "--data",
            "shapes",
            "--count",
            "10",
            "--resolution",
            str(SIZE),
            "--shard_size",
            "4",
            "--batch_size",
            "3",
            "--teacher_ae",
            str(root / "teacher_ae"),
            "--student_ae",
            str(root / "student_ae"),
            "--text",
            str(root / "text"),
            "--out_dir",
            str(root / "cache"),
        ]
    )
    return root


def run(stage_main, world, out, *argv):
    common = [
        "--cache",
        str(world / "cache"),
        "--out_dir",
        str(out),
        "--batch_size",
        "4",
        "--log_every",
        "1",
    ]
    return stage_main([*common, *argv])


def test_cache_holds_paired_latents_and_text(world):
    meta = json.loads((world / "cache" / "meta.json").read_text())
    assert meta["count"] == 10 and [s["rows"] for s in meta["shards"]] == [4, 4, 2]
    assert meta["shapes"] == {"teacher": [4, 8, 8], "student": [8, 2, 2], "txt": [8, 32], "y": [32]}
    shard = load_ckpt(world / "cache" / "shard_00002.safetensors")
    assert shard["student"].shape == (2, 8, 2, 2) and torch.isfinite(shard["teacher"]).all()
    assert set(load_ckpt(world / "cache" / "null.safetensors")) == {"txt", "y"}


def test_cache_under_bf16_autocast_matches_fp32_to_bf16_precision(world, tmp_path):
    align.main(
        [
            "--stage",
            "cache",
            "--data",
            "shapes",
            "--count",
            "4",
            "--resolution",
            str(SIZE),
            "--shard_size",
            "4",
            "--batch_size",
            "3",
            "--teacher_ae",
            str(world / "teacher_ae"),
            "--student_ae",
            str(world / "student_ae"),
            "--text",
            str(world / "text"),
            "--dtype",
            "bf16",
            "--out_dir",
            str(tmp_path),
        ]
    )
    bf16, fp32 = (
        load_ckpt(tmp_path / "shard_00000.safetensors"),
        load_ckpt(world / "cache" / "shard_00000.safetensors"),
    )
    for k in ("teacher", "student"):
        err = (bf16[k] - fp32[k]).norm() / fp32[k].norm()
        # computed in bf16, stored in fp32
        assert bf16[k].dtype == torch.float32 and 0 < err < 0.03, (k, err)
    assert torch.equal(bf16["txt"], fp32["txt"])  # the text encoders run in fp32 either way


@pytest.mark.parametrize("mode", ["upsample", "downsample"])
def test_embed_stage_trains_only_the_embedder_and_assembles_the_student(world, tmp_path, mode):
    run(
        align.main,
        world,
        tmp_path,
        "--stage",
        "embed",
        "--base",
        str(world / "base"),
        "--steps",
        "6",
        "--align",
        mode,
        "--lr",
        "1e-2",
    )
    ckpt = load_ckpt(tmp_path / "ckpt_0000006.pt")
    # Linear(8 -> D)
    assert set(ckpt["model"]) == {"weight", "bias"} and ckpt["model"]["weight"].shape == (64, 8)
    losses = [
        float(ln.split("loss ")[1].split()[0])
        for ln in (tmp_path / "log.txt").read_text().splitlines()
        if ln.startswith("step")
    ]
    assert losses[-1] < losses[0]  # the embedder learns to mimic the base's
    student = load_pipeline(tmp_path / "model").transformer
    base = load_pipeline(world / "base").transformer
    assert (student.params.in_channels, student.params.patch_size) == (8, 1)
    assert torch.equal(student.state_dict()["x_embedder.weight"], ckpt["model"]["weight"])
    assert torch.equal(
        student.transformer_blocks[0].attn.to_q.weight, base.transformer_blocks[0].attn.to_q.weight
    )


def test_embed_stage_aligns_a_sana_conv_embedder(world, tmp_path):
    """SANA's embedder is a conv (`patch_embed.proj`): the student gets a fresh conv of its own patch size, learns to
    mimic the base's, and lands at that key in the assembled model."""
    write_pipeline(
        tmp_path / "sana", Sana(SANA_PRESETS["tiny"]), world / "teacher_ae", world / "text", "flux"
    )
    run(
        align.main,
        world,
        tmp_path / "out",
        "--stage",
        "embed",
        "--base",
        str(tmp_path / "sana"),
        "--steps",
        "6",
        "--lr",
        "1e-2",
    )
    ckpt = load_ckpt(tmp_path / "out" / "ckpt_0000006.pt")
    assert ckpt["model"]["weight"].shape == (32, 8, 1, 1)  # Conv2d(8 -> D, kernel = stride = 1)
    losses = [
        float(ln.split("loss ")[1].split()[0])
        for ln in (tmp_path / "out" / "log.txt").read_text().splitlines()
        if ln.startswith("step")
    ]
    assert losses[-1] < losses[0]
    student = load_pipeline(tmp_path / "out" / "model", parts=("transformer",)).transformer
    assert isinstance(student, Sana) and (
        student.params.in_channels,
        student.params.patch_size,
    ) == (8, 1)
    assert torch.equal(student.state_dict()["patch_embed.proj.weight"], ckpt["model"]["weight"])


def test_head_then_lora_then_merge_loads_in_diffusers(world, tmp_path):
    run(
        align.main,
        world,
        tmp_path / "embed",
        "--stage",
        "embed",
        "--base",
        str(world / "base"),
        "--steps",
        "2",
    )
    run(
        align.main,
        world,
        tmp_path / "head",
        "--stage",
        "head",
        "--init",
        str(tmp_path / "embed" / "model"),
        "--steps",
        "2",
        "--warmup",
        "1",
    )
    head = load_ckpt(tmp_path / "head" / "ckpt_0000002.pt")
    assert {k.split(".")[0] for k in head["model"]} == {"x_embedder", "proj_out"}  # backbone frozen
    cfg = lora.Config(
        init=str(tmp_path / "head" / "model"),
        cache=str(world / "cache"),
        out_dir=str(tmp_path / "lora"),
        rank=4,
        alpha=8,
        steps=2,
        batch_size=4,
        warmup=1,
        sample_every=1,
        ema=0.5,
    )
    last = lora.main(cfg)
    # previews decode through the student AE
    assert (tmp_path / "lora" / "samples" / "0000001.png").is_file()
    merged = lora.merge(dataclasses.replace(cfg, merge=str(last), out_dir=str(tmp_path / "merged")))
    ours = load_pipeline(merged).transformer
    ref = FluxTransformer2DModel.from_pretrained(merged / "transformer").eval()
    x, t, txt, y, g = (
        torch.randn(2, 8, 2, 2),
        torch.rand(2),
        torch.randn(2, 8, 32),
        torch.randn(2, 32),
        torch.ones(2),
    )
    with torch.no_grad():
        expected = ref(
            hidden_states=x.permute(0, 2, 3, 1).reshape(2, 4, 8),
            encoder_hidden_states=txt,
            pooled_projections=y,
            timestep=t,
            img_ids=torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]),
            txt_ids=torch.zeros(8, 3),
            guidance=g,
            return_dict=False,
        )[0]
        assert (
            ours(x, t, txt, y, g).permute(0, 2, 3, 1).reshape(2, 4, 8) - expected
        ).abs().max() < 1e-5
    # the merged weights are the LoRA checkpoint's EMA folded into the head stage's model
    ema = load_ckpt(last)["ema"]
    assert torch.equal(ours.state_dict()["x_embedder.weight"], ema["x_embedder.weight"])


def test_distill_starts_at_the_teacher_and_writes_a_guidance_model(world, tmp_path):
    run(
        distill.main,
        world,
        tmp_path,
        "--init",
        str(world / "base_cfg"),
        "--latent",
        "teacher",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--sample_every",
        "2",
    )
    student = load_pipeline(tmp_path / "model").transformer
    assert student.params.guidance_embed and load_ckpt(tmp_path / "ckpt_0000002.pt")["step"] == 2
    # previews with embedded guidance, not CFG
    assert (tmp_path / "samples" / "0000002.png").is_file()
    teacher = distill.load_teacher(distill.Config(init=str(world / "base_cfg")), torch.float32)
    fresh = distill.build_student(
        distill.Config(init=str(world / "base_cfg")), torch.float32, teacher
    )
    x, t, txt, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 8, 32), torch.randn(2, 32)
    with torch.no_grad():  # at step 0 the student is the teacher's conditional velocity, whatever w
        for w in (1.0, 7.0):
            assert torch.allclose(
                fresh(x, t, txt, y, torch.full((2,), w)), teacher(x, t, txt, y), atol=1e-6
            )


def test_a_student_at_a_larger_size_aligns_to_the_teacher_at_its_own_size(world, tmp_path):
    """--teacher_resolution: the student's 4x-larger images (64 px, f8 latents 8x8) in 2x2 patches land on the
    teacher's own 4x4 token grid (its images area-downsampled to 16 px): the toy 4K model's pairing (README)."""
    align.main(
        [
            "--stage",
            "cache",
            "--data",
            "shapes",
            "--count",
            "4",
            "--resolution",
            str(4 * SIZE),
            "--teacher_resolution",
            str(SIZE),
            "--teacher_ae",
            str(world / "teacher_ae"),
            "--student_ae",
            str(world / "student_ae"),
            "--text",
            str(world / "text"),
            "--out_dir",
            str(tmp_path / "cache"),
        ]
    )
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["shapes"]["teacher"] == [4, 8, 8] and meta["shapes"]["student"] == [8, 8, 8]
    assert (meta["resolution"], meta["teacher_resolution"]) == (4 * SIZE, SIZE)
    # the same scenes as the world's cache (same seed): its teacher latents, up to anti-aliasing at
    # 16 px
    big, small = (
        LatentCache(p).get([0, 1, 2, 3], ["teacher"])["teacher"]
        for p in (tmp_path / "cache", world / "cache")
    )
    assert (big - small).abs().mean() < 0.1 * small.std()
    # --student_channels c: DC-AE 1.5's first c channels, the same numbers as the first c of the full latent
    align.main(
        [
            "--stage",
            "cache",
            "--data",
            "shapes",
            "--count",
            "4",
            "--resolution",
            str(4 * SIZE),
            "--student_ae",
            str(world / "student_ae"),
            "--student_channels",
            "4",
            "--text",
            str(world / "text"),
            "--out_dir",
            str(tmp_path / "cache4"),
        ]
    )
    full, prefix = (
        LatentCache(p).get([0, 1, 2, 3], ["student"])["student"]
        for p in (tmp_path / "cache", tmp_path / "cache4")
    )
    assert prefix.shape[1] == 4 and torch.allclose(prefix, full[:, :4], atol=1e-6)
    align.main(
        [
            "--stage",
            "embed",
            "--base",
            str(world / "base"),
            "--cache",
            str(tmp_path / "cache"),
            "--patch_size",
            "2",
            "--steps",
            "2",
            "--batch_size",
            "4",
            "--out_dir",
            str(tmp_path / "embed"),
        ]
    )
    log = (tmp_path / "embed" / "log.txt").read_text()
    assert "teacher grid (4, 4) -> student grid (4, 4) (x1)" in log
    student = load_pipeline(tmp_path / "embed" / "model").transformer
    assert (student.params.in_channels, student.params.patch_size) == (8, 2)
    # Linear(8 channels x 2 x 2 -> D)
    assert student.state_dict()["x_embedder.weight"].shape == (64, 32)


def test_student_grid_that_does_not_divide_the_teacher_grid_fails(world, tmp_path):
    align.main(
        [
            "--stage",
            "cache",
            "--data",
            "shapes",
            "--count",
            "2",
            "--resolution",
            str(SIZE),
            "--teacher_ae",
            str(world / "teacher_ae"),
            "--student_ae",
            str(world / "teacher_ae"),
            "--text",
            str(world / "text"),
            "--out_dir",
            str(tmp_path / "cache"),
        ]
    )
    with pytest.raises(
        ValueError, match=r"teacher latents \(4, 8, 8\).*student latents \(4, 8, 8\).*divide"
    ):
        align.main(
            [
                "--stage",
                "embed",
                "--base",
                str(world / "base"),
                "--cache",
                str(tmp_path / "cache"),
                "--out_dir",
                str(tmp_path / "out"),
                "--steps",
                "1",
            ]
        )


def test_lora_with_an_init_of_the_wrong_model_fails_before_training(world, tmp_path):
    wrong = r"takes latents of 4 channels.*\(student\) holds latents of shape \(8, 2, 2\)"
    with pytest.raises(ValueError, match=wrong):
        lora.main(
            lora.Config(
                init=str(world / "base"), cache=str(world / "cache"), out_dir=str(tmp_path), steps=1
            )
        )


def test_a_cache_whose_text_encoders_moved_fails_with_their_path(world, tmp_path):
    """A cache records where its AEs and text encoders live; moved since, the stage says so, not a model folder
    that lacks its text encoders."""
    shutil.copytree(world / "cache", tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    (tmp_path / "cache" / "meta.json").write_text(
        json.dumps({**meta, "text": str(tmp_path / "moved")})
    )
    with pytest.raises(
        FileNotFoundError, match=r"text encoders in .*moved; is one of them gone or moved"
    ):
        align.main(
            [
                "--stage",
                "embed",
                "--base",
                str(world / "base"),
                "--cache",
                str(tmp_path / "cache"),
                "--out_dir",
                str(tmp_path / "out"),
                "--steps",
                "0",
            ]
        )
    assert not (tmp_path / "out" / "model" / "transformer").exists()


def test_a_dtype_other_than_fp32_or_bf16_fails(world, tmp_path, capsys):
    """--dtype fp16 would otherwise run silently in fp32 (every dtype check is `== "bf16"`)."""
    with pytest.raises(SystemExit):
        align.main(
            [
                "--stage",
                "cache",
                "--data",
                "shapes",
                "--count",
                "2",
                "--resolution",
                str(SIZE),
                "--teacher_ae",
                str(world / "teacher_ae"),
                "--dtype",
                "fp16",
                "--out_dir",
                str(tmp_path),
            ]
        )
    # the DiT stages' flags take only their values (common.Dtype): argparse refuses the rest
    with pytest.raises(SystemExit):
        lora.parse_config(lora.Config, ["--dtype", "fp16"])
    with pytest.raises(SystemExit):
        align.main(["--stage", "head", "--dtype", "fp16"])
    assert (
        "argument --dtype: invalid choice: 'fp16' (choose from 'fp32', 'bf16')"
        in capsys.readouterr().err
    )
