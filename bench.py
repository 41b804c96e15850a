"""bench.py: DC-Gen's latency claim, measured. A base model and its DC-Gen counterpart run side by side at each
resolution (alternating, after warm-up, median of repeats): transformer time per denoising step, end-to-end latency
(text encoding + steps + decode), token counts, and the analytic FLOPs of one step, so the measured speed-up can be
set against the FLOP ratio (DC-Gen arXiv 2509.25180: FLUX.1-Krea -> DC-Gen-FLUX 4.65 -> 1.10 s at 1K, 213.81 -> 4.04 s
at 4K on an H100, 52.9x). Latency does not depend on weight values, so --random_weights builds the real shapes.

Run:    python bench.py --pair toy --sizes 1024 4096                        # the toy zoo, on a CPU
        python bench.py --pair toy --sizes 1024 --profile       # + where a step's time goes, kernel GFLOP/s
        python bench.py --pair flux --random_weights --depth 1 --depth_single 2 --sizes 1024 2048   # FLUX width
        python bench.py --pair flux --random_weights --device cuda --dtype bf16 --sizes 1024 2048 4096 --compile
        python bench.py --decode --random_weights --ae dc-ae-1.5-f64c128 --size 4096 --tile_px 1024  # peak memory
Pairs:  flux  flux-dev (f8c16 VAE, 2x2 patches) vs dcgen-flux-1k (DC-AE f32c32) up to --dcgen_1k_max px, else
              dcgen-flux-4k (DC-AE 1.5 f64c128), as the paper pairs them
        sana  sana-1.6b-1024 (DC-AE f32c32) vs dcgen-sana-1.6b-f64c128 (DC-AE 1.5 f64c128), CFG (two passes a step)
        toy   zoo/krea (the toy FLUX.1-Krea) vs zoo/dcgen-1k / zoo/dcgen-4k, with their own AEs and text encoder
Output: a table on stdout, --out JSON. Our MMDiT vs diffusers' on the same weights: tests/bench_vs_diffusers.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import denoise, get_schedule, guided_velocity, parse_config, shift_for
from models.autoencoder import PRESETS as AE_PRESETS
from models.autoencoder import build_autoencoder, load_autoencoder
from models.dcae import PRESETS as DCAE_PRESETS
from models.flux import PRESETS as FLUX_PRESETS
from models.flux import Flux, flux_flops
from models.pipeline import load_pipeline
from models.sana import PRESETS as SANA_PRESETS
from models.sana import Sana, sana_flops
from models.tiling import reuse_freed_memory
from models.vae import PRESETS as VAE_PRESETS

ZOO = Path(__file__).resolve().parent / "zoo"

# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # a table of flags: one field, its default and its --help text per line
    # fmt: off
    pair: str = "toy"  # toy, flux or sana (see the docstring)
    sizes: tuple[int, ...] = (1024, 4096)  # square image sizes in px
    zoo: str = str(ZOO)  # toy: the zoo folder
    random_weights: bool = False  # real-size shapes with random weights (flux, sana): no checkpoints needed
    depth: int = -1  # reduced depth for CPU runs of real-width models: double-stream (FLUX) or all (SANA) blocks
    depth_single: int = -1  # reduced single-stream depth (FLUX)
    dcgen_1k_max: int = 1024  # flux/toy: sizes up to this use the f32 DC-Gen model, larger ones the f64 one
    steps: int = 20  # denoising steps of the end-to-end latency
    repeats: int = 5  # timed repeats (median), alternating base / DC-Gen
    warmup: int = 2  # untimed repeats first
    end_to_end: bool = True  # also time text encoding + `steps` steps + decode (composed from parts where noted)
    e2e_max_step_s: float = 60.0  # if one step takes longer, the end-to-end time is composed from measured parts
    text_len: int = 512  # random-weights text tokens (T5 length at sampling)
    device: str = "auto"  # auto, cuda or cpu
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16 or fp32
    attention: str = "auto"  # SDPA backend: auto, flash, efficient, cudnn or math
    compile: bool = False  # torch.compile the transformers (mode max-autotune-no-cudagraphs)
    memory: bool = True  # peak memory of one step and of the decode, each in a fresh process (CPU) or reset (CUDA)
    profile: bool = False  # also profile 3 steps of each role: time in matmuls / attention / the rest, and GFLOP/s
    decode: bool = False  # instead: peak memory and time of one tiled decode (--ae, --size, --tile_px)
    ae: str = "dc-ae-1.5-f64c128"  # --decode: AE preset (models/dcae.py or vae.py) or folder
    size: int = 4096  # --decode: image size in px
    tile_px: int = 1024  # --decode: tile size (0: no tiling)
    out: str = "out/bench.json"  # results
    _probe: str = ""  # (internal) "role:step" or "role:decode": measure one thing in this fresh process, print GB
    # fmt: on


# ----------------------------------------------------------------------------------------------------------------
# models of a pair


@dataclass
class Role:
    name: str  # "base" or "dcgen"
    label: str
    model: torch.nn.Module
    ae: torch.nn.Module
    # None: random text states of the right shape (same cost for both roles)
    text: torch.nn.Module | None
    cfg: bool  # a CFG model: two passes per step

    def tokens(self, size: int) -> int:
        return (size // self.ae.spatial_factor // self.model.params.patch_size) ** 2


def random_init(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Real shapes, random values: materialise a meta-built module on `device` in `dtype` without a
    checkpoint."""
    module = module.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, t in module.named_parameters():
            t.normal_(0, 0.02) if t.ndim > 1 else t.zero_() if "bias" in name else t.fill_(1.0)
    return module.eval()


