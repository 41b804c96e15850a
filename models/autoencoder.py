"""Any autoencoder of this project by one name: the AE presets of models/dcae.py and models/vae.py in one dict,
`autoencoder_params` (a diffusers config.json dict -> its params), `build_autoencoder` (params -> a DCAE or a VAE) and
`load_autoencoder`, which opens any diffusers-format AE folder (FLUX VAE or DC-AE) with one call. Every choice between
the two classes is made in these two functions; tiling and the image-size check are models/tiling.py.

The interface that align.py, lora.py and sample.py rely on, implemented by `models.dcae.DCAE` and `models.vae.VAE`:

    z = ae.encode(x, channels=None)  # x (B, 3, H, W) in [-1, 1] -> z (B, c, H/f, W/f), model-ready (scaled inside)
    x = ae.decode(z)                 # any c <= C channels for adaptive (DC-AE 1.5) AEs -> x (B, 3, H, W) in [-1, 1]
    ae.spatial_factor, ae.latent_channels, ae.adaptive   # f, C, and whether channel prefixes are allowed
    ae.tile_px                       # tile size in pixels for images larger than it (None: never tile)
    ae.config()                      # the diffusers config.json dict (with _class_name) to save next to the weights

A stage writes its AE with `common.save_pretrained(folder, ae.state_dict(), ae.config())`, so our own AEs and the
released ones are read by the same `load_autoencoder`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models import dcae, vae
from models.dcae import DCAE, DCAEParams
from models.loading import load_weights, read_config, read_state_dict
from models.vae import VAE, VAEParams

assert not dcae.PRESETS.keys() & vae.PRESETS.keys(), (
    "an AE preset name is in both models/dcae.py and models/vae.py"
)
PRESETS = {**dcae.PRESETS, **vae.PRESETS}  # every AE preset by name: DCAEParams or VAEParams

# ----------------------------------------------------------------------------------------------------------------
# the two classes: config.json's _class_name picks the params, the params' type picks the module


def autoencoder_params(config: dict, where: str = "the config") -> DCAEParams | VAEParams:
    """The params of a diffusers AE config dict: AutoencoderDC -> DCAEParams, AutoencoderKL ->
    VAEParams. `where` names the config in the error (a config.json path)."""
    kind = config.get("_class_name")
    if kind == "AutoencoderDC":
        return DCAEParams.from_config(config)
    if kind == "AutoencoderKL":
        return VAEParams.from_config(config)
    raise ValueError(
        f"{where} has _class_name {kind!r}; expected an autoencoder: 'AutoencoderKL' (the FLUX VAE) or "
        "'AutoencoderDC' (DC-AE 1.0 / 1.5)"
    )


def build_autoencoder(params: DCAEParams | VAEParams, tile_px: int | None = 1024) -> DCAE | VAE:
    """A randomly initialised AE (on the current default device, e.g. meta): DCAEParams -> DCAE,
    VAEParams -> VAE."""
    return (DCAE if isinstance(params, DCAEParams) else VAE)(params, tile_px=tile_px)


def load_autoencoder(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    tile_px: int | None = 1024,
) -> DCAE | VAE:
    """Load a diffusers-format AE folder (config.json + safetensors): AutoencoderKL -> VAE,
        AutoencoderDC -> DCAE.

    dtype None keeps the stored dtype, except fp16/bf16 weights on a CPU, which are upcast to fp32:
        CPU convolutions have no fast half-precision path (the zoo's f64 AE encodes a 4096 px image in
        447 s in fp16, 3.4 s in fp32)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is a pipeline folder; pass its autoencoder sub-folder {folder / 'vae'}"
        )
    config = read_config(folder, "diffusers autoencoder (AutoencoderKL or AutoencoderDC)")
    params = autoencoder_params(config, f"{folder / 'config.json'}")
    # built without memory, then the stored tensors are assigned strictly
    with torch.device("meta"):
        ae = build_autoencoder(params, tile_px=tile_px)
    load_weights(
        ae, read_state_dict(folder, dtype=dtype, device=device), f"{config['_class_name']} {folder}"
    )
    half = next(ae.parameters()).dtype in (torch.float16, torch.bfloat16)
    return (
        ae.float() if dtype is None and half and torch.device(device).type == "cpu" else ae
    ).eval()
