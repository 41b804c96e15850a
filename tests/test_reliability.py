"""The training stages lose nothing and answer each bad input with one line: --resume past a truncated checkpoint
repeats the uninterrupted run, model folders stay loadable across saves, and every error a user can fix ends in
`error: <one line>` with exit status 2 (common.run_main), written before any run folder is.

Run: python -m pytest -q tests/test_reliability.py
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_lora_stage import args, losses, make_cache

import lora
import sample
from common import Dtype, load_ckpt, parse_config, run_main, save_ckpt
from models.loading import read_state_dict, save_pretrained, staged_folder
from models.pipeline import load_pipeline

from tiny_world import build_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def one_line(capsys, fn) -> str:
    """What run_main prints for `fn`: exactly one line on stderr, exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(fn)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_resume_skips_a_truncated_checkpoint_and_repeats_the_run(tmp_path, capsys):
    """A 2-step run saves ckpt 1 and 2; ckpt 2 is truncated; --resume names it, continues from ckpt 1, and step 2's
    loss and weights equal the uninterrupted run's."""
    cache, out = make_cache(tmp_path / "cache"), tmp_path / "out"
    run = args(cache, out, "--steps", "2", "--save_every", "1", "--rank", "4")
    lora.main(parse_config(lora.Config, run))
    full = losses(out)
    good = load_ckpt(out / "ckpt_0000002.pt")
    newest = out / "ckpt_0000002.pt"
    newest.write_bytes(
        newest.read_bytes()[: newest.stat().st_size // 2]
    )  # a partial copy, a full disk
    (out / "log.txt").unlink()
    capsys.readouterr()
    lora.main(parse_config(lora.Config, [*run, "--resume"]))
    log = (out / "log.txt").read_text()
    print(log)
    assert f"warning: {newest} is truncated or corrupt (" in log
    assert f"resumed from {out / 'ckpt_0000001.pt'} at step 1" in log
    assert sorted(losses(out)) == [2] and losses(out)[2] == full[2]
    again = load_ckpt(newest)
    assert all(torch.equal(good["model"][k], again["model"][k]) for k in good["model"])


def test_resume_with_only_unreadable_checkpoints_starts_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt_0000001.pt").write_bytes(b"")
    save_ckpt({"model": {}}, out / "ckpt_0000002.pt")  # loads, but is no training checkpoint
    from training import latest_checkpoint

    assert latest_checkpoint(out) == (None, None)


def test_save_pretrained_replaces_single_and_sharded_weights(tmp_path):
    """One file -> shards -> one file: each save leaves exactly its own files (the stale ones go last)."""
    sd = {f"w{i}": torch.full((256,), float(i)) for i in range(4)}
    for shard_bytes in (2**30, 1024, 2**30):
        save_pretrained(tmp_path, sd, {"a": 1}, max_shard_bytes=shard_bytes)
        files = sorted(p.name for p in tmp_path.glob("diffusion_pytorch_model*"))
        assert len(files) == (1 if shard_bytes > 1024 else 5), files  # 4 shards + index
        assert all(torch.equal(v, sd[k]) for k, v in read_state_dict(tmp_path).items())


def test_literal_fields_take_only_their_values(capsys):
    from dataclasses import dataclass

    @dataclass
    class C:
        dtype: Dtype = "fp32"

    assert parse_config(C, ["--dtype", "bf16"]).dtype == "bf16"
    with pytest.raises(SystemExit):
        parse_config(C, ["--dtype", "fp16"])
    assert "argument --dtype: invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--dtype fp16", "--device gpu", "--shift dynamic", "--loss l2"])
def test_every_enumerated_lora_flag_refuses_other_values(flag, capsys):
    with pytest.raises(SystemExit):
        parse_config(lora.Config, flag.split())
    assert "invalid choice" in capsys.readouterr().err


