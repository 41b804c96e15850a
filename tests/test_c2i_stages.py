"""The class-conditional path through the project's stages, 2 steps each on tiny random models: a cache of
labels (align.py --stage cache --data classes), a DiT and a USiT trained from scratch with augmented diffusion
training (lora.py --preset ... --rank 0 --prefixes), merged to model folders that sample.py reads with --class;
DC-Gen's embed and head alignment moving a DiT from the f2 teacher latent to the f8 student latent.

Run: python -m pytest -q tests/test_c2i_stages.py
"""

import json

import pytest
import torch
from PIL import Image

import align
import lora
import sample
from data import LatentCache
from models.c2i import build_c2i, class_ids
from models.pipeline import load_pipeline
from tests.tiny_world import build_world

SIZE = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = build_world(tmp_path_factory.mktemp("c2i"))
    align.main(
        [
            "--stage",
            "cache",
            "--data",
            "classes",
            "--resolution",
            str(SIZE),
            "--count",
            "8",
            "--teacher_ae",
            str(root / "teacher_ae"),
            "--student_ae",
            str(root / "student_ae"),
            "--batch_size",
            "4",
            "--shard_size",
            "4",
            "--device",
            "cpu",
            "--out_dir",
            str(root / "cache"),
        ]
    )
    return root


def run_lora(root, name, *flags):
    common = [
        "--rank",
        "0",
        "--steps",
        "2",
        "--batch_size",
        "4",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--sample_every",
        "2",
        "--sample_count",
        "2",
        "--sample_steps",
        "2",
        "--save_every",
        "2",
    ]
    lora.main(lora.parse_config(lora.Config, [*common, *flags, "--out_dir", str(root / name)]))
    lora.main(
        lora.parse_config(
            lora.Config,
            [
                "--merge",
                str(root / name / "ckpt_0000002.pt"),
                "--out_dir",
                str(root / name / "model"),
            ],
        )
    )
    return root / name / "model"


def test_cache_holds_labels(world):
    meta = json.loads((world / "cache" / "meta.json").read_text())
    assert meta["shapes"]["label"] == [] and meta["text"] == "" and len(meta["id2label"]) == 24
    cache = LatentCache(world / "cache")
    assert cache.null["label"].tolist() == [24]
    assert cache.get([0, 1], ["label"])["label"].dtype == torch.int64


@pytest.mark.parametrize("preset", ["dit-tiny-v", "usit-tiny"])
def test_train_from_scratch_with_prefixes_and_sample(world, preset, tmp_path):
    flags = [
        "--preset",
        preset,
        "--cache",
        str(world / "cache"),
        "--latent",
        "student",
        "--prefixes",
        "4",
        "8",
        "--num_prefixes",
        "2",
    ]
    folder = run_lora(world, preset, *flags)
    pipe = load_pipeline(folder)
    assert pipe.text is None and pipe.id2label["0"] == "red circle"
    assert class_ids(["red circle", "5"], pipe.id2label) == [0, 5]
    assert (world / preset / "samples" / "0000002.png").is_file()
    out = sample.main(
        [
            "--model",
            str(folder),
            "--class",
            "red circle",
            "3",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "c.png"),
            "--device",
            "cpu",
        ]
    )
    assert out and all(p.is_file() for p in out)
    flags = ["--model", str(folder), "--class", "3", "--solver", "dopri5", "--device", "cpu"]
    ode = sample.main([*flags, "--out", str(tmp_path / "d.png")])
    assert Image.open(ode[0]).text["sampler"] == "flow dopri5"