def build_role(cfg: Config, role: str, size: int, device, dtype) -> Role:
    if cfg.pair == "toy":
        name = "krea" if role == "base" else "dcgen-1k" if size <= cfg.dcgen_1k_max else "dcgen-4k"
        pipe = load_pipeline(Path(cfg.zoo) / name, dtype=dtype, device=device)
        return Role(
            role, f"{cfg.zoo}/{name}", pipe.transformer.eval(), pipe.ae.eval(), pipe.text, cfg=False
        )
    assert cfg.random_weights, (
        f"--pair {cfg.pair} needs --random_weights (or give real folders to sample.py)"
    )
    if cfg.pair == "flux":
        preset = (
            "flux-dev"
            if role == "base"
            else "dcgen-flux-1k"
            if size <= cfg.dcgen_1k_max
            else "dcgen-flux-4k"
        )
        ae_cfg = {
            "flux-dev": VAE_PRESETS["flux-vae"],
            "dcgen-flux-1k": DCAE_PRESETS["dc-ae-f32c32-in-1.0"],
            "dcgen-flux-4k": DCAE_PRESETS["dc-ae-1.5-f64c128"],
        }[preset]
        params, cls, is_cfg = FLUX_PRESETS[preset], Flux, False
    else:
        preset = "sana-1.6b-1024" if role == "base" else "dcgen-sana-1.6b-f64c128"
        ae_cfg = DCAE_PRESETS["dc-ae-f32c32-sana-1.1" if role == "base" else "dc-ae-1.5-f64c128"]
        params, cls, is_cfg = SANA_PRESETS[preset], Sana, True
    if cfg.depth >= 0:
        params = dataclasses.replace(params, depth=cfg.depth)
    if cfg.depth_single >= 0 and cls is Flux:
        params = dataclasses.replace(params, depth_single=cfg.depth_single)
    with torch.device("meta"):
        model, ae = cls(params), build_autoencoder(ae_cfg)
    label = f"{preset}" + (
        f" ({params.depth}+{params.depth_single} blocks)" if cfg.depth >= 0 and cls is Flux else ""
    )
    return Role(
        role, label, random_init(model, device, dtype), random_init(ae, device, dtype), None, is_cfg
    )


# ----------------------------------------------------------------------------------------------------------------
# measurement


