"""common.py: config flags, atomic checkpoints, diffusers-folder writing, PNG metadata, torchrun detection, the
noise-level shift of a latent's shape, and DC-AE 1.5's channel-prefix draw.

Run: python -m pytest -q tests/test_common.py
"""

import dataclasses
import pickle
import socket

import pytest
import torch
from PIL import Image

import common
from common import init_dist, load_ckpt, parse_config, save_ckpt, save_image_grid, save_pretrained
from models.loading import read_state_dict


@dataclasses.dataclass
class Cfg:
    lr: float = 1e-4  # peak learning rate (cosine decay to 10%)
    steps: int = 10  # optimizer steps
    name: str = "run"  # run name
    ema: bool = True  # keep an EMA of the weights
    init: str | None = None  # checkpoint to start from
    sizes: tuple[int, ...] = (256, 512)  # training resolutions in px


def test_parse_config_types_bools_and_defaults():
    cfg = parse_config(
        Cfg, ["--lr", "3e-4", "--no-ema", "--sizes", "1024", "2048", "--init", "a.pt"]
    )
    assert cfg == Cfg(lr=3e-4, steps=10, name="run", ema=False, init="a.pt", sizes=(1024, 2048))
    assert parse_config(Cfg, []) == Cfg()
    # a repeated flag accumulates
    assert parse_config(Cfg, ["--sizes", "1", "2", "--sizes", "3"]).sizes == (1, 2, 3)
    assert parse_config(Cfg, ["--sizes"]).sizes == ()  # given, a list flag replaces its default
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--lr", "fast"])  # a value of the wrong type
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--learning_rate", "1"])  # a flag that is not a field


