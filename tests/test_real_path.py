"""What the real-size path (FLUX.1-Krea 12B on N GPUs) relies on, checked at tiny size: each stage trains and writes
the base folder's own shift, folders keep the run's dtype, the cache encodes in one pass with T5 at 256 tokens, the
embed stage assembles the student without materialising a second model, and the stated torch minimum is true.

Run: python -m pytest -q tests/test_real_path.py
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import align
import lora
import plan
from data import LatentCache
from models.autoencoder import load_autoencoder
from models.flux import Flux
from models.pipeline import read_shift, write_pipeline
from models.sana import PRESETS as SANA_PRESETS
from models.sana import Sana

from flux_reference import run_diffusers
from tiny_text import build_flux_text
from tiny_world import SIZE, build_world, tiny_flux

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = build_world(tmp_path_factory.mktemp("world"))
    cache(root, root / "cache", "--count", "8")
    return root


def cache(world: Path, out: Path, *argv: str) -> Path:
    align.main(
        [
            "--stage",
            "cache",
            "--data",
            "shapes",
            "--resolution",
            str(SIZE),
            "--teacher_ae",
            str(world / "teacher_ae"),
            "--student_ae",
            str(world / "student_ae"),
            "--text",
            str(world / "text"),
            "--batch_size",
            "4",
            "--out_dir",
            str(out),
            *argv,
        ]
    )
    return out


def stage(world: Path, out: Path, *argv: str) -> Path:
    align.main(
        [
            "--cache",
            str(world / "cache"),
            "--out_dir",
            str(out),
            "--batch_size",
            "4",
            "--log_every",
            "1",
            "--steps",
            "2",
            *argv,
        ]
    )
    return out


def without_our_shift(folder: Path, scheduler: dict) -> Path:
    """A folder as released: its scheduler config is diffusers' own, without the "_shift" key our stages write."""
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def tensor_dtypes(folder: Path) -> set[torch.dtype]:
    sd = safetensors.torch.load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    return {v.dtype for v in sd.values()}


def test_every_stage_trains_and_writes_the_base_folders_own_shift(world, tmp_path):
    """A base sampled with a fixed shift (FluxPipeline's use_dynamic_shifting false, shift 2) gives an embed folder,
    a head run and a LoRA merge that all use it; before, every stage defaulted to FLUX's dynamic shift."""
    base = tmp_path / "base"
    shutil.copytree(world / "base", base, symlinks=True)
    without_our_shift(
        base,
        {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "use_dynamic_shifting": False,
            "shift": 2.0,
        },
    )
    assert read_shift(base) == ("constant", 2.0)
    embed = stage(world, tmp_path / "embed", "--stage", "embed", "--base", str(base))
    assert read_shift(embed / "model") == ("constant", 2.0)
    head = stage(
        world, tmp_path / "head", "--stage", "head", "--init", str(embed / "model"), "--warmup", "1"
    )
    run = json.loads((head / "config.json").read_text())
    # trained at r = 2, and recorded so
    assert (run["shift"], run["shift_value"]) == ("constant", 2.0)
    assert read_shift(head / "model") == ("constant", 2.0)
    # an explicit --shift still wins
    cfg = lora.with_shift(lora.Config(init=str(head / "model"), shift="dcgen"))
    assert cfg.shift == "dcgen"


def test_a_sana_folder_trains_at_its_constant_flow_shift(world, tmp_path):
    """DC-Gen-SANA: a released SANA folder (DPM-Solver config, flow_shift 3) trains at r = 3, not FLUX's mu."""
    sana = tmp_path / "sana"
    write_pipeline(sana, Sana(SANA_PRESETS["tiny"]), world / "teacher_ae", world / "text", "flux")
    without_our_shift(sana, {"_class_name": "DPMSolverMultistepScheduler", "flow_shift": 3.0})
    cfg = lora.with_shift(lora.Config(init=str(sana)))
    assert (cfg.shift, cfg.shift_value) == ("constant", 3.0)
    embed = stage(world, tmp_path / "embed", "--stage", "embed", "--base", str(sana))
    assert read_shift(embed / "model") == ("constant", 3.0)