def test_learned_sigma_dit_trains_with_dits_loss_and_samples_ddpm(world, tmp_path):
    """DiT's ε/Σ objective end to end: its loss, DDIM previews and a validation loss of that
    objective (not the flow one, whose velocity has half the channels), DDPM sampling."""
    val = ["--val_cache", str(world / "cache"), "--val_every", "1"]
    cache = ["--cache", str(world / "cache"), "--latent", "teacher"]
    folder = run_lora(world, "dit-eps", "--preset", "dit-tiny", *cache, *val)
    log = (world / "dit-eps" / "log.txt").read_text()
    assert "loss gaussian" in log and (world / "dit-eps" / "samples" / "0000002.png").is_file()
    vals = [float(ln.split("val_loss ")[1]) for ln in log.splitlines() if "val_loss" in ln]
    # ε MSE ~1 plus the VLB term, in bits per dim, for an untrained model
    assert len(vals) == 2 and all(0.5 < v < 1e3 for v in vals)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler" and sched["variance_type"] == "learned_range"
    out = sample.main(
        [
            "--model",
            str(folder),
            "--class",
            "3",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "e.png"),
            "--device",
            "cpu",
        ]
    )
    assert out[0].is_file()
    with pytest.raises(ValueError, match="--solver dopri5 solves a flow model's ODE"):
        sample.main(
            ["--model", str(folder), "--class", "3", "--solver", "dopri5", "--device", "cpu"]
        )


def run_align(world, base, name: str, *head_flags) -> None:
    """DC-Gen stages 1 and 2 on the world's cache, 2 steps each: world/{name}-embed, -head."""
    cache = ["--cache", str(world / "cache")]
    fast = ["--steps", "2", "--batch_size", "4", "--device", "cpu"]
    embed = ["--stage", "embed", "--base", str(base), *cache, "--patch_size", "1", *fast]
    align.main([*embed, "--out_dir", str(world / f"{name}-embed")])
    head = ["--stage", "head", "--init", str(world / f"{name}-embed" / "model"), *cache, *fast]
    align.main([*head, "--warmup", "1", *head_flags, "--out_dir", str(world / f"{name}-head")])


def test_dcgen_alignment_on_dit(world):
    cache = ["--cache", str(world / "cache")]
    base = run_lora(world, "dit-base", "--preset", "dit-tiny-v", *cache, "--latent", "teacher")
    run_align(world, base, "v", "--sample_every", "0")
    assert "loss of embeddings + positions" in (world / "v-embed" / "log.txt").read_text()
    student = load_pipeline(world / "v-head" / "model").transformer
    teacher = load_pipeline(base).transformer
    assert student.params.patch_size == 1 and student.params.in_channels == 8
    # the backbone is the base's; the embedder and head are new
    a, b = student.state_dict(), teacher.state_dict()
    assert torch.equal(
        a["transformer_blocks.0.attn1.to_q.weight"], b["transformer_blocks.0.attn1.to_q.weight"]
    )
    assert a["pos_embed.proj.weight"].shape != b["pos_embed.proj.weight"].shape


@pytest.mark.parametrize(
    "grid", [8, 4]
)  # the model's own grid, and one it stretches its positions to
def test_embed_map_with_positions_is_what_dits_blocks_see(grid):
    """The embed stage's DiT target: the patch embedding plus the fixed positions, as the blocks get
    it (official dc_adapt compares these sums), not the projection alone."""
    torch.manual_seed(0)
    model = build_c2i("dit-tiny")
    p, C = model.params.patch_size, model.params.in_channels
    z = torch.randn(2, C, grid * p, grid * p)
    with torch.no_grad():
        tokens = model.pos_embed(z, False)  # (B, h·w, D): what the first block receives
        e = align.embed_map(model.pos_embed.proj, z, p, model.pos_embed.base)  # (B, D, h, w)
        bare = align.embed_map(model.pos_embed.proj, z, p)
    assert torch.allclose(e.flatten(2).transpose(1, 2), tokens, atol=1e-6)
    assert not torch.allclose(bare.flatten(2).transpose(1, 2), tokens, atol=1e-2)


def test_head_stage_on_a_learned_sigma_dit_uses_dits_loss(world):
    """DC-Gen on a released-style DiT (ε and Σ): the head stage trains with DiT's own loss and
    previews with DDIM; the flow loss would not even fit its 2C output channels."""
    cache = ["--cache", str(world / "cache")]
    base = run_lora(world, "eps-base", "--preset", "dit-tiny", *cache, "--latent", "teacher")
    run_align(world, base, "eps", "--sample_every", "2")
    assert "loss gaussian" in (world / "eps-head" / "log.txt").read_text()
    assert (world / "eps-head" / "samples" / "0000002.png").is_file()
    student = load_pipeline(world / "eps-head" / "model").transformer
    assert student.params.learn_sigma and student.params.in_channels == 8
