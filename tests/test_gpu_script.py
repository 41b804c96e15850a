"""runs/gpu.sh (the GPU check) at tiny size on a CPU: every section runs and lands in gpu.json and gpu.md, so the script
is known to work before a GPU loan is spent on it; and the time budget skips items, with a note, when it runs out.

Run: python -m pytest -q tests/test_gpu_script.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from runs import gpu

ROOT = Path(__file__).resolve().parents[1]


def run_gpu_sh(out: Path, *flags: str) -> tuple[dict, str, str]:
    """bash runs/gpu.sh --tiny on the CPU with this interpreter; returns gpu.json, gpu.md and stdout."""
    env = {**os.environ, "PYTHON": sys.executable}
    argv = [
        "bash",
        str(ROOT / "runs" / "gpu.sh"),
        "--tiny",
        "--device",
        "cpu",
        "--out",
        str(out),
        *flags,
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=out.parent)
    assert r.returncode == 0, (
        f"gpu.sh failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text(), r.stdout


def test_tiny_run_measures_every_section(tmp_path):
    res, md, stdout = run_gpu_sh(tmp_path / "gpu")
    assert res["errors"] == []
    assert (
        res["run"]["device"].startswith("CPU") and res["run"]["torch"] and res["run"]["git_commit"]
    )

    # 1. latency: both models of the pair at both sizes, eager timed; compile is skipped on a CPU,
    # with its reason
    eager = [r for r in res["latency"] if not r["compiled"]]
    pairs = {(r["role"], r["model"], r["size"]) for r in eager}
    assert pairs == {
        ("dcgen", "toy-f32c16", 256),
        ("dcgen", "toy-f32c16", 512),
        ("base", "toy", 256),
        ("base", "toy", 512),
    }
    for r in eager:
        assert (
            r["step_s"] > 0 and r["first_call_s"] > 0 and r["tflop"] > 0 and r["steps_timed"] >= 1
        ), r
        assert math.isclose(r["tflops_achieved"], r["tflop"] / r["step_s"]), r
        assert r["peak_gib"] is None  # CPU: memory not measured, and the JSON says so
    assert "not measured" in res["memory"]
    compiled = [r for r in res["latency"] if r["compiled"]]
    assert len(compiled) == len(eager) and all("GPU only" in r["skipped"] for r in compiled)
    # the speed-up pairs base and DC-Gen at each size: fewer tokens, fewer FLOPs
    assert [s["size"] for s in res["speedup"]] == [256, 512]
    for s in res["speedup"]:
        assert s["speedup"] > 0 and s["flop_ratio"] > 1 and s["paper_speedup"] is None, s

    # 2. the LoRA step, beside plan.predict's seconds and peak
    t = res["lora_step"]
    assert t["model"] == "tiny" and t["micro_batch"] == 2 and t["rank"] == 8
    assert t["step_s"] > 0 and t["plan_step_s"] > 0 and t["plan_peak_gib"] > 0, t
    assert math.isclose(t["step_ratio"], t["step_s"] / t["plan_step_s"]) and math.isfinite(
        t["loss"]
    ), t
    assert t["plan"]["flops"] > 0 and t["trainable_m"] > 0

    # 3. the decode, one pass and tiled
    assert [d["tile_px"] for d in res["decode"]] == [0, 128]
    assert all(d["seconds"] > 0 for d in res["decode"]), res["decode"]

    # gpu.md: the card, the three tables with one row per item; and the same tables on stdout
    assert md.startswith("# GPU check on CPU")
    for header in (
        "| model | px | tokens |",
        "| px | compile | base s/step |",
        "| model | latent |",
        "| AE | px |",
    ):
        assert header in md and header in stdout, header
    assert (
        md.count("| toy-f32c16 |") == 4
        and md.count("| toy |") == 4
        and md.count("| tiny-1.5 |") == 2
    )
    # only compile was skipped
    assert "skipped" not in md.split("| model | latent |")[1].split("## Notes")[0]


def test_budget_skips_items_with_a_note():
    """Out of budget, every item becomes a skip record with its reason, and nothing is built or timed."""

    cfg = gpu.Config(**gpu.TINY)
    clock, errors, cpu = gpu.Clock(budget_s=0.0), [], torch.device("cpu")
    rows = []
    gpu.latency_section(cfg, clock, False, cpu, torch.float32, errors, rows)
    gpu.decode_section(cfg, clock, cpu, torch.float32, errors, rows)
    assert len(rows) == 4 + 2 and all("> 0 s budget" in r["skipped"] for r in rows), rows
    assert len(clock.notes) == len(rows) and all(n.startswith("skipped ") for n in clock.notes)
    assert errors == [] and gpu.speedups(rows) == []
    assert gpu.Clock(budget_s=60.0).fits("an item", estimate_s=1.0) is None