def test_head_and_merged_folders_keep_the_runs_dtype(world, tmp_path):
    """--dtype bf16 runs write bf16 folders (fp32 doubled a 12B folder to 48 GB); fp32 runs stay fp32."""
    embed = stage(
        world,
        tmp_path / "embed",
        "--stage",
        "embed",
        "--base",
        str(world / "base"),
        "--dtype",
        "bf16",
    )
    head = stage(
        world,
        tmp_path / "head",
        "--stage",
        "head",
        "--init",
        str(embed / "model"),
        "--dtype",
        "bf16",
        "--warmup",
        "1",
    )
    assert tensor_dtypes(embed / "model") == tensor_dtypes(head / "model") == {torch.bfloat16}
    for dtype, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = lora.Config(
            init=str(head / "model"),
            cache=str(world / "cache"),
            out_dir=str(tmp_path / dtype),
            rank=4,
            steps=2,
            batch_size=4,
            warmup=1,
            sample_every=0,
            dtype=dtype,
        )
        last = lora.main(cfg)
        merged = lora.merge(lora.Config(merge=str(last), out_dir=str(tmp_path / f"merged-{dtype}")))
        assert tensor_dtypes(merged) == {want}
        # the merged bf16 weights are the fp32 EMA weights rounded once
        ema = lora.load_ckpt(last)["ema"]["x_embedder.weight"]
        sd = safetensors.torch.load_file(
            merged / "transformer" / "diffusion_pytorch_model.safetensors"
        )
        assert torch.equal(sd["x_embedder.weight"], ema.to(want))


def test_the_cache_encodes_in_one_pass_unless_told_to_tile(world, tmp_path):
    """Tiles are one flag away (--tile_px); by default the cache holds the one-pass latents."""
    one = LatentCache(world / "cache").get([0, 1], ["student", "teacher"])
    tiled = LatentCache(cache(world, tmp_path / "tiled", "--count", "2", "--tile_px", "8")).get(
        [0, 1], ["student"]
    )
    ae = load_autoencoder(world / "student_ae", tile_px=None).eval()
    images = torch.stack([align.ShapesDataset(SIZE, 0, "train", 8)[i]["image"] for i in (0, 1)])
    with torch.no_grad():
        assert torch.allclose(one["student"], ae.encode(images), atol=1e-6)
    assert not torch.allclose(tiled["student"], one["student"], atol=1e-3)  # the seams


def test_the_cache_keeps_256_t5_tokens_as_official_training(world, tmp_path):
    """align.py --stage cache on a FLUX text folder (T5 tokenizer of 512 tokens) stores 256 T5 states per caption."""
    text = build_flux_text(tmp_path / "flux_text")
    out = tmp_path / "cache"
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
            "--student_ae",
            str(world / "student_ae"),
            "--text",
            str(text),
            "--out_dir",
            str(out),
        ]
    )
    assert LatentCache(out).shape("txt")[0] == 256


def test_embed_stage_assembles_the_student_on_the_meta_device(world, tmp_path, monkeypatch):
    """The student is built without memory and takes the base's tensors: a 12B base no longer costs a second,
    random fp32 copy (48 GB) on the master while the other ranks wait."""
    devices = []
    init = Flux.__init__

    def spy(self, params):
        devices.append(torch.empty(0).device.type)  # where a tensor made now would live
        init(self, params)

    monkeypatch.setattr(Flux, "__init__", spy)
    stage(world, tmp_path / "embed", "--stage", "embed", "--base", str(world / "base"))
    assert devices[-1] == "meta"  # the last Flux built is the assembled student


