"""A model folder: what sample.py loads and every training stage writes. It is diffusers' pipeline layout,

    model_index.json                              {"_class_name": "FluxPipeline" | "SanaPipeline", ...}
    transformer/   config.json + weights          FLUX MMDiT or SANA DiT
    vae/           config.json + weights          AutoencoderKL (FLUX VAE) or AutoencoderDC (DC-AE 1.0 / 1.5)
    text_encoder/ tokenizer/ [text_encoder_2/ tokenizer_2/]   CLIP + T5 (FLUX) or Gemma-2 (SANA)
    scheduler/scheduler_config.json               how sampling shifts the noise levels

so a released FLUX.1-Krea-dev, SANA or DC-Gen-FLUX folder is one, and so is what align.py or `lora.py --merge`
writes. Folders we write may hold the large frozen parts (AE, text encoders) as symbolic links to the folders they
came from, so a 12B experiment does not copy 10 GB of T5 per stage. This is the only place that looks at a folder
to decide the model family; the stages then use the model's own attributes (`latent_layers`, `lora_targets`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.autoencoder import load_autoencoder
from models.dit import DiT
from models.flux import Flux
from models.loading import atomic_write, check_links, read_config, read_json, save_pretrained
from models.sana import Sana
from models.svdquant import is_quantized, load_quantized
from models.text import load_text_encoder
from models.uvit import UViT

TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
SHIFTS = ("flux", "dcgen", "constant")


@dataclass
class Pipeline:
    # Flux or Sana: v = transformer(x, t, **text(prompts)[, guidance])
    transformer: nn.Module | None
    ae: nn.Module | None  # VAE or DCAE: encode / decode, spatial_factor, latent_channels
    # FluxTextEncoder or SanaTextEncoder: prompts -> the transformer's keyword arguments
    text: nn.Module | None
    # how the noise levels are shifted at sampling: "flux", "dcgen" or "constant"
    # (common.shift_factor)
    shift: str
    shift_value: float  # r for shift "constant" (SANA's flow_shift)
    folder: Path
    id2label: dict | None = None  # class-conditional folders: class id -> names (model_index.json)

    def patch_size(self) -> int:
        return self.transformer.params.patch_size


def transformer_class(folder: str | Path) -> type[Flux] | type[Sana]:
    kind = read_config(Path(folder), "transformer").get("_class_name")
    classes = {"FluxTransformer2DModel": Flux, "SanaTransformer2DModel": Sana}
    classes |= {"DiTTransformer2DModel": DiT, "UViT": UViT}  # class-conditional (models/c2i.py)
    if kind not in classes:
        raise ValueError(
            f"{folder}/config.json: transformer class {kind!r} is not one of {sorted(classes)}"
        )
    return classes[kind]


def load_transformer(folder: Path, ae_latent_channels: int | None, **kw) -> nn.Module:
    """FLUX's patch size is not in diffusers' config (its pipeline packs 2×2 outside the model):
    take our "_patch_size" key, else infer it from the AE's latent channels (64 = 16·2·2 for FLUX.1,
    32 = 32·1·1 for DC-Gen)."""
    cls = transformer_class(folder)
    if cls in (Sana, DiT, UViT):
        return cls.from_pretrained(folder, **kw)
    # quantize.py's emulated SVDQuant model (W4A4 + low rank), called like any Flux
    if is_quantized(folder):
        return load_quantized(folder, device=kw.get("device", "cpu"))
    cfg = read_config(folder, "FLUX transformer")
    patch = cfg.get("_patch_size")
    if patch is None and ae_latent_channels:
        patch = math.isqrt(cfg["in_channels"] // ae_latent_channels)
        if patch * patch * ae_latent_channels != cfg["in_channels"]:
            raise ValueError(
                f"{folder}: in_channels {cfg['in_channels']} is not C·p² for the AE's C={ae_latent_channels}"
            )
    return Flux.from_pretrained(folder, patch_size=patch, **kw)


def sampling_shift(folder: Path, transformer_cfg: dict, ae_cfg: dict | None) -> tuple[str, float]:
    """The noise-level shift the model was trained with: our "_shift" key in scheduler_config.json
    when present, else what the released pipelines do (DC-Gen generate.py, pipeline_dcgen_flux.py):
    SANA a constant flow_shift; DC-Gen-FLUX 1K (DC-AE f32c32) the "flux2" shift r =
    sqrt(C·p²·L/4096); FLUX.1 and DC-Gen-FLUX 4K the dynamic shift mu(L)."""
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = read_json(sched_file) if sched_file.is_file() else {}
    if "_shift" in sched:
        return sched["_shift"], float(sched.get("shift", 3.0))
    # DPM-Solver configs say flow_shift
    if transformer_cfg.get("_class_name") == "SanaTransformer2DModel":
        return "constant", float(sched.get("flow_shift", sched.get("shift", 3.0)))
    if (
        ae_cfg
        and ae_cfg.get("_class_name") == "AutoencoderDC"
        and ae_cfg.get("latent_channels") == 32
    ):
        return "dcgen", 1.0
    if sched.get("use_dynamic_shifting") is False:  # a FlowMatchEuler config with a fixed shift
        return "constant", float(sched.get("shift", 1.0))
    flux = {
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "base_shift": 0.5,
        "max_shift": 1.15,
    }
    if other := {k: sched[k] for k in flux if k in sched and sched[k] != flux[k]}:
        print(
            f"note: {sched_file} sets {other}; the sampler's dynamic shift uses FLUX's {flux} (--shift overrides)"
        )
    return "flux", 1.0


def read_shift(folder: str | Path) -> tuple[str, float]:
    """The shift a model folder samples with (`sampling_shift`), read from its configs alone: no
    weights are loaded. Every training stage defaults to it, so a SANA run trains at SANA's constant
    3.0 and a FLUX run at FLUX's mu."""
    folder = Path(folder)
    ae_file = folder / "vae" / "config.json"
    ae_cfg = read_config(folder / "vae", "autoencoder") if ae_file.is_file() else None
    return sampling_shift(folder, read_config(folder / "transformer", "transformer"), ae_cfg)


