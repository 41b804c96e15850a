"""Diffusers-format model folders: `config.json` plus safetensors weights, in one file or in shards listed by an
index. Reading is shared by every model in models/, so each loads real checkpoints with the same checks: built on the
meta device (no memory), every key and shape compared with the checkpoint, then the tensors assigned in place.
Writing (`save_pretrained`) lives here too, so one file knows the format both ways; every file is written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn


def read_json(path: str | Path) -> dict:
    """A JSON file; invalid JSON is a ValueError naming the file, line and column (json's own names neither file)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e


def check_links(folder: str | Path, names: list[str] | None = None) -> None:
    """A model folder links its AE and text encoders to where they live (models/pipeline.py): a link whose target was
    moved or deleted (the folder itself, or its entries `names`, default all) is named with its target, not
    reported as a missing part."""
    folder = Path(folder)
    if not folder.is_dir():
        paths = [folder]
    else:
        paths = sorted(folder.iterdir()) if names is None else [folder / n for n in names]
    for p in paths:
        if p.is_symlink() and not p.exists():
            raise FileNotFoundError(
                f"{p} is a symbolic link to {os.readlink(p)}, which does not exist (moved or deleted?)"
            )


def read_file(path: str | Path, device: str | torch.device = "cpu"):
    """A safetensors file's tensors, or a torch.save file read with weights_only=True (no pickled code). A truncated
    or corrupt file is a ValueError naming it, not the reader's "incomplete metadata" or "central directory"."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        if Path(path).suffix == ".safetensors":
            return safetensors.torch.load_file(path, device=str(device))
        return torch.load(path, map_location=device, weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        if isinstance(e, torch.OutOfMemoryError) or "allocate memory" in str(e):
            raise
        what = (
            "corrupt or not a weights-only torch checkpoint"
            if isinstance(e, pickle.UnpicklingError)
            else ""
        )
        raise ValueError(f"{path} is {what or 'truncated or corrupt'} ({short(e)})") from e


def short(e: BaseException) -> str:
    """The gist of a reader's error in one short line: weights-only loading's own reason (after its paragraph on
    torch 2.6's default), else the first sentence."""
    text = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
    return " ".join(text.split()).split(". ")[0][:100] or type(e).__name__


def read_config(folder: str | Path, what: str) -> dict:
    """The folder's config.json; `what` names the expected model in the error, e.g. "FLUX
    transformer"."""
    folder = Path(folder)
    check_links(folder)
    if not (folder / "config.json").is_file():
        found = (
            sorted(p.name for p in folder.iterdir())
            if folder.is_dir()
            else "the folder does not exist"
        )
        raise FileNotFoundError(
            f"{folder} is not a {what} folder: expected config.json and *.safetensors weights "
            f"(diffusers layout), found {found}"
        )
    return read_json(folder / "config.json")


def weight_files(folder: str | Path, name: str) -> list[Path]:
    """`name`.safetensors, or the shards listed in `name`.safetensors.index.json."""
    folder = Path(folder)
    index = folder / f"{name}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {missing}")
        return [folder / s for s in shards]
    if (folder / f"{name}.safetensors").is_file():
        return [folder / f"{name}.safetensors"]
    found = sorted(p.name for p in folder.glob("*.safetensors*"))
    raise FileNotFoundError(
        f"no weights in {folder}: expected {name}.safetensors or {name}.safetensors.index.json, found {found or 'none'}"
    )


def read_state_dict(
    folder: str | Path,
    name: str = "diffusion_pytorch_model",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """All tensors of the folder's weights, floating ones cast to `dtype` when given (else kept as
    stored)."""
    sd = {}
    for file in weight_files(folder, name):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    sd[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except SafetensorError as e:
            raise ValueError(f"{file} is truncated or corrupt ({short(e)})") from e
    return sd


def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Strictly load `sd` into `model` (usually built on the meta device) by assigning the tensors
        in place.

    Fails before touching the model with a message naming the missing / unexpected keys, or the
        first key whose shape differs, with both shapes: the usual sign of a config that does not match
        the checkpoint."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{what}: checkpoint keys do not match the model. Missing {len(missing)}: {missing[:5]}; "
            f"unexpected {len(unexpected)}: {unexpected[:5]}"
        )
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(
                f"{what}: shape mismatch at {k!r}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}; "
                "the config does not match the weights"
            )
    model.load_state_dict(sd, strict=True, assign=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# writing


def atomic_write(path: str | Path, write: Callable) -> None:
    """Call `write(f)` on a temp file beside `path`, fsync, then rename it over `path`: readers (and
    a crash) see the old file or the new one, never half of one. A checkpoint being written when the
    process dies never replaces the last good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes the file private (0600); give it a normal file's mode
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """A whole folder written under a temporary name beside `folder`, then renamed into place: a crash leaves the
    old folder or the new one, never half of one. What is replaced must be a model folder (model_index.json, or
    config.json with weights, and no checkpoints); a run's folder or anything else there is refused."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    weights = any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names)
    model = "model_index.json" in names or ("config.json" in names and weights)
    if (names and not model) or any(n.startswith("ckpt_") for n in names) or folder.is_file():
        raise FileExistsError(
            f"{folder} exists and is not a model folder: write the model to a new folder"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp's folder is private (0700): give it a normal folder's mode
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old = folder.with_name(f"{tmp.name}.old")
        if names:  # the old folder out of the way, the new one in: two renames on one file system
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: dict,
    name: str = "diffusion_pytorch_model",
    max_shard_bytes: int = 10 * 2**30,
) -> None:
    """Write a diffusers-format folder: config.json plus `name`.safetensors, or shards and an index
    when large."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for k, v in state_dict.items():
        nbytes = v.numel() * v.element_size()
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards, size = shards + [{}], 0
        shards[-1][k] = v.detach().contiguous()
        size += nbytes
    files = [f"{name}.safetensors"] if len(shards) == 1 else []
    files = files or [
        f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for file, shard in zip(files, shards):
        data = safetensors.torch.save(shard, metadata={"format": "pt"})
        atomic_write(folder / file, lambda f, data=data: f.write(data))
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in state_dict.values())
        weight_map = {k: file for file, shard in zip(files, shards) for k in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(
            folder / f"{name}.safetensors.index.json",
            lambda f: f.write(json.dumps(index, indent=2).encode()),
        )
    atomic_write(
        folder / "config.json", lambda f: f.write((json.dumps(config, indent=2) + "\n").encode())
    )
    # Stale files of an earlier save go last, so a crash leaves a loadable folder (old or new weights): the index
    # first (weight_files prefers it), then the shards it listed.
    keep = {*files, f"{name}.safetensors.index.json"} if len(shards) > 1 else set(files)
    for old in sorted(
        folder.glob(f"{name}*.safetensors*"), key=lambda p: not p.name.endswith(".json")
    ):
        if old.name not in keep:
            old.unlink()
