"""Training data as DC-Gen made it (data.py, align.py --stage cache --prompts): aspect-ratio buckets,
teacher-generated caches that 2 ranks write as 1 does and that a killed run resumes without
duplicates, a bucket per training step on every rank, non-square alignment and LoRA steps, and a
cache that streams (memory flat in the number of shards).

Run: python -m pytest -q tests/test_buckets.py
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import align
import lora
from common import save_ckpt
from data import (
    OFFICIAL_BUCKETS,
    BucketSampler,
    LatentCache,
    StepSampler,
    bucket_sizes,
    nearest_bucket,
    permute,
)

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
PROMPTS = [
    "a red circle above a blue square on a black background",
    "a green triangle left of a yellow diamond on a white background",
    "a blue square below a red circle on a gray background",
    "a yellow circle right of a green square on a black background",
    "a red diamond above a blue triangle on a white background",
    "an orange circle left of a purple square on a gray background",
]


def test_bucket_sizes_follow_the_official_lists():
    ref, table = OFFICIAL_BUCKETS["f64ms"]
    assert bucket_sizes("f64ms", ref, 64) == list(table)  # at its own base: the official sizes
    assert bucket_sizes("f64ms", 256, 32)[3:8] == [
        (192, 320),
        (224, 288),
        (256, 256),
        (288, 224),
        (320, 192),
    ]
    assert bucket_sizes("0.6,1,1.67", 256, 32) == [(192, 320), (256, 256), (320, 192)]
    assert bucket_sizes("square", 40, 64) == [(40, 40)]  # today's caches, as given
    # the released 4K sampler's sizes are in the official 1024 list scaled to 4096
    assert {(4608, 3328), (3328, 4608), (5376, 3072)} <= set(bucket_sizes("ms", 4096, 256))
    sizes = bucket_sizes("0.6,1,1.67", 256, 32)
    assert nearest_bucket(sizes, 1080, 1920) == 0 and nearest_bucket(sizes, 1920, 1080) == 2
    assert nearest_bucket(sizes, 500, 520) == 1
    with pytest.raises(ValueError, match="--buckets"):
        bucket_sizes("wide", 256, 32)


def test_permute_is_a_bijection_for_any_n():
    for n in (1, 2, 3, 7, 64, 1000, 1025):
        assert sorted(permute(i, n, 12345) for i in range(n)) == list(range(n))
    assert [permute(i, 1000, 1) for i in range(10)] != [permute(i, 1000, 2) for i in range(10)]


def test_every_step_is_one_bucket_on_every_rank_weighted_by_size_and_replayable():
    counts, b = [30, 90, 180], 4
    one = BucketSampler(counts, 2 * b, seed=3)
    ranks = [BucketSampler(counts, b, rank=r, world=2, seed=3) for r in range(2)]
    seen = np.zeros(3)
    for step in range(3000):
        (b0, r0), (b1, r1) = (s.batch_of(step) for s in ranks)
        bg, rg = one.batch_of(step)
        assert b0 == b1 == bg and r0 + r1 == rg  # one bucket per global batch, ranks split it
        assert max(rg) < counts[bg]
        seen[bg] += 1
    assert np.allclose(seen / seen.sum(), np.array(counts) / sum(counts), atol=0.03)
    assert BucketSampler(counts, b, 1, 2, 3).batch_of(1234) == ranks[1].batch_of(1234)  # resume
    # a one-bucket cache (every cache written before buckets) keeps the old order exactly
    legacy = BucketSampler([50], 4, 1, 2, seed=7)
    assert all(
        legacy.batch_of(s) == (0, StepSampler(50, 4, 1, 2, 7).batch_of(s)) for s in range(30)
    )


def generate(out: Path, *argv: str) -> Path:
    prompts = out.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [
        *("--stage", "cache", "--prompts", str(prompts), "--teacher", str(ZOO / "krea")),
        *("--student_ae", str(ZOO / "ae" / "f32c16"), "--resolution", "64", "--buckets"),
        *("0.6,1,1.67", "--bucket_multiple", "32", "--sample_steps", "2", "--shard_size", "2"),
        *("--batch_size", "2", "--device", "cpu", "--out_dir", str(out), *argv),
    ]


def cache_tensors(folder: Path) -> dict:
    """Every tensor of every shard file, by file and key, and the shards' captions."""
    out = {}
    for f in sorted(folder.glob("shard_*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out[f.name] = {k: h.get_tensor(k) for k in h.keys()} | {"_": h.metadata()["captions"]}
    return out


def same_cache(a: Path, b: Path) -> None:
    ta, tb = cache_tensors(a), cache_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for f in ta:
        assert ta[f]["_"] == tb[f]["_"]
        assert all(torch.equal(ta[f][k], tb[f][k]) for k in ta[f] if k != "_"), f
    ma, mb = (json.loads((x / "meta.json").read_text()) for x in (a, b))
    assert ma.pop("prompts") != mb.pop("prompts") and ma == mb  # prompts: the same lines elsewhere


def one_thread(argv: list[str]) -> None:
    """align.main on one CPU thread, as each torch.distributed.run process (OMP_NUM_THREADS=1):
    the same float sums in the same order, so the same bits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        align.main(argv)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "one"
    one_thread(generate(out, "--save_images"))
    return out


def test_prompts_become_a_bucketed_cache_of_paired_latents(one_rank):
    meta = json.loads((one_rank / "meta.json").read_text())
    assert meta["count"] == len(PROMPTS) and meta["skipped"] == {}
    sizes = [tuple(b["size"]) for b in meta["buckets"]]
    assert set(sizes) <= {(64, 96), (64, 64), (96, 64)} and len(sizes) >= 2
    cache = LatentCache(one_rank)
    captions = []
    for b, (H, W) in enumerate(sizes):
        assert cache.shape("teacher", b) == (4, H // 8, W // 8)  # as sampled on the f8c4 VAE
        assert cache.shape("student", b) == (16, H // 32, W // 32)
        assert cache.get([0], ["teacher", "student", "txt"], b)["teacher"].isfinite().all()
    for f in one_rank.glob("shard_*.safetensors"):
        with safe_open(f, framework="pt") as h:
            captions += json.loads(h.metadata()["captions"])
    assert sorted(captions) == sorted(PROMPTS)  # every item once
    # --save_images wrote an image folder the cache stage reads back into the same student latents
    assert len(list((one_rank / "images").glob("*.png"))) == len(PROMPTS)
    again = one_rank.parent / "from-images"
    align.main(
        [
            *("--stage", "cache", "--data", str(one_rank / "images"), "--resolution", "64"),
            *("--buckets", "0.6,1,1.67", "--bucket_multiple", "32", "--shard_size", "2"),
            *("--student_ae", str(ZOO / "ae" / "f32c16"), "--text", str(ZOO / "krea")),
            *("--batch_size", "2", "--device", "cpu", "--out_dir", str(again)),
        ]
    )
    regen = LatentCache(again)
    assert regen.counts() == cache.counts()
    for b in range(len(sizes)):
        n = cache.counts()[b]
        x, y = (c.get(list(range(n)), ["student"], b)["student"] for c in (cache, regen))
        assert torch.allclose(x, y, atol=1e-5)


def test_two_ranks_write_the_cache_one_rank_writes(one_rank, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [*cmd, str(REPO / "align.py"), *generate(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    same_cache(one_rank, out)


def test_a_stopped_generation_resumes_without_duplicates(one_rank, tmp_path):
    out = tmp_path / "resumed"
    one_thread(generate(out, "--max_shards", "1"))
    assert not (out / "meta.json").exists()  # not finished: no cache to train on yet
    assert [p.name for p in sorted(out.glob("shard_*.json"))] == ["shard_00000.json"]
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_00000*")}
    one_thread(generate(out))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_00000*")} == first  # not redone
    same_cache(one_rank, out)


def test_non_square_alignment_head_and_lora_steps_run(one_rank, tmp_path):
    common = ["--cache", str(one_rank), "--batch_size", "2", "--device", "cpu", "--log_every", "1"]
    align.main(
        [
            *("--stage", "embed", "--base", str(ZOO / "krea"), "--steps", "2"),
            *(*common, "--out_dir", str(tmp_path / "embed")),
        ]
    )
    align.main(
        [
            *("--stage", "head", "--init", str(tmp_path / "embed" / "model"), "--steps", "2"),
            *(*common, "--warmup", "1", "--out_dir", str(tmp_path / "head")),
        ]
    )
    lora.main(
        lora.parse_config(
            lora.Config,
            [
                *("--init", str(tmp_path / "head" / "model"), "--rank", "4", "--alpha", "4"),
                *("--steps", "4", "--sample_every", "0", "--val_cache", str(one_rank)),
                *(*common, "--out_dir", str(tmp_path / "lora")),
            ],
        )
    )
    log = (tmp_path / "lora" / "log.txt").read_text()
    losses = [float(ln.split("loss ")[1].split()[0]) for ln in log.splitlines() if "| loss" in ln]
    assert len(losses) == 4 and all(np.isfinite(losses)) and "val_loss" in log
    # the four steps drew more than one bucket: non-square batches went through the model
    sampler = BucketSampler(LatentCache(one_rank).counts(), 2, seed=0)
    assert len({sampler.bucket_of(s) for s in range(4)}) > 1


def synthetic_cache(folder: Path, n_shards: int, rows: int = 2) -> None:
    """n_shards tiny shards in two buckets, in the cache's format."""
    folder.mkdir(parents=True)
    shards, sizes = [], [(2, 3), (3, 2)]
    for k in range(n_shards):
        b = k % 2
        name = f"shard_{k:05d}_{b}.safetensors"
        tensors = {"student": torch.full((rows, 4, *sizes[b]), float(k)), "y": torch.zeros(rows, 8)}
        save_file(
            tensors, folder / name
        )  # no fsync per file, unlike save_ckpt: 2000 files in seconds
        shards.append({"file": name, "rows": rows, "bucket": b})
    buckets = [
        {
            "size": [h * 32, w * 32],
            "count": rows * (n_shards // 2),
            "shapes": {"student": [4, h, w], "y": [8]},
        }
        for h, w in sizes
    ]
    meta = {
        "count": rows * n_shards,
        "shards": shards,
        "buckets": buckets,
        "shapes": buckets[0]["shapes"],
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    save_ckpt({"y": torch.zeros(1, 8)}, folder / "null.safetensors")


PROBE = textwrap.dedent(
    """
    import json, sys, psutil
    from data import BucketSampler, LatentCache
    rss = lambda: psutil.Process().memory_info().rss
    import torch; torch.zeros(1)
    base = rss()
    cache = LatentCache(sys.argv[1], max_open=16)
    opened = rss()
    sampler = BucketSampler(cache.counts(), 8, seed=0)
    for step in range(400):
        bucket, rows = sampler.batch_of(step)
        batch = cache.get(rows, ["student", "y"], bucket)
        assert batch["student"].shape[0] == 8
    print(json.dumps({"open": opened - base, "read": rss() - opened, "handles": len(cache.handles)}))
    """
)


def test_the_cache_streams_memory_flat_in_the_number_of_shards(tmp_path):
    """Opening a cache and reading 400 batches from it costs the same memory with 2000 shards as with
    20: no per-row table at open, at most max_open shards open at a time."""
    found = {}
    for n in (20, 2000):
        synthetic_cache(tmp_path / str(n), n)
        r = subprocess.run(
            [sys.executable, "-c", PROBE, str(tmp_path / str(n))],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        found[n] = json.loads(r.stdout.strip().splitlines()[-1])
    print(found)  # bytes of RSS growth: opening, then reading
    assert found[2000]["handles"] <= 16
    assert found[2000]["open"] - found[20]["open"] < 4 * 2**20
    assert found[2000]["read"] - found[20]["read"] < 8 * 2**20