def test_the_stated_torch_minimum_covers_every_torch_api_the_code_imports():
    """requirements.txt and the README state one torch minimum, no lower than the newest API the code imports."""
    since = {  # import -> the first torch release with it public
        r"from torch\.distributed\.fsdp import fully_shard": (2, 6),
        r"from torch\.distributed\.tensor import": (2, 5),
        r"from torch\.nn\.attention import": (2, 3),
    }
    code = "\n".join(
        p.read_text()
        for p in [*ROOT.glob("*.py"), *ROOT.glob("models/*.py"), *ROOT.glob("runs/*.py")]
    )
    need = max(v for pattern, v in since.items() if re.search(pattern, code))
    stated = re.search(r"^torch>=(\d+)\.(\d+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert stated and tuple(map(int, stated.groups())) >= need, (
        f"requirements.txt must say torch>={need}"
    )
    minimum = f"torch>={stated[1]}.{stated[2]}"
    readme = (ROOT / "README.md").read_text()
    assert minimum in readme and not re.search(
        r"torch>=(?!" + re.escape(minimum[7:]) + r"\b)", readme
    )


def test_a_lora_run_writes_a_file_diffusers_loads_onto_its_init_folder(world, tmp_path):
    """lora.py's run folder holds pytorch_lora_weights.safetensors: diffusers' FluxPipeline.load_lora_weights on the
    --init folder's transformer gives the merged model's output (x_embedder and proj_out, trained in full, included).
    """
    embed = stage(world, tmp_path / "embed", "--stage", "embed", "--base", str(world / "base"))
    head = stage(
        world, tmp_path / "head", "--stage", "head", "--init", str(embed / "model"), "--warmup", "1"
    )
    cfg = lora.Config(
        init=str(head / "model"),
        cache=str(world / "cache"),
        out_dir=str(tmp_path / "lora"),
        rank=4,
        alpha=8,
        steps=3,
        batch_size=4,
        warmup=1,
        lr=1e-2,
        sample_every=0,
        ema=0.5,
    )
    merged = lora.merge(lora.Config(merge=str(lora.main(cfg)), out_dir=str(tmp_path / "merged")))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=FluxTransformer2DModel.from_pretrained(head / "model" / "transformer"),
    )
    g = torch.Generator().manual_seed(0)
    x, t, txt, y = (
        torch.randn(2, 8, 2, 2, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 8, 32),
        torch.ones(2, 32),
    )
    args = (x, t, txt, y, torch.full((2,), 3.5), 1)
    with torch.no_grad():
        before = run_diffusers(pipe.transformer.eval(), *args)
        pipe.load_lora_weights(tmp_path / "lora")
        got = run_diffusers(pipe.transformer, *args)
        want = run_diffusers(
            FluxTransformer2DModel.from_pretrained(merged / "transformer").eval(), *args
        )
    scale = want.abs().max()
    assert (got - before).abs().max() > 1e-2 * scale  # the run moved the model
    assert (got - want).abs().max() < 1e-5 * scale  # an fp32 run writes an fp32 file


def test_a_training_run_checks_its_plan_before_the_first_step(world, tmp_path, monkeypatch):
    """lora.py and align.py --stage head hand their shapes to plan.check_fits at start (it stops a CUDA run whose
    predicted peak exceeds the card, naming the flag to change); a stop leaves no checkpoint behind."""
    seen = {}

    def refuse(stage, model, **kw):
        seen[stage] = kw
        raise SystemExit(
            f"{stage}: predicted peak 99.0 GB per GPU > 76.0 GB usable; --grad_checkpointing 50.0 GB"
        )

    monkeypatch.setattr(plan, "check_fits", refuse)
    embed = stage(world, tmp_path / "embed", "--stage", "embed", "--base", str(world / "base"))
    with pytest.raises(SystemExit, match="head: predicted peak"):
        stage(world, tmp_path / "head", "--stage", "head", "--init", str(embed / "model"))
    cfg = lora.Config(
        init=str(embed / "model"),
        cache=str(world / "cache"),
        out_dir=str(tmp_path / "lora"),
        rank=4,
        steps=2,
        batch_size=4,
        prefixes=(4,),
        num_prefixes=2,
    )
    with pytest.raises(SystemExit, match="--grad_checkpointing"):
        lora.main(cfg)
    assert seen["head"]["latent_hw"] == seen["lora"]["latent_hw"] == (2, 2)
    assert (
        seen["lora"]["micro_batch"] == 4
        and seen["lora"]["lora_rank"] == 4
        and seen["lora"]["aug_k"] == 2
    )
    assert not list((tmp_path / "head").glob("ckpt_*.pt")) and not list(
        (tmp_path / "lora").glob("ckpt_*.pt")
    )