def inputs(
    role: Role, size: int, cfg: Config, device, dtype
) -> tuple[torch.Tensor, dict, dict | None]:
    """Noise at the role's latent grid and the text conditioning: encoded by the role's text
    encoder, or random states of the real shapes (T5-XXL + CLIP-L for FLUX, Gemma-2 for SANA) when
    there is none."""
    f, C = role.ae.spatial_factor, role.model.params.in_channels
    x = torch.randn(1, C, size // f, size // f, device=device, dtype=dtype)
    if role.text is not None:
        cond, null = role.text(["a red circle above a blue square"]), role.text.null(1)
    elif isinstance(role.model, Flux):
        p = role.model.params
        cond = {
            "txt": torch.randn(1, cfg.text_len, p.context_in_dim),
            "y": torch.randn(1, p.vec_in_dim),
        }
        null = None
    else:
        cond = {
            "txt": torch.randn(1, 300, role.model.params.caption_channels),
            "txt_mask": torch.ones(1, 300),
        }
        null = {k: v.clone() for k, v in cond.items()}
    to = lambda d: (
        {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in d.items()}
        if d
        else d
    )
    return x, to(cond), to(null)


def step_fn(role: Role, x, cond, null, model):
    """One denoising step's network evaluations: one pass (guidance-distilled), or two batched (true
    CFG)."""
    B = x.shape[0]
    t = torch.full((B,), 0.5, device=x.device, dtype=x.dtype)
    w = (
        {"guidance": torch.full((B,), 3.5, device=x.device, dtype=x.dtype)}
        if role.model.params.guidance_embed
        else {}
    )
    if not role.cfg:
        return lambda: model(x, t, **cond, **w)
    both = {k: torch.cat([cond[k], null[k]]) for k in cond}
    return lambda: model(torch.cat([x, x]), torch.cat([t, t]), **both, **w)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# op families of a profile: which kernels do the FLOPs of flux_flops' "linear" and "attention" terms
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul")
ATTENTION_OPS = (
    "aten::_scaled_dot_product",
    "aten::_flash_attention",
    "aten::_efficient_attention",
)


def profile_step(fn, row: dict, device) -> dict:
    """Where a step's time goes (torch.profiler, self time of each op, averaged over 3 steps):
    matmuls, attention, everything else; and the throughput each family reaches on its share of the
    analytic FLOPs. A pair whose measured speed-up falls short of the FLOP ratio shows here whether
    the smaller model is overhead-bound (a large "other" share) or runs its kernels at a lower rate
    (small matmuls use the cores less well than big ones)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    repeats = 3  # amortise the profiler's start-up over a few steps
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    family = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        kind = (
            "matmul"
            if e.key in MATMUL_OPS
            else "attention"
            if e.key.startswith(ATTENTION_OPS)
            else "other"
        )
        family[kind] += getattr(e, attr, 0.0) / 1e6  # µs -> s
    family = {k: v / repeats for k, v in family.items()}
    total = sum(family.values())
    flops = (
        row["flops"] * (1 - row["attention_flop_share"]),
        row["flops"] * row["attention_flop_share"],
    )
    out = {f"{k}_share": v / total for k, v in family.items()}
    out["matmul_gflops"] = flops[0] / family["matmul"] / 1e9 if family["matmul"] else None
    out["attention_gflops"] = flops[1] / family["attention"] / 1e9 if family["attention"] else None
    print(
        f"  profile {row['model']} @ {row['size']}: matmul {out['matmul_share']:.0%}, attention "
        f"{out['attention_share']:.0%}, other {out['other_share']:.0%} of {total * 1e3:.0f} ms a step; matmuls at "
        f"{out['matmul_gflops'] or 0:.0f} GFLOP/s, attention at {out['attention_gflops'] or 0:.0f} GFLOP/s"
    )
    return out


def peak_memory_gb(cfg: Config, role: str, size: int, what: str, device) -> float:
    """Peak memory of one step (or one decode) of `role` at `size`: a fresh process on CPU (its peak
    RSS: weights, activations, everything), the allocator's peak on CUDA."""
    argv = [
        sys.executable,
        __file__,
        "--pair",
        cfg.pair,
        "--sizes",
        str(size),
        "--device",
        str(device.type),
        "--dtype",
        cfg.dtype,
        "--depth",
        str(cfg.depth),
        "--depth_single",
        str(cfg.depth_single),
        "--dcgen_1k_max",
        str(cfg.dcgen_1k_max),
        "--zoo",
        cfg.zoo,
        "--text_len",
        str(cfg.text_len),
        "--attention",
        cfg.attention,
        "--out",
        "",
        "--_probe",
        f"{role}:{what}",
    ]
    argv += ["--random_weights"] if cfg.random_weights else []
    run = subprocess.run(argv, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"the memory probe {' '.join(argv[1:])} failed:\n{run.stderr[-2000:]}")
    return float(run.stdout.strip().splitlines()[-1])


def probe(cfg: Config, device, dtype) -> None:
    """--_probe role:what: run one step or one decode and print the peak memory in GB (used by
    peak_memory_gb)."""
    name, what = cfg._probe.split(":")
    role = build_role(cfg, name, cfg.sizes[0], device, dtype)
    x, cond, null = inputs(role, cfg.sizes[0], cfg, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        step_fn(role, x, cond, null, role.model)() if what == "step" else role.ae.decode(x)
    print(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gb())


def peak_rss_gb() -> float:
    """This process's peak resident memory. Linux's VmHWM, not getrusage's ru_maxrss: the latter
    survives exec, so a child of a big parent would report the parent's size (the kernel keeps the
    pre-exec high-water mark)."""
    status = Path("/proc/self/status")
    if status.is_file():
        return (
            int(
                next(
                    ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM")
                ).split()[1]
            )
            / 2**20
        )
    # kB on Linux; elsewhere approximate
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def decode_bench(cfg: Config, device, dtype) -> dict:
    """One decode of a --size image: time and this process's peak memory (run it alone, one tile
    size per run)."""
    if Path(cfg.ae).is_dir():
        ae = load_autoencoder(cfg.ae, dtype=dtype, device=device)
    elif cfg.ae not in AE_PRESETS:
        raise ValueError(
            f"--ae {cfg.ae!r} is neither a folder nor an AE preset; choose from {sorted(AE_PRESETS)}"
        )
    else:
        with torch.device("meta"):
            ae = build_autoencoder(AE_PRESETS[cfg.ae])
        ae = random_init(ae, device, dtype)
    ae.tile_px = cfg.tile_px or None  # tiles overlap by a quarter of their size
    f = ae.spatial_factor
    z = torch.randn(1, ae.latent_channels, cfg.size // f, cfg.size // f, device=device, dtype=dtype)
    rss0 = peak_rss_gb()
    with torch.no_grad():
        seconds = timed(lambda: ae.decode(z), device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gb()
    n = sum(t.numel() for t in ae.parameters()) / 1e6
    row = {
        "ae": cfg.ae,
        "params_M": n,
        "size": cfg.size,
        "tile_px": cfg.tile_px,
        "seconds": seconds,
        "peak_memory_gb": peak,
        "memory_before_decode_gb": rss0,
    }
    print(
        f"decode {cfg.ae} ({n:.0f} M parameters) {cfg.size}x{cfg.size}, tile {cfg.tile_px or 'none'}: "
        f"{seconds:.1f}s, peak memory {peak:.2f} GB ({'allocator' if device.type == 'cuda' else 'process RSS'})"
    )
    return row


# ----------------------------------------------------------------------------------------------------------------
# main


def cpu_busy(seconds: float = 0.5) -> dict:
    """What other processes do to the CPUs while this one sleeps: the busy and stolen fractions of all
    cores over `seconds` (/proc/stat), and the 1-minute load average per core. Spinning OpenMP
    threads (libgomp's default wait policy) slow down 25-60x beside a busy process, so a timing taken
    then says little about the code."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return {}

    def ticks() -> list[int]:  # user nice system idle iowait irq softirq steal
        return [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:9]]

    a = ticks()
    time.sleep(seconds)
    d = [y - x for x, y in zip(a, ticks())]
    total = sum(d) or 1
    cores = os.cpu_count() or 1
    return {
        "busy": 1 - (d[3] + d[4]) / total,
        "steal": d[7] / total,
        "load_per_core": os.getloadavg()[0] / cores,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(libgomp default: spin)"),
    }


def contention_note(m: dict) -> str:
    """A warning line when the machine was not quiet (empty when it was, or unknown)."""
    if m and (m["busy"] > 0.1 or m["steal"] > 0.05 or m["load_per_core"] > 0.5):
        return (
            f"WARNING: timings taken under contention: {m['busy']:.0%} of the CPUs busy before the run "
            f"({m['steal']:.0%} stolen), load average {m['load_per_core']:.2f} per core, OMP_WAIT_POLICY "
            f"{m['omp_wait_policy']}; rerun on a quiet machine before quoting them"
        )
    return ""


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(Config, argv)
    reuse_freed_memory()  # as sample.py does, so that decode times are the ones users get
    machine = cpu_busy()
    if note := contention_note(machine):
        print(note)
    assert cfg.pair in ("toy", "flux", "sana"), f"--pair {cfg.pair!r}: choose toy, flux or sana"
    device = torch.device(
        cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    attention = (
        sdpa_kernel([backends[cfg.attention]]) if cfg.attention != "auto" else torch.no_grad()
    )
    if cfg._probe:
        return probe(cfg, device, dtype)
    if cfg.decode:
        rows = [decode_bench(cfg, device, dtype)]
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(json.dumps(rows, indent=2) + "\n")
        return rows
    print(
        f"{cfg.pair} pair on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
        f"{torch.get_num_threads()} threads), {dtype}, attention {cfg.attention}, compile {cfg.compile}"
    )

    rows = []
    for size in cfg.sizes:
        roles = [build_role(cfg, r, size, device, dtype) for r in ("base", "dcgen")]
        runs = {}
        for role in roles:
            model = (
                torch.compile(role.model, mode="max-autotune-no-cudagraphs")
                if cfg.compile
                else role.model
            )
            x, cond, null = inputs(role, size, cfg, device, dtype)
            runs[role.name] = (model, x, cond, null, step_fn(role, x, cond, null, model))
        times = {r.name: [] for r in roles}
        with torch.no_grad(), attention:
            for i in range(cfg.warmup + cfg.repeats):
                for role in roles:  # alternate, so a drift in machine load hits both alike
                    dt = timed(runs[role.name][4], device)
                    if i >= cfg.warmup:
                        times[role.name].append(dt)
            for role in roles:
                row = measure_role(
                    cfg, role, size, runs[role.name], statistics.median(times[role.name]), device
                )
                if cfg.profile:
                    row["profile"] = profile_step(runs[role.name][4], row, device)
                if cfg.memory:
                    row["step_peak_memory_gb"] = peak_memory_gb(
                        cfg, role.name, size, "step", device
                    )
                rows.append(row)
        base, dc = rows[-2], rows[-1]
        for key in ("step_s", "end_to_end_s", "flops"):
            dc[f"{key}_ratio"] = base[key] / dc[key] if dc.get(key) else None
        print_rows(rows[-2:])
    if note := contention_note(cpu_busy()):  # again at the end: load that came during the run
        print(note)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(
            json.dumps(
                {"config": dataclasses.asdict(cfg), "machine": machine, "rows": rows}, indent=2
            )
            + "\n"
        )
    return rows


def measure_role(cfg: Config, role: Role, size: int, run, step_s: float, device) -> dict:
    """Token count, FLOPs, the median step time, and the end-to-end latency of `steps` steps
    (measured; or composed from the measured parts when one step is slower than e2e_max_step_s)."""
    model, x, cond, null, _ = run
    p, tokens = role.model.params, role.tokens(size)
    txt_len = cond["txt"].shape[1]
    flops = (flux_flops if isinstance(role.model, Flux) else sana_flops)(p, tokens, txt_len)
    total_flops = sum(flops.values()) * (2 if role.cfg else 1)
    row = {
        "role": role.name,
        "model": role.label,
        "size": size,
        "tokens": tokens,
        "step_s": step_s,
        "flops": total_flops,
        "attention_flop_share": flops["attention"] / sum(flops.values()),
    }
    if not cfg.end_to_end:
        return row
    text_s = (
        timed(lambda: role.text(["a red circle above a blue square"]), device) if role.text else 0.0
    )
    decode_s = timed(lambda: role.ae.decode(x), device)
    if step_s <= cfg.e2e_max_step_s:
        sigmas = get_schedule(cfg.steps, shift_for("flux", x.shape[1:], p.patch_size))
        w = 3.5 if p.guidance_embed else None
        v = guided_velocity(model, cond, null, w, cfg=1.0 if not role.cfg else 4.5)
        steps_s = timed(
            lambda: denoise(lambda z, s: v(z.to(x.dtype), s), x.float(), sigmas), device
        )
        row["end_to_end"] = "measured"
    else:
        steps_s = cfg.steps * step_s
        row["end_to_end"] = f"composed: text + {cfg.steps} x median step + decode"
    row.update(
        text_s=text_s, steps_s=steps_s, decode_s=decode_s, end_to_end_s=text_s + steps_s + decode_s
    )
    return row


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        ratio = ""
        if r["role"] == "dcgen":
            ratio = f" | speed-up step {r['step_s_ratio']:.2f}x (FLOPs {r['flops_ratio']:.2f}x, measured/FLOP "
            ratio += f"{r['step_s_ratio'] / r['flops_ratio']:.2f})"
            if r.get("end_to_end_s_ratio"):
                ratio += f", end to end {r['end_to_end_s_ratio']:.2f}x"
        e2e = f" | end to end {r['end_to_end_s']:.2f}s" if "end_to_end_s" in r else ""
        mem = f" | peak {r['step_peak_memory_gb']:.2f} GB" if "step_peak_memory_gb" in r else ""
        print(
            f"{r['size']:>5} {r['model']:<34} {r['tokens']:>6} tokens | {r['flops'] / 1e12:8.2f} TFLOP/step | "
            f"step {r['step_s'] * 1e3:9.1f} ms{e2e}{mem}{ratio}"
        )


if __name__ == "__main__":
    main()
