"""Helpers shared by every stage script: dataclass config -> CLI flags, one-line errors, torchrun/DDP setup, print0,
seeding, atomic checkpoints, diffusers-format folder writing, image grids, and the flow-matching schedule."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from models.loading import atomic_write, read_file, save_pretrained  # noqa: F401  (save_pretrained: re-exported)

# ----------------------------------------------------------------------------------------------------------------
# config: one @dataclass per script, every field a `--field value` flag; a Literal field takes only its values

Device = typing.Literal["auto", "cuda", "cpu"]
Dtype = typing.Literal["fp32", "bf16"]
Shift = typing.Literal["", "flux", "dcgen", "constant"]  # "": the model folder's own
PARSED: list = []  # the configs parse_config built in this process (run_main's out-of-memory line reads them)


def parse_config(cls: type, argv: list[str] | None = None):
    """Build `cls` from the command line: one flag per field, named exactly like it; bools are `--x/--no-x`.

    The inline comment after each field (`lr: float = 1e-4  # peak learning rate`) becomes its `--help` text. A field
    typed `typing.Literal[...]` (e.g. `Dtype`) accepts only the values it lists."""
    hints = typing.get_type_hints(cls)
    src = "".join(
        inspect.getsource(c) for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c)
    )
    # a subclass's comment wins
    comments = dict(re.findall(r"^\s*(\w+)\s*:[^#\n]*#\s*(.*)$", src, re.M))
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(description=doc, formatter_class=DefaultsHelp)
    parser.print_usage = lambda file=None: None  # a bad flag: one error line (--help has the rest)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `X | None` -> X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        # help is %-formatted
        kw = dict(default=default, type=tp, help=comments.get(f.name, " ").replace("%", "%%"))
        if typing.get_origin(tp) is typing.Literal:  # the only values allowed
            kw.update(choices=typing.get_args(tp), type=type(typing.get_args(tp)[0]))
        elif tp is bool:
            kw.update(action=argparse.BooleanOptionalAction, type=None)
        # `--x a b --x c` -> (a, b, c); given, it replaces the default
        elif typing.get_origin(tp) in (list, tuple):
            kw.update(nargs="*", type=typing.get_args(tp)[0], action=Extend)
        parser.add_argument(f"--{f.name}", **kw)
    ns = vars(parser.parse_args(argv))
    PARSED.append(cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()}))
    return PARSED[-1]


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help names each flag's default, unless it is empty or the help text speaks of it."""

    def _get_help_string(self, action):
        empty = action.default in ("", (), None) or "default" in (action.help or "")
        return action.help if empty else super()._get_help_string(action)


class Extend(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        old = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*(old if old is not self.default else []), *values])