def load_pipeline(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    parts: tuple[str, ...] = ("transformer", "vae", "text"),
    max_length: int | None = None,
    tile_px: int | None = 1024,
) -> Pipeline:
    """Load the `parts` of a model folder; a missing part is named in the error with what the folder
    holds."""
    folder = Path(folder)
    check_links(folder, [])  # the folder itself a link to a moved one: named with its target
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    index = folder / "model_index.json"
    id2label = json.loads(index.read_text()).get("id2label") if index.is_file() else None
    if id2label is not None:  # class-conditional: no text encoders
        parts = tuple(p for p in parts if p != "text")
    need = {
        "transformer": "transformer/config.json",
        "vae": "vae/config.json",
        "text": "text_encoder/config.json",
    }
    check_links(folder, [need[p].split("/")[0] for p in parts])  # a moved AE or text encoder
    missing = [need[p] for p in parts if not (folder / need[p]).is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"{folder} is not a complete model folder: missing {missing} (it holds {found})"
        )
    ae_cfg = (
        read_config(folder / "vae", "autoencoder")
        if (folder / "vae" / "config.json").is_file()
        else None
    )
    tr_cfg = read_config(folder / "transformer", "transformer") if "transformer" in parts else {}
    shift, shift_value = sampling_shift(folder, tr_cfg, ae_cfg)
    ae = (
        load_autoencoder(folder / "vae", dtype=dtype, device=device, tile_px=tile_px)
        if "vae" in parts
        else None
    )
    latent_channels = ae_cfg.get("latent_channels") if ae_cfg else None
    transformer = None
    if "transformer" in parts:
        transformer = load_transformer(
            folder / "transformer", latent_channels, dtype=dtype, device=device
        )
    text = (
        load_text_encoder(folder, device=device, dtype=dtype, max_length=max_length)
        if "text" in parts
        else None
    )
    return Pipeline(transformer, ae, text, shift, shift_value, folder, id2label)


