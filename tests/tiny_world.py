"""A tiny world for stage and sampling tests: toy text encoders, a tiny FLUX-VAE-like teacher AE, a tiny DC-AE 1.5
student AE, and tiny FLUX model folders, all random, written in the real on-disk layouts."""

import dataclasses
from pathlib import Path

import torch

from common import save_pretrained
from models.dcae import DCAE
from models.dcae import PRESETS as DCAE_PRESETS
from models.flux import PRESETS, Flux
from models.pipeline import write_pipeline
from models.vae import PRESETS as VAE_PRESETS
from models.vae import VAE
from toy.shapes import ShapesDataset
from toy.text import build_toy_text_encoder

# px: teacher AE f2 + patch 2 -> 4x4 tokens; student AE f8 + patch 1 -> 2x2 tokens (4x fewer)
SIZE = 16


def tiny_flux(guidance: bool) -> Flux:
    return Flux(dataclasses.replace(PRESETS["tiny"], vec_in_dim=32, guidance_embed=guidance))


def build_world(root: Path) -> Path:
    torch.manual_seed(0)
    captions = [ShapesDataset(size_px=SIZE, seed=0)[i]["caption"] for i in range(50)]
    build_toy_text_encoder(root / "text", captions, dim=32, max_length=8)
    for name, ae in (
        ("teacher_ae", VAE(VAE_PRESETS["tiny-vae"])),
        ("student_ae", DCAE(DCAE_PRESETS["tiny-1.5"])),
    ):
        save_pretrained(root / name, ae.state_dict(), ae.config())
    # guidance-distilled
    write_pipeline(root / "base", tiny_flux(True), root / "teacher_ae", root / "text", "flux")
    # a CFG model
    write_pipeline(root / "base_cfg", tiny_flux(False), root / "teacher_ae", root / "text", "flux")
    return root