def test_quantize_calibrates_a_bf16_folder_in_bf16(world, tmp_path, monkeypatch):
    """A bf16 model folder (what a bf16 run now writes) is calibrated as stored: the sampler's forwards see bf16
    activations (no fp32 copy of 12B on the way), and the emulated export keeps bf16 beside its 4-bit codes."""
    import quantize

    model = tiny_flux(True).to(torch.bfloat16)
    write_pipeline(tmp_path / "bf16", model, world / "teacher_ae", world / "text", "flux")
    seen = set()
    calibrate = quantize.calibrate

    def spy(model, run, names, *args, **kw):
        hooks = [
            model.get_submodule(n).register_forward_hook(lambda m, i, o: seen.add(i[0].dtype))
            for n in names
        ]
        try:
            return calibrate(model, run, names, *args, **kw)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(quantize, "calibrate", spy)
    quantize.main(
        [
            "--model",
            str(tmp_path / "bf16"),
            "--calib_count",
            "2",
            "--calib_steps",
            "2",
            "--calib_size",
            str(SIZE),
            "--num_grids",
            "2",
            "--lowrank_iters",
            "2",
            "--rank",
            "4",
            "--device",
            "cpu",
            "--out_dir",
            str(tmp_path / "q"),
        ]
    )
    assert seen == {torch.bfloat16}
    assert torch.bfloat16 in tensor_dtypes(tmp_path / "q") and torch.float32 not in tensor_dtypes(
        tmp_path / "q"
    )


def test_a_lora_merges_without_its_cache(world, tmp_path):
    """Merging needs only the checkpoint and its --init folder (AE and text encoders come from there): a LoRA
    can be merged after its latent cache is deleted."""
    shutil.copytree(world / "cache", tmp_path / "cache")
    embed = stage(world, tmp_path / "embed", "--stage", "embed", "--base", str(world / "base"))
    cfg = lora.Config(init=str(embed / "model"), cache=str(tmp_path / "cache"), out_dir=str(tmp_path / "lora"),
                      rank=4, steps=1, batch_size=4, warmup=1, sample_every=0)  # fmt: skip
    last = lora.main(cfg)
    shutil.rmtree(tmp_path / "cache")
    merged = lora.merge(lora.Config(merge=str(last), out_dir=str(tmp_path / "merged")))
    assert read_shift(merged) == read_shift(embed / "model")
    assert (merged / "vae").resolve() == (embed / "model" / "vae").resolve()


def test_a_checkpoint_from_before_the_flag_renames_still_merges(world, tmp_path):
    """A checkpoint whose saved config says --aug_channels / --aug_k / --aug_full (and distill's former --loss)
    merges: renamed flags take their new names, flags a stage no longer has are dropped."""
    embed = stage(world, tmp_path / "embed", "--stage", "embed", "--base", str(world / "base"))
    cfg = lora.Config(init=str(embed / "model"), cache=str(world / "cache"), out_dir=str(tmp_path / "lora"),
                      rank=4, steps=1, batch_size=4, warmup=1, sample_every=0)  # fmt: skip
    ckpt = lora.load_ckpt(lora.main(cfg))
    ckpt["config"] = {
        k: v for k, v in ckpt["config"].items() if k not in ("prefixes", "num_prefixes")
    }
    ckpt["config"] |= {"aug_channels": [], "aug_k": 3, "aug_full": True, "gone": 1}
    torch.save(ckpt, tmp_path / "old.pt")
    assert lora.merge(
        lora.Config(merge=str(tmp_path / "old.pt"), out_dir=str(tmp_path / "m"))
    ).is_dir()