def write_pipeline(
    folder: str | Path,
    transformer: nn.Module,
    ae_folder: str | Path,
    text_folder: str | Path,
    shift: str,
    shift_value: float = 3.0,
    copy: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
    id2label: dict | None = None,
) -> None:
    """Write a model folder: the transformer's weights (`state_dict`, default its own) and config
    (default its diffusers config), the AE and text encoders linked (or copied, `copy=True`, e.g.
    for the committed toy zoo) from where they live, and the sampling shift."""
    assert shift in SHIFTS, f"shift {shift!r} not in {SHIFTS}"
    folder = Path(folder)
    text = {p: Path(text_folder) / p for p in TEXT_PARTS if (Path(text_folder) / p).is_dir()}
    c2i = hasattr(transformer, "null_label")  # class-conditional: labels, no text encoders
    old_index = Path(text_folder) / "model_index.json"
    if c2i and id2label is None and old_index.is_file():
        id2label = json.loads(old_index.read_text()).get("id2label")
    # e.g. a cache's folders, since moved
    if not (Path(ae_folder) / "config.json").is_file() or not (text or c2i):
        raise FileNotFoundError(
            f"model folder {folder}: needs an AE folder (got {ae_folder}) and text encoders in "
            f"{text_folder}; is one of them gone or moved?"
        )
    sources = {"vae": Path(ae_folder)} | text
    sd = transformer.state_dict() if state_dict is None else state_dict
    if isinstance(transformer, DiT):  # diffusers' keys: the embedder copied into every block
        sd = transformer.diffusers_state_dict(sd)
    save_pretrained(folder / "transformer", sd, config or transformer.diffusers_config())
    for name, src in sources.items():
        dst = folder / name
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        if copy:
            shutil.copytree(src.resolve(), dst)
        else:
            os.symlink(
                os.path.relpath(src.resolve(), folder.resolve()), dst, target_is_directory=True
            )
    # model_index.json and the scheduler config as diffusers writes them, so diffusers' pipelines
    # open our folders too
    index = {"_class_name": "FluxPipeline" if isinstance(transformer, Flux) else "SanaPipeline"}
    if c2i:
        index = {"_class_name": "DiTPipeline", "id2label": id2label or {}}
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    index["transformer"] = ["diffusers", transformer.diffusers_config()["_class_name"]]
    for name in sources:
        index[name] = [
            "diffusers" if name == "vae" else "transformers",
            component_class(folder / name),
        ]
    sched = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_shift": shift,  # ours (diffusers ignores "_" keys): "flux", "dcgen" or "constant"
        "num_train_timesteps": 1000,
        # "dcgen" has no diffusers equivalent; closest is dynamic
        "use_dynamic_shifting": shift != "constant",
        "shift": shift_value,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "base_shift": 0.5,
        "max_shift": 1.15,
    }
    if getattr(transformer.params, "learn_sigma", False):  # an ε/Σ DiT: DiT's DDPM schedule
        sched = {"_class_name": "DDPMScheduler", "beta_start": 1e-4, "beta_end": 0.02}
        sched |= {"beta_schedule": "linear", "variance_type": "learned_range", "clip_sample": False}
        index["scheduler"] = ["diffusers", "DDPMScheduler"]
    atomic_write(
        folder / "model_index.json", lambda f: f.write(json.dumps(index, indent=2).encode())
    )
    atomic_write(
        folder / "scheduler" / "scheduler_config.json",
        lambda f: f.write(json.dumps(sched, indent=2).encode()),
    )


def component_class(folder: Path) -> str:
    """The class diffusers' model_index.json names for a sub-folder: a model's or a tokenizer's."""
    if (folder / "tokenizer_config.json").is_file():
        return json.loads((folder / "tokenizer_config.json").read_text()).get(
            "tokenizer_class", "AutoTokenizer"
        )
    cfg = json.loads((folder / "config.json").read_text())
    return cfg.get("_class_name") or cfg.get("architectures", ["AutoModel"])[0]