def test_help_shows_the_field_comments(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps help to the terminal's width
    # a % in a comment is text, not a format directive
    assert "peak learning rate (cosine decay to 10%)" in out
    assert "--ema, --no-ema" in out and "training resolutions in px" in out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"ckpt{suffix}"
    good = {"w": torch.arange(6.0)}
    save_ckpt(good, path)

    def crash(*args, **kwargs):  # the process dies mid-write, after part of the file is out
        f = args[1] if suffix == ".pt" else None
        if f is not None:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    monkeypatch.setattr(common.safetensors.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_ckpt({"w": torch.zeros(6)}, path)
    assert torch.equal(load_ckpt(path)["w"], good["w"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, on the raw pickle below
def test_load_ckpt_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    # a pickle that would construct an arbitrary object
    path.write_bytes(pickle.dumps({"w": Cfg()}))
    with pytest.raises(
        ValueError, match="evil.pt is corrupt or not a weights-only torch checkpoint"
    ):
        load_ckpt(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_ckpt(tmp_path / "missing.pt")


def test_save_pretrained_shards_and_reads_back(tmp_path):
    sd = {f"layer{i}.weight": torch.randn(64, 64) for i in range(5)}  # 16 KiB each
    save_pretrained(tmp_path, sd, {"_class_name": "X"}, max_shard_bytes=40_000)
    assert len(list(tmp_path.glob("diffusion_pytorch_model-0000*-of-00003.safetensors"))) == 3
    back = read_state_dict(tmp_path)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # re-saving unsharded removes the stale shards
    save_pretrained(tmp_path, sd, {"_class_name": "X"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]


def test_image_grid_layout_and_metadata(tmp_path):
    images = torch.stack([torch.full((3, 8, 10), v) for v in (-1.0, 0.0, 1.0)])
    save_image_grid(images, tmp_path / "g.png", nrow=2, text={"prompt": "a red circle", "seed": 7})
    im = Image.open(tmp_path / "g.png")
    assert im.size == (20, 16) and im.text == {"prompt": "a red circle", "seed": "7"}
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((10, 0)) == (128, 128, 128)
    # empty cell stays black
    assert im.getpixel((0, 8)) == (255, 255, 255) and im.getpixel((10, 8)) == (0, 0, 0)


def test_init_dist_single_process_and_torchrun(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    d = init_dist("cpu")
    assert (d.rank, d.world_size, d.master, str(d.device)) == (0, 1, True, "cpu")
    assert not torch.distributed.is_initialized()
    with socket.socket() as s:  # a free port for a one-process gloo group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    d = init_dist("cpu")
    try:
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    finally:
        common.cleanup_dist()
    assert not torch.distributed.is_initialized()


def test_lr_warmup_stable_decay():
    lr = [common.lr_at(s, 1.0, warmup=4, steps=20, decay=8) for s in range(20)]
    # warm-up, then stable until step 12
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0] and lr[4:12] == [1.0] * 8
    # linear to 0: the last step is > 0
    assert lr[12:] == [(20 - s) / 8 for s in range(12, 20)] and lr[-1] == 1 / 8
    # a run whose decay has not begun is the constant-lr run: resuming it with --steps/--decay
    # extends it exactly
    assert [common.lr_at(s, 1.0, 4) for s in range(12)] == lr[:12]


def test_shift_for_counts_tokens_and_values_per_patch():
    for kind in ("flux", "dcgen", "constant"):
        for C, h, w, p in ((32, 32, 32, 1), (16, 128, 64, 2), (128, 64, 64, 1), (4, 64, 32, 2)):
            # the formula of the call sites
            old = common.shift_factor(kind, (h // p) * (w // p), C * p * p, 2.5)
            assert common.shift_for(kind, (C, h, w), p, 2.5) == old
    # a swap of tokens and values shows: f32c32 at 1024² in 1x1 patches is 1024 tokens of 32 values,
    # r = sqrt(8)
    assert common.shift_for("dcgen", (32, 32, 32), 1) == pytest.approx(8**0.5)
    assert common.shift_for("flux", (32, 32, 32), 1) == pytest.approx(
        common.shift_factor("flux", 1024, 32)
    )
    assert common.shift_for("flux", (32, 32, 32), 1) != pytest.approx(
        common.shift_factor("flux", 32, 1024)
    )
    # p = 2 on an f8c16 FLUX latent of 1024²: (128/2)² = 4096 tokens of 64 values
    assert common.shift_for("flux", (16, 128, 128), 2) == pytest.approx(
        common.shift_factor("flux", 4096, 64)
    )


def test_draw_prefixes_edge_cases():
    g = lambda step: common.step_generator(0, step)
    draws = [common.draw_prefixes(g(s), [8, 16], 3, True, 32) for s in range(200)]
    # always_max, K >= 2: C first, K - 1 drawn
    assert all(d[0] == 32 and len(d) == 3 for d in draws)
    # C is a candidate even when not given (official list)
    assert {c for d in draws for c in d[1:]} == {8, 16, 32}
    with_c = [common.draw_prefixes(g(s), [8, 16, 32], 3, True, 32) for s in range(200)]
    assert with_c == draws  # candidates including C or not: the same pool, the same draws
    free = [common.draw_prefixes(g(s), [8, 16], 2, False, 32) for s in range(200)]
    # no full latent forced
    assert {c for d in free for c in d} == {8, 16, 32} and any(32 not in d for d in free)
    # K = 1: one draw, always_max or not
    one = [common.draw_prefixes(g(s), [8, 16], 1, True, 32) for s in range(200)]
    assert one == [common.draw_prefixes(g(s), [8, 16], 1, False, 32) for s in range(200)]
    assert all(len(d) == 1 for d in one) and {d[0] for d in one} == {8, 16, 32}
    # the generator alone decides
    assert common.draw_prefixes(g(7), [8, 16], 3, True, 32) == draws[7]
    assert draws != [
        common.draw_prefixes(common.step_generator(1, s), [8, 16], 3, True, 32) for s in range(200)
    ]
    with pytest.raises(ValueError, match="must lie in 1..32"):
        common.draw_prefixes(g(0), [8, 64], 2, True, 32)
    with pytest.raises(ValueError, match="K=0"):
        common.draw_prefixes(g(0), [8], 0, True, 32)