def save_config(cfg, out_dir: str | Path) -> None:
    """Print the resolved config and save it as out_dir/config.json, on the master only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
        text = json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"
        atomic_write(Path(out_dir) / "config.json", lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------------------------------------------
# errors: a bad input or too little memory is said in one line, not a traceback


class UsageError(SystemExit):
    """A bad input or a limit the user can fix: `run_main` prints it as `error: <message>` (exit status 2)."""


def run_main(main: typing.Callable):
    """Run a stage's `main`: bad input (UsageError; a ValueError, OSError or assert naming the file or flag) or too
    little memory ends in one line `error: ...` on stderr, status 2; bugs keep the traceback (all: DCGEN_TRACEBACK=1)"""
    try:
        return main()
    except (UsageError, Exception) as e:
        oom = isinstance(e, MemoryError | torch.OutOfMemoryError) or "allocate memory" in str(e)
        user = isinstance(e, UsageError | OSError | ValueError | AssertionError | SafetensorError)
        if os.environ.get("DCGEN_TRACEBACK") == "1" or not (oom or (user and e.args)):
            raise  # a bare `assert` (no message) is a bug too
        line = " ".join(str(e.code if isinstance(e, SystemExit) else e).split())
        if oom:
            flags = [
                (f, getattr(c, f)) for c in PARSED for f in ("batch_size", "batch") if hasattr(c, f)
            ]
            flag, batch = flags[-1] if flags else ("batch_size", "?")  # sample.py's is --batch
            line = next((s for s in line.split(". ") if "allocate" in s), line)  # what it tried
            line = f"out of memory at --{flag} {batch} ({line[:120]}): lower --{flag}, "
            line += (
                "add --grad_checkpointing (DiT stages), or size the run first with `python plan.py`"
                if flag == "batch_size"
                else "--tile_px or the size"
            )
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is one process


@dataclasses.dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    master: bool  # rank 0: the process that logs and writes files


def pick_device(name: str) -> str:
    """--device resolved: auto is cuda where torch sees a GPU; cuda without one is a UsageError."""
    if name == "cuda" and not torch.cuda.is_available():
        why = "is built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
        raise UsageError(f"--device cuda: torch {torch.__version__} {why}; use --device cpu")
    return name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def init_dist(device: str = "auto") -> Dist:
    """Join the torchrun process group (nccl on GPU, gloo on CPU), or run as world size 1 under plain `python`."""
    device = pick_device(device)
    torchrun = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    rank, local_rank, world = (
        (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if torchrun
        else (0, 0, 1)
    )
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if torchrun and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world, dev, rank == 0)


def cleanup_dist() -> None:
    if dist.is_initialized():
        # every rank arrives before any tears the group down: gloo can abort a rank mid-teardown
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, log_file: str | Path | None = None) -> None:
    """Print on the master process only; also append the line to `log_file` when given."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    print(*args, flush=True)
    if log_file is not None:
        with open(log_file, "a") as f:
            print(*args, file=f)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Stage scripts pass `seed + rank` so ranks draw different data."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_info(world_size: int = 1) -> dict:
    """What a run record needs to be reproducible: the git commit (and whether the tree was dirty), versions, GPU."""

    def git(*a):  # "" when git is missing or this is not a checkout
        if not shutil.which("git"):
            return ""
        return subprocess.run(
            ["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()

    return {
        "git_commit": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "world_size": world_size,
    }


# ----------------------------------------------------------------------------------------------------------------
# training: model wrapping, learning rate, EMA, and step-indexed randomness


def wrap_model(model: torch.nn.Module, d: Dist, fsdp: bool = False) -> torch.nn.Module:
    """DDP over the ranks (gradients all-reduced in backward), or FSDP2: each transformer block sharded over the
    ranks, then the root (PyTorch's fully_shard recipe), for bases too large to replicate (the 12B FLUX)."""
    if d.world_size == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for name in ("transformer_blocks", "single_transformer_blocks"):
            for block in getattr(model, name, []):
                fully_shard(block)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None
    )


def lr_at(
    step: int, lr: float, warmup: int, warmup_lr: float = 0.0, steps: int = 0, decay: int = 0
) -> float:
    """Linear warm-up over `warmup` steps (step 0 already moves), constant, then linear to 0 over the last `decay`."""
    warm = warmup_lr + (lr - warmup_lr) * (step + 1) / warmup if step < warmup else lr
    # before its decay, the constant-lr run
    return warm * min(1.0, (steps - step) / decay) if decay else warm


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema <- decay·ema + (1 - decay)·theta for the tensors named in `ema` (kept in float32)."""
    for name, p in model.named_parameters():
        if name in ema:
            ema[name].lerp_(p.detach().float(), 1 - decay)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of one training step (noise, sigmas, text dropout, guidance scales). Draws
    are made for the global batch and each rank takes its slice, so a resumed run repeats the uninterrupted one
    exactly, and N ranks draw what one process with the same global batch draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def draw_prefixes(
    g: torch.Generator, candidates: Sequence[int], k: int, always_max: bool, C: int
) -> list[int]:
    """The K channel counts c' of one DC-AE 1.5 training step (channel masking, augmented diffusion training), drawn
    uniformly with `g` from the candidates and C; with always_max and K >= 2, C first and K - 1 drawn. K = 1 draws
    one either way, as dc-ai-projects/DC-Gen@cae2205 dc_gen/aecore/trainer.py `prepare_batch` (L373-420) does.
    NOTE(deviation): dc_gen/c2icore/trainer.py L461-484 gives [C] alone for K = 1 with always_sample_max_channel."""
    pool = sorted({*candidates, C})
    if pool[0] < 1 or pool[-1] > C or k < 1:
        raise ValueError(
            f"channel prefixes {list(candidates)} must lie in 1..{C}, and K={k} must be >= 1"
        )
    fixed = int(always_max and k > 1)
    return [C] * fixed + [
        pool[i] for i in torch.randint(len(pool), (k - fixed,), generator=g).tolist()
    ]


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: written atomically, so a crash mid-write never replaces the last good file


def save_ckpt(obj, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save `obj` (a torch.save dict, or a flat tensor dict for `.safetensors`) atomically: temp
    file, fsync, rename."""
    if Path(path).suffix == ".safetensors":
        tensors = {k: v.detach().contiguous() for k, v in obj.items()}
        atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors, metadata=metadata)))
    else:
        atomic_write(path, lambda f: torch.save(obj, f))


