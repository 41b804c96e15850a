"""sample.py: the same image as diffusers' FluxPipeline from the same noise; PNG metadata; bad input.

Run: python -m pytest -q tests/test_sample.py
"""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

import sample
from common import save_ckpt
from models.flux import PRESETS, Flux
from models.pipeline import write_pipeline
from toy.shapes import parse_caption

from tiny_text import build_flux_text
from tiny_world import build_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def test_same_image_as_diffusers_flux_pipeline(world, tmp_path):
    prompts, H, W, steps = (
        ["a red circle above a blue square on a white background", "a green triangle"],
        16,
        24,
        4,
    )
    # tiny VAE: f2, 4 channels
    noise = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(5))
    save_ckpt({"noise": noise}, tmp_path / "noise.safetensors")
    argv = [
        "--model",
        str(world / "base"),
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--height",
        str(H),
        "--width",
        str(W),
        "--steps",
        str(steps),
        "--guidance",
        "3.5",
        "--noise",
        str(tmp_path / "noise.safetensors"),
    ]
    paths = sample.main([*argv, "--out", str(tmp_path / "ours.png")])
    # (2, H, W, 3) in 0..255
    ours = np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in paths])
    text = world / "text"
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=AutoencoderKL.from_pretrained(world / "teacher_ae"),
        text_encoder=CLIPTextModel.from_pretrained(text / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(text / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(text / "text_encoder_2"),
        tokenizer_2=AutoTokenizer.from_pretrained(text / "tokenizer_2"),
        transformer=FluxTransformer2DModel.from_pretrained(world / "base" / "transformer"),
    )
    latents = FluxPipeline._pack_latents(noise, 2, 4, H // 2, W // 2)  # the same noise, packed 2×2
    with torch.no_grad():
        ref = (
            pipe(
                prompts,
                height=H,
                width=W,
                num_inference_steps=steps,
                guidance_scale=3.5,
                latents=latents,
                max_sequence_length=8,
                output_type="np",
            ).images
            * 255
        )  # (2, H, W, 3)
    assert ours.shape == ref.shape and ref.std() > 10  # a non-trivial image
    assert np.abs(ours - ref).mean() <= 1.0  # <= 1/255 mean abs


def test_png_metadata_and_grid(world, tmp_path):
    out = tmp_path / "grid.png"
    sample.main(
        [
            "--model",
            str(world / "base"),
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--size",
            "16",
            "--steps",
            "2",
            "--grid",
            "--seed",
            "7",
            "--out",
            str(out),
        ]
    )
    im = Image.open(out)
    assert im.size == (32, 16)
    assert im.text["prompt"] == "a red circle | a blue square" and im.text["seed"] == "7"
    assert im.text["steps"] == "2" and im.text["guidance"] == "3.5" and im.text["size"] == "16x16"
    assert im.text["model"] == str(world / "base") and im.text["shift"].startswith("flux")


def test_dcgen_shift_counts_the_values_of_packed_tokens(world, tmp_path):
    """--shift dcgen: r = sqrt(L·C·p²/4096) on the packed latent, as the official DC-Gen pipeline computes it. The
    tiny base at 16 px: an 8x8 latent of 4 channels in 2x2 patches, 16 tokens of 16 values: r = sqrt(256/4096)."""
    paths = sample.main(
        [
            "--model",
            str(world / "base"),
            "--prompt",
            "a red circle",
            "--size",
            "16",
            "--steps",
            "1",
            "--shift",
            "dcgen",
            "--out",
            str(tmp_path / "d.png"),
        ]
    )
    assert Image.open(paths[0]).text["shift"] == "dcgen r=0.250"


def test_a_diffusers_scheduler_config_with_a_fixed_shift_is_honoured(world, tmp_path):
    """A folder diffusers wrote (no "_shift" of ours) whose FlowMatchEuler config turns dynamic shifting off is
    sampled with its fixed `shift`, as FluxPipeline would."""
    shutil.copytree(world / "base", tmp_path / "m")
    config = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    sched = {k: v for k, v in json.loads(config.read_text()).items() if k != "_shift"}
    config.write_text(json.dumps(sched | {"use_dynamic_shifting": False, "shift": 2.5}))
    paths = sample.main(
        [
            "--model",
            str(tmp_path / "m"),
            "--prompt",
            "a red circle",
            "--size",
            "16",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "s.png"),
        ]
    )
    assert Image.open(paths[0]).text["shift"] == "constant r=2.500"


def test_cfg_model_uses_true_cfg(world, tmp_path):
    paths = sample.main(
        [
            "--model",
            str(world / "base_cfg"),
            "--prompt",
            "a red circle",
            "--size",
            "16",
            "--steps",
            "2",
            "--cfg",
            "3.0",
            "--out",
            str(tmp_path / "cfg.png"),
        ]
    )
    assert (
        Image.open(paths[0]).text["cfg"] == "3.0"
        and Image.open(paths[0]).text["guidance"] == "none"
    )


def test_true_cfg_on_a_guidance_model_batches_like_one_image_at_a_time(world, tmp_path):
    """--cfg on a guidance-distilled model (as diffusers' true_cfg_scale): two passes per step, both at guidance w;
    a batch of 2 gives the images of two runs of 1."""
    common = [
        "--model",
        str(world / "base"),
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue square",
        "--size",
        "16",
        "--steps",
        "2",
        "--cfg",
        "2.0",
        "--seed",
        "3",
    ]
    two = sample.main([*common, "--batch", "2", "--out", str(tmp_path / "two.png")])
    one = sample.main([*common, "--batch", "1", "--out", str(tmp_path / "one.png")])
    pixels = [[np.asarray(Image.open(p), dtype=np.int16) for p in run] for run in (two, one)]
    assert len(pixels[0]) == 2 and all(np.abs(a - b).max() <= 1 for a, b in zip(*pixels))
    assert Image.open(two[0]).text["cfg"] == "2.0" and Image.open(two[0]).text["guidance"] == "3.5"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--size", "18"], "multiples of 4 px.*nearest valid height 18: 16 or 20"),
        (["--size", "-16"], "nearest valid height -16: 4, width -16: 4$"),
        (["--steps", "0"], "--steps 0: give a positive number"),
        (["--batch", "0"], "--batch 0: give a positive number"),
        (["--tile_px", "6"], "--tile_px 6: give 0 .* at least 8 px"),
        (["--prompts", "/nonexistent.txt"], "no such file"),
        ([], "no prompts"),
        (["--noise", "NOISE"], r"expected a tensor `noise` of shape \(1, 4, 8, 8\)"),
        (["--noise", "GARBAGE"], r"garbage.bin is (truncated or )?corrupt"),
        (
            ["--prompt", "a", "red", "circle"],
            '--prompt takes one prompt, got 3 words: quote it, --prompt "a red circle"',
        ),
        (
            ["--dtype", "fp8"],
            r"--dtype: invalid choice: 'fp8' \(choose from 'auto', 'fp32', 'bf16', 'fp16'\)$",
        ),
        (
            ["--device", "tpu"],
            r"--device: invalid choice: 'tpu' \(choose from 'auto', 'cuda', 'cpu'\)$",
        ),
        (
            ["--shift", "linear"],
            r"--shift: invalid choice: 'linear' \(choose from '', 'flux', 'dcgen', ",
        ),
        (
            ["--device", "cuda"],
            "--device cuda: torch .* is built without CUDA; use --device cpu$",
        ),
        (
            ["--size", "16y"],
            "--size '16y': give one number of px \\(4096\\) or WxH \\(4608x3328\\)$",
        ),
        (["--png_level", "10"], "--png_level 10: give 0 .* to 9"),
        (["--out", "OUT/x.jpg"], "sample.py writes PNG; give a name ending in .png, e.g. .*x.png$"),
        (["--out", "OUT/x"], "sample.py writes PNG; give a name ending in .png"),
        (["--out", "OUT"], "is a directory; give a file name, e.g. .*sample.png$"),
        (["--out", "GARBAGE/x.png"], "cannot write in .*garbage.bin .*; choose another --out$"),
    ],
)
def test_bad_input_is_one_clear_line(world, tmp_path, argv, message):
    """Each bad input: exit status 2, one line `error: ...` naming the fix, before any sampling."""
    if "cuda" in argv and torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: the message differs")
    save_ckpt({"noise": torch.zeros(1, 4, 4, 4)}, tmp_path / "noise.safetensors")
    (tmp_path / "garbage.bin").write_bytes(b"\x00not a tensor file" * 10)
    names = {"NOISE": "noise.safetensors", "GARBAGE": "garbage.bin", "OUT": ""}
    for key, name in names.items():
        argv = [a.replace(key, str(tmp_path / name).rstrip("/")) for a in argv]
    prompt = [] if not argv or argv[0] == "--prompts" else ["--prompt", "x"]
    full = ["--model", str(world / "base"), *prompt, "--size", "16", "--steps", "1"]
    r = subprocess.run(
        [sys.executable, "sample.py", *full, "--out", str(tmp_path / "x.png"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr and "step 1/1" not in r.stdout
    # argparse's own line for a flag outside its choices: "sample.py: error: argument --dtype: ..."
    assert re.match(r"(sample.py: )?error: ", last) and re.search(message, last), r.stderr
    assert "Loading weights" not in r.stderr  # no transformers progress bars


def test_fp16_size_wxh_and_recipe_in_metadata(world, tmp_path):
    """--dtype fp16 runs in fp16 (said in the metadata), --size WxH draws W wide and H high, and the
    metadata holds what remakes the image: dtype, tile and the code's git commit."""
    (path,) = sample.main(
        ["--model", str(world / "base"), "--prompt", "a red circle", "--size", "24x16"]
        + ["--steps", "1", "--dtype", "fp16", "--out", str(tmp_path / "h.png")]
    )
    im = Image.open(path)
    assert im.size == (24, 16) and im.text["size"] == "24x16" and im.text["dtype"] == "float16"
    assert im.text["tile_px"] == "1024" and re.fullmatch(
        r"[0-9a-f]{40}(\+dirty)?|unknown", im.text["code"]
    )
    assert np.asarray(im).std() > 0  # not NaN-black


def test_far_from_the_trained_size_warns_with_the_models_sizes(capsys):
    sample.warn_far_size(Path("m"), 1024, 1024, trained=4096, cell=256)
    err = capsys.readouterr().err
    assert "trained at 4096x4096 px (256 tokens); 1024x1024 px is 16 tokens, far outside" in err
    assert "4608x3328, 5376x3072, 4608x3584" in err
    for H, W in ((4096, 4096), (3328, 4608), (5376, 3072), (2048, 2048)):  # the released 4K sizes
        sample.warn_far_size(Path("m"), H, W, trained=4096, cell=256)
    assert capsys.readouterr().err == ""
    assert sample.trained_px(ROOT / "zoo" / "dcgen-4k", 64) == 4096
    assert sample.trained_px(ROOT / "zoo" / "krea", 8) == 256


def test_batch_is_fitted_to_the_memory(monkeypatch, capsys):
    """A batch whose denoising would not fit is lowered, said with the numbers; a decode that does
    not fit is refused before any work, naming --tile_px."""
    ae = SimpleNamespace(params=SimpleNamespace(decoder_block_out_channels=(8, 16)), tile_px=64)
    model = SimpleNamespace(params=SimpleNamespace(hidden_size=64))
    cfg = sample.Config(batch=8)
    decode = sample.decode_bytes(ae, 128, 128, 4)
    per_image = 16 * (16 + 512) * 64 * 4
    monkeypatch.setattr(sample, "available_bytes", lambda device: decode + 3 * per_image)
    assert sample.fit_batch(cfg, model, ae, 16, (128, 128), 8, 4, torch.device("cpu")) == 3
    assert "--batch 8 needs about" in capsys.readouterr().out
    monkeypatch.setattr(sample, "available_bytes", lambda device: decode // 2)
    with pytest.raises(ValueError, match=r"decoding 128x128 px needs about .* lower --tile_px"):
        sample.fit_batch(cfg, model, ae, 16, (128, 128), 8, 4, torch.device("cpu"))


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample.main(["--model", str(tmp_path / "nope"), "--prompt", "x"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "transformer").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"missing \['transformer/config.json', 'vae/config.json'"
    ):
        sample.main(["--model", str(tmp_path / "half"), "--prompt", "x"])


def test_toy_zoo_is_the_default_and_small(tmp_path, capsys):
    """The committed zoo: every model folder loads, the whole of it stays under 40 MB, and sample.py without --model
    or --size draws a 4096 px image from zoo/dcgen-4k, a 4096 px model (its shapes are judged by runs/toy_eval.py, not
    here: 2 steps make blobs). A caption without its background gets a black one, said aloud (the zoo's captions
    always name one; tests/test_toy_text.py tests the rest of toy_prompts)."""
    zoo = ROOT / "zoo"
    size = sum(f.stat().st_size for f in zoo.rglob("*") if f.is_file() and not f.is_symlink())
    assert size < 40 * 2**20, f"zoo/ is {size / 2**20:.1f} MiB, over the 40 MB budget"
    for name in ("base", "krea", "dcgen-1k", "dcgen-4k"):
        assert (zoo / name / "model_index.json").is_file() and (
            zoo / name / "vae" / "config.json"
        ).is_file(), name
    (path,) = sample.main(
        [
            "--prompt",
            "a red circle above a blue square",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "zoo.png"),
        ]
    )
    img = Image.open(path)
    assert img.size == (4096, 4096) and "zoo/dcgen-4k" in img.text["model"]
    # what was sampled
    assert img.text["prompt"] == "a red circle above a blue square on a black background"
    assert np.asarray(img).std() > 5  # not a flat canvas
    assert (
        "sampling 'a red circle above a blue square on a black background'"
        in capsys.readouterr().out
    )


def test_prompt_conventions_come_from_the_model_folder_not_its_path(world, tmp_path, capsys):
    """The toy zoo copied elsewhere still completes the background (its tokenizers say "toy_captions"),
    and a model whose text encoder is a real one is never rewritten, even in a folder named zoo."""
    shutil.copytree(ROOT / "zoo", tmp_path / "elsewhere", symlinks=True)
    prompt = "a red circle above a blue square"
    common = ["--prompt", prompt, "--size", "32", "--steps", "1"]
    (path,) = sample.main(
        ["--model", str(tmp_path / "elsewhere" / "krea"), *common, "--out", str(tmp_path / "a.png")]
    )
    assert Image.open(path).text["prompt"] == f"{prompt} on a black background"
    assert f"sampling '{prompt} on a black background'" in capsys.readouterr().out
    # real tokenizers (CLIP BPE, T5 Unigram), T5 width 24
    text = build_flux_text(tmp_path / "zoo" / "text")
    model = Flux(dataclasses.replace(PRESETS["tiny"], context_in_dim=24, vec_in_dim=32))
    write_pipeline(tmp_path / "zoo" / "real", model, world / "teacher_ae", text, "flux")
    (path,) = sample.main(
        ["--model", str(tmp_path / "zoo" / "real"), *common, "--out", str(tmp_path / "b.png")]
    )
    assert Image.open(path).text["prompt"] == prompt and "note:" not in capsys.readouterr().out


def test_toy_eval_word_order_counts():
    """runs/toy_eval.py --swap: the swapped wording names the same scene the other way round, and a model that put
    the colours where the noise suggested (relation right under exactly one wording) scores 0 'both'."""
    sys.path.insert(0, str(ROOT / "runs"))
    import toy_eval

    spec = parse_caption("a red circle above a blue square on a white background")
    assert (
        toy_eval.swapped(spec).caption == "a blue square above a red circle on a white background"
    )
    c = lambda rel, a=True: {"a_color": a, "b_color": True, "relation": rel}  # noqa: E731
    r = {"per_image": [c(True), c(True), c(False), c(True, a=False)]}
    r_swap = {"per_image": [c(False), c(True), c(False), c(True)]}
    assert toy_eval.word_order(r, r_swap) == {"pairs": 3, "both": 1, "one": 1, "neither": 1}