def test_missing_or_empty_cache_fails_before_the_run_folder_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    line = one_line(
        capsys, lambda: lora.main(parse_config(lora.Config, args(tmp_path / "none", out)))
    )
    assert f"{tmp_path / 'none'} is not a latent cache (no meta.json)" in line
    empty = make_cache(tmp_path / "empty", n=0)
    line = one_line(capsys, lambda: lora.main(parse_config(lora.Config, args(empty, out))))
    assert (
        line
        == f"error: the latent cache {empty} holds no rows; write it with align.py --stage cache"
    )
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = parse_config(lora.Config, args(make_cache(tmp_path / "c"), out, "--device", "cuda"))
    line = one_line(capsys, lambda: lora.main(cfg))
    why = "is built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
    assert line.startswith("error: --device cuda: torch ") and line.endswith(
        f"{why}; use --device cpu"
    )
    assert not out.exists()


def test_nan_loss_names_the_step_shard_and_rows(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache", nan=True)
    cfg = parse_config(lora.Config, args(cache, tmp_path / "out", "--steps", "2"))
    line = one_line(capsys, lambda: lora.main(cfg))
    assert line.startswith("error: loss is nan at step 1 (non-finite cached values in shard_0000")
    assert line.endswith("; last good checkpoint: None")


def test_ae15_nan_loss_is_one_line(tmp_path, monkeypatch, capsys):
    import ae15

    tiny = (
        "--model tiny-1.5 --size_px 32 --batch_size 2 --device cpu --sample_every 100 --log_every 1"
    )
    argv = [
        *tiny.split(),
        "--steps",
        "3",
        "--lr",
        "1e30",
        "--warmup",
        "1",
        "--out_dir",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", ["ae15.py", *argv])
    line = one_line(capsys, ae15.main)
    assert re.match(
        r"error: loss is (nan|inf) at step 2 \(the images are finite: the model diverged", line
    )
    assert "step 0000001/" in (tmp_path / "log.txt").read_text()  # the step before it was finite
    assert not list(tmp_path.glob("ckpt_*.pt"))


def test_out_of_memory_names_the_batch_size_and_the_fixes(tmp_path, capsys):
    parse_config(lora.Config, args(tmp_path, tmp_path, "--batch_size", "64"))
    line = one_line(capsys, lambda: torch.empty(10**15))  # the CPU allocator's failure, for real
    assert line.startswith("error: out of memory at --batch_size 64 (")
    assert "lower --batch_size, add --grad_checkpointing" in line and "python plan.py" in line

    def cuda_oom():  # CUDA's message, as torch 2.x words it
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity"
        )

    line = one_line(capsys, cuda_oom)
    assert line.startswith(
        "error: out of memory at --batch_size 64 (Tried to allocate 2.00 GiB): lower"
    )

    # sample.py's flag is --batch, and its fixes are its own
    parse_config(sample.Config, ["--prompt", "x", "--batch", "4"])
    line = one_line(capsys, cuda_oom)
    assert line.endswith(
        "at --batch 4 (Tried to allocate 2.00 GiB): lower --batch, --tile_px or the size"
    )


def test_corrupt_model_files_are_named(world, tmp_path, capsys):
    """Truncated weights, invalid JSON, a link to a moved AE: each named, in one line."""
    cache = make_cache(tmp_path / "cache", C=16, h=4, w=4, latent="student")
    model = tmp_path / "model"
    shutil.copytree(world / "base", model)  # the linked AE and text encoders copied
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cfg = lora.Config(init=str(model), cache=str(cache), out_dir=str(tmp_path / "o"), steps=1)
    line = one_line(capsys, lambda: lora.main(cfg))
    assert line.startswith(
        f"error: {weights} is truncated or corrupt (Error while deserializing header"
    )

    (model / "transformer" / "config.json").write_text('{\n  "in_channels": 16,\n  oops\n}')
    line = one_line(capsys, lambda: lora.main(cfg))
    assert line.startswith(
        f"error: {model / 'transformer' / 'config.json'}: invalid JSON at line 3, column 3"
    )

    linked = tmp_path / "linked"
    shutil.copytree(world / "base", linked, symlinks=True)  # relative links, now pointing nowhere
    line = one_line(capsys, lambda: load_pipeline(linked))  # what sample.py loads: all parts
    assert (
        line
        == f"error: {linked / 'vae'} is a symbolic link to ../teacher_ae, which does not exist (moved or deleted?)"
    )
    assert (
        load_pipeline(linked, parts=("transformer",)).transformer is not None
    )  # training needs no AE
    shutil.rmtree(linked / "transformer")
    (linked / "transformer").symlink_to(tmp_path / "moved")
    cfg = lora.Config(init=str(linked), cache=str(cache), out_dir=str(tmp_path / "o"), steps=1)
    line = one_line(capsys, lambda: lora.main(cfg))
    assert line.startswith(
        f"error: {linked / 'transformer'} is a symbolic link to {tmp_path / 'moved'}, which"
    )


def test_corrupt_checkpoint_and_noise_files_are_named(tmp_path, capsys):
    bad = tmp_path / "ckpt_0000010.pt"
    bad.write_bytes(b"not a checkpoint" * 10)
    cfg = lora.Config(merge=str(bad), out_dir=str(tmp_path / "m"))
    line = one_line(capsys, lambda: lora.main(cfg))
    assert (
        line
        == f"error: {bad} is corrupt or not a weights-only torch checkpoint (Unsupported operand 110)"
    )
    truncated = tmp_path / "ckpt_0000011.pt"
    save_ckpt({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    cfg = lora.Config(merge=str(truncated), out_dir=str(tmp_path / "m"))
    line = one_line(capsys, lambda: lora.main(cfg))
    assert line.startswith(
        f"error: {truncated} is truncated or corrupt (PytorchStreamReader failed"
    )
    noise = tmp_path / "noise.safetensors"  # what sample.py --noise reads with common.load_ckpt
    noise.write_bytes(b"\x00" * 3)
    line = one_line(capsys, lambda: load_ckpt(noise))
    assert (
        line
        == f"error: {noise} is truncated or corrupt (Error while deserializing header: header too small)"
    )


def test_the_script_prints_one_line_and_the_traceback_on_request(tmp_path):
    """The wiring: `python lora.py` exits 2 with one line and leaves no run folder; DCGEN_TRACEBACK=1 shows the
    traceback."""
    argv = [sys.executable, "lora.py", *args(tmp_path / "none", tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'none'} is not a latent cache") and not r.stdout
    assert not (tmp_path / "out").exists()
    r = subprocess.run(
        argv, cwd=ROOT, env={**env, "DCGEN_TRACEBACK": "1"}, capture_output=True, text=True
    )
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr


def test_a_model_folder_appears_whole_or_not_at_all(tmp_path):
    """staged_folder: the new folder replaces a model folder only once complete; a crash while writing leaves the
    old one and no temporary folder; a run's folder (checkpoints) is never replaced."""
    folder = tmp_path / "model"
    with staged_folder(folder) as tmp:
        save_pretrained(tmp, {"w": torch.zeros(3)}, {"v": 1})
    with pytest.raises(KeyboardInterrupt), staged_folder(folder) as tmp:
        save_pretrained(tmp, {"w": torch.ones(3)}, {"v": 2})
        raise KeyboardInterrupt  # Ctrl-C before the folder is complete
    assert torch.equal(read_state_dict(folder)["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with staged_folder(folder) as tmp:
        save_pretrained(tmp, {"w": torch.ones(3)}, {"v": 2}, name="other")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "other.safetensors"]
    assert folder.stat().st_mode & 0o777 == 0o777 & ~_umask()
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt_0000001.pt").write_bytes(b"")
    with pytest.raises(FileExistsError, match="is not a model folder"), staged_folder(run):
        pass
    assert (run / "ckpt_0000001.pt").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