def load_ckpt(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint written by save_ckpt: safetensors, or torch.load with weights_only=True (no pickled code)."""
    # missing: FileNotFoundError; truncated or corrupt: a ValueError naming it
    return read_file(path, device)


def save_image_grid(
    images: torch.Tensor, path: str | Path, nrow: int = 4, text: dict | None = None
) -> None:
    """Save (B, 3, H, W) images in [-1, 1] as one PNG grid, `nrow` images wide, with `text` as PNG
    metadata."""
    from PIL import Image, PngImagePlugin

    B, _, H, W = images.shape
    ncol = min(nrow, B)
    rows = math.ceil(B / ncol)
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = torch.zeros(3, rows * H, ncol * W, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[:, r * H : (r + 1) * H, c * W : (c + 1) * W] = x[i]
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, str(v))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path, pnginfo=info)


# ----------------------------------------------------------------------------------------------------------------
# flow matching (rectified flow): x_t = (1 - sigma)·x0 + sigma·noise, velocity v = noise - x0,
# sampled from sigma = 1 (pure noise) to sigma = 0 (data).
#
# Every resolution shift in use is the same map, sigma' = r·sigma / (1 + (r - 1)·sigma), with a different r:
#   FLUX dynamic shift  r = e^mu, mu linear in image tokens (256 -> 0.5, 4096 -> 1.15); diffusers writes the same
#                       map as sigma' = e^mu / (e^mu + 1/sigma - 1)                       [FluxPipeline]
#   DC-Gen 1K ("flux2") r = sqrt(C·p²·L / 4096), C·p² values per token, L image tokens
#                       [DC-Gen pipeline_dcgen_flux.py set_timesteps_flux2; dc_ai/t2icore/scheduler/flux2_scheduler.py]
#   SANA                r = flow_shift = 3.0
# r > 1 spends more steps at high noise, which larger latents (more tokens, more channels) need.


def time_shift(r: float, sigma: torch.Tensor) -> torch.Tensor:
    """Shift noise levels towards 1 by the factor r (r = 1 is the identity)."""
    return r * sigma / (1 + (r - 1) * sigma)


def flux_mu(tokens: int, base_tokens=256, max_tokens=4096, base_shift=0.5, max_shift=1.15) -> float:
    """FLUX's mu, linear in the number of image tokens: mu(256) = 0.5, mu(4096) = 1.15 (extrapolated
    beyond)."""
    m = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + m * (tokens - base_tokens)


def shift_factor(kind: str, tokens: int, channels: int, value: float = 3.0) -> float:
    """The r of `time_shift` for shift `kind` on `tokens` image tokens of `channels` values each
    (C·p² for p×p patches, as the official pipeline's sqrt(L·latents.shape[2]/4096) counts a packed
    latent's values)."""
    if kind == "flux":
        return math.exp(flux_mu(tokens))
    if kind == "dcgen":
        return math.sqrt(channels * tokens / 4096)
    if kind == "constant":
        return value
    raise ValueError(f"unknown shift kind {kind!r}; choose from 'flux', 'dcgen', 'constant'")


def shift_for(kind: str, latent_chw: tuple[int, int, int], patch: int, value: float = 3.0) -> float:
    """`shift_factor` for a latent of shape (C, h, w) seen in p×p patches: (h/p)(w/p) tokens of C·p²
    values each."""
    C, h, w = latent_chw
    return shift_factor(kind, (h // patch) * (w // patch), C * patch * patch, value)


def get_schedule(steps: int, r: float) -> torch.Tensor:
    """Sampling noise levels: `steps` uniform levels 1 ... 1/steps, shifted by r, then a final 0.
    Shape (steps + 1,)."""
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return torch.cat([time_shift(r, sigmas), sigmas.new_zeros(1)]).float()


def sample_sigmas(batch: int, r: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training noise levels: u ~ logit-normal(0, 1) (SD3 §3.1), on the 1000-level grid, shifted by
    r. Shape (B,)."""
    u = torch.sigmoid(torch.randn(batch, generator=generator, dtype=torch.float64))
    # As DC-Gen's dc_ai/t2icore/models/flux.py (Flux.forward_train): the shifted 1000-step schedule
    # indexed by int(u·1000), sigma = 1 - i/1000.
    return time_shift(r, 1 - torch.floor(u * 1000) / 1000).float()


def get_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise from a seeded CPU generator, so a seed gives the same image on any device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def denoise(velocity: typing.Callable, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler solver of dx/dsigma = v(x, sigma) from sigmas[0] = 1 to sigmas[-1] = 0; x stays in
    float32."""
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (sigma_next - sigma) * velocity(x, sigma).float()  # one Euler step towards the data
    return x


def guided_velocity(
    model, cond: dict, null: dict | None = None, guidance: float | None = None, cfg: float = 1.0
):
    """v(x, sigma) for `denoise`, with guidance made explicit. A guidance-distilled model
    (FLUX.1-dev/Krea) takes the scale w as an input, one pass; a CFG model takes two, v_u + cfg·(v_c
    - v_u), batched as [cond, null]."""

    def v(x: torch.Tensor, sigma: float) -> torch.Tensor:
        # rows of the forward pass: [cond] or [cond, null]
        n = x.shape[0] * (1 if cfg == 1.0 else 2)
        t = torch.full((n,), sigma, device=x.device)
        w = (
            {}
            if guidance is None
            else {"guidance": torch.full((n,), float(guidance), device=x.device)}
        )
        if cfg == 1.0:
            return model(x, t, **cond, **w)
        both = {k: torch.cat([cond[k], null[k].expand_as(cond[k])]) for k in cond}
        v_c, v_u = model(torch.cat([x, x]), t, **both, **w).chunk(2)
        return v_u + cfg * (v_c - v_u)

    return v
