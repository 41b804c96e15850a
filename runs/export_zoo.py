"""Write the committed toy zoo (zoo/) from a runs/toy.sh output folder: the final model folders with their weights in
fp16 (half the bytes; sample.py computes in fp32 on a CPU), one shared copy of the text encoders and of each AE that
the model folders link to (relative symlinks), each model's training config (training_config.json), and
zoo/README.md saying how each model was made. A part the run folder lacks (a rebuild that redid only the last steps)
is kept from the zoo being replaced, as it is, and the script says so.

Run:    python runs/export_zoo.py --runs out/toy --out zoo
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.loading import read_config, read_state_dict, save_pretrained  # noqa: E402
from models.pipeline import TEXT_PARTS  # noqa: E402
from toy.text import TOY_CAPTIONS  # noqa: E402

AES = {
    "vae-f8c4": "KL VAE f8c4: the FLUX VAE's role",
    "f32c16": "DC-AE 1.5 f32c16 (structured latent): the 1K role",
    "f64c32": "DC-AE 1.5 f64c32 (structured latent): the 4K role",
}
MODELS = {  # zoo name: (runs/toy.sh step and run folder, AE, what it is, how it was made)
    "base": (
        "base-2",
        "vae-f8c4",
        "CFG MMDiT trained from scratch at 256 px (16x16 tokens)",
        "lora.py --preset toy --rank 0 (7000 steps) -> lora.py --init --rank 0 (3000 more at a lower lr)",
    ),
    "krea": (
        "krea",
        "vae-f8c4",
        "the base distilled to embedded guidance: the toy FLUX.1-Krea",
        "distill.py",
    ),
    "dcgen-1k": (
        "dcgen-1k",
        "f32c16",
        "DC-Gen of krea on f32c16 at 256 px (8x8 tokens, 4x fewer)",
        "align.py --stage embed -> --stage head -> lora.py -> lora.py --merge",
    ),
    "dcgen-4k": (
        "dcgen-4k-5",
        "f64c32",
        "DC-Gen of krea on f64c32 with 4x4 patches at 4096 px (16x16 tokens, the "
        "base's own grid); the default of sample.py",
        "align.py --stage embed --patch_size 4 (teacher at 256 px) -> --stage head -> lora.py -> merge -> "
        "lora.py -> merge, four times more",
    ),
}


def half(folder: Path, dst: Path, name: str = "diffusion_pytorch_model") -> int:
    """Copy a diffusers-format weights folder with its floating tensors in fp16; returns the
    parameter count."""
    sd = {
        k: v.half() if v.is_floating_point() else v
        for k, v in read_state_dict(folder, name).items()
    }
    save_pretrained(dst, sd, read_config(folder, "weights folder"), name)
    return sum(v.numel() for v in sd.values())


def link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink() if dst.is_symlink() else shutil.rmtree(dst)
    dst.symlink_to(Path("..") / src.relative_to(dst.parent.parent), target_is_directory=True)


def export(src: Path, kept: Path, dst: Path) -> int:
    """fp16 copy of the weights folder src, or, when the run folder lacks it, the previous zoo's
    copy `kept` as is."""
    if src.is_dir():
        return half(src, dst)
    if not kept.is_dir():
        raise FileNotFoundError(
            f"{src} is missing and the zoo has no copy at {kept}: run runs/toy.sh first"
        )
    print(f"kept {kept} from the previous zoo ({src} is not there)")
    shutil.copytree(kept, dst)
    return sum(v.numel() for v in read_state_dict(dst, "diffusion_pytorch_model").values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="out/toy", help="output folder of runs/toy.sh")
    ap.add_argument("--out", default="zoo", help="the zoo folder to (re)write")
    args = ap.parse_args()
    # Written next to --out, then swapped in: a failed export leaves the old zoo whole, and run
    # folders that link into it (a run resumed from the zoo's copies) stay readable while the new
    # one is written.
    runs, final = Path(args.runs), Path(args.out)
    out = final.with_name(final.name + ".tmp")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(runs / "text" if (runs / "text").is_dir() else final / "text", out / "text")
    # sample.py reads the toy's prompt grammar from here
    for tokenizer in ("tokenizer", "tokenizer_2"):
        config = out / "text" / tokenizer / "tokenizer_config.json"
        fields = json.loads(config.read_text())
        if TOY_CAPTIONS not in fields:  # a text folder built before toy/text.py wrote the field
            print(
                f"{config}: adding {TOY_CAPTIONS!r}: true (runs/toy.sh builds it from the toy captions)"
            )
            config.write_text(
                json.dumps(fields | {TOY_CAPTIONS: True}, indent=2, sort_keys=True) + "\n"
            )
    lines = [
        "# The toy zoo",
        "",
        "Written by `bash runs/toy.sh` (then `python runs/export_zoo.py`) on a 2-core CPU, "
        "from nothing but this repository's scripts and the procedural shapes of toy/shapes.py. Weights in fp16; "
        "the model folders link their `vae/` and text encoders to the shared copies here; a model exported from a "
        "run holds that run's config (`training_config.json`).",
        "",
        "| folder | what | params | made by |",
        "|---|---|---|---|",
        "| text/ | frozen CLIP + T5 in miniature over the captions' words: CLIP random, T5 pretrained for a "
        "minute to say where each object goes | - | toy.text.build_toy_text_encoder(roles=...) |",
    ]
    for name, what in AES.items():
        n = export(runs / "ae" / name / "ae", final / "ae" / name, out / "ae" / name)
        lines.append(f"| ae/{name}/ | {what} | {n / 1e6:.2f} M | ae15.py (runs/ae15_toy.sh) |")
    for name, (run, ae, what, how) in MODELS.items():
        src, dst = runs / run / "model", out / name
        from_run = (src / "transformer").is_dir()
        n = export(src / "transformer", final / name / "transformer", dst / "transformer")
        folder = src if from_run else final / name
        for part in ("scheduler", "model_index.json"):
            (shutil.copytree if (folder / part).is_dir() else shutil.copy)(
                folder / part, dst / part
            )
        train_cfg = (
            runs / run / "config.json" if from_run else final / name / "training_config.json"
        )
        if train_cfg.is_file():
            shutil.copy(train_cfg, dst / "training_config.json")
        link(out / "ae" / ae, dst / "vae")
        for part in TEXT_PARTS:
            if (out / "text" / part).is_dir():
                link(out / "text" / part, dst / part)
        lines.append(f"| {name}/ | {what} | {n / 1e6:.2f} M | {how} (runs/toy.sh step `{run}`) |")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and not f.is_symlink())
    lines += ["", f"Total size: {size / 2**20:.1f} MiB."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    print(f"wrote {final} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
