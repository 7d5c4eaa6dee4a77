"""Benchmark `saekit cache`: throughput against the bare forward pass, and peak memory.

1. Caches the default model's `mlp_post` (--tokens, default 1M) and, in the same run, times the
   bare forward pass (`stop_at_layer=layer+1`, same contexts, same batches), alternating bare,
   to-the-hook (below), cache, bare, to-the-hook, cache, ..., bare, to-the-hook (--rounds cache
   runs). Each cache run writes a new dir (as a
   user's does; deleting the last one first would make the filesystem discard its blocks during
   the next run). The ratio (cache / bare throughput, target >= 0.85) is taken per cache run
   against the mean of the two bare runs either side of it, and the median over runs is
   reported: this machine's speed drifts by +-15% within minutes, which pairing cancels. The
   fastest-against-fastest and CPU-time ratios are printed too. The cache's forward stops at the
   last hook it needs, which the bare pass (`stop_at_layer`, as the issue defines it) does not:
   so the same ratios are also printed against that shorter forward without storing anything
   (`forward_to_hook`), i.e. the cost of storing alone.
2. Runs `saekit cache` for --rss-tokens (default 2M) of mlp_post in a subprocess and prints its
   peak resident memory (target < 2 GB).

The KJV train split holds about 1M tokens of the default tokenizer, so the corpus here is the
whole KJV (train and test chapters) repeated as often as needed, written to a temp text file
(one chapter per line). Repeated text costs the same to run and store as new text.

    python -m saekit.scripts.bench.cache [--tokens 1000000] [--rounds 5] [--rss-tokens 2000000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from saekit.activations.cache_config import CacheConfig
from saekit.activations.cache_writer import keep_freed_memory, prepare_cache, run_cache
from saekit.activations.corpus import load_texts
from saekit.activations.sites import harvest_flat


def write_corpus(path: Path, min_tokens: int) -> Path:
    chapters = list(load_texts("default", "train")["text"]) + list(
        load_texts("default", "test")["text"]
    )
    # ~0.75 default-tokenizer tokens per character is generous; repeat until surely enough
    chars = sum(len(c) for c in chapters)
    reps = max(1, -(-min_tokens * 4 // chars) + 1)
    path.write_text("\n".join(chapters * reps) + "\n")
    return path


def timed(f, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all threads of this process) of f(*args)."""
    wall, cpu = time.perf_counter(), time.process_time()
    f(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def bare_forward(job) -> None:
    """The forward passes the cache makes, without reading or storing anything."""
    model, B = job.model, job.cfg.batch_size
    stop = max(s.stop_at_layer for s in job.sites)
    with torch.inference_mode():
        for b0 in range(0, len(job.ctx), B):
            model(job.ctx[b0 : b0 + B].to(job.cfg.device), stop_at_layer=stop)


def forward_to_hook(job) -> None:
    """The forward passes as the cache runs them (stopped at the last hook, rows selected),
    without storing anything: what caching adds on top of its own forward pass."""
    B = job.cfg.batch_size
    for b0 in range(0, len(job.ctx), B):
        idx = job.keep[b0 : b0 + B].reshape(-1).nonzero().squeeze(1)
        harvest_flat(job.model, job.ctx[b0 : b0 + B].to(job.cfg.device), idx, job.sites)


def paired(runs: list[tuple[float, float]], base: list[tuple[float, float]]) -> list[float]:
    """Each run's speed against the mean wall time of the base runs either side of it."""
    return [(base[i][0] + base[i + 1][0]) / 2 / w for i, (w, _) in enumerate(runs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--rss-tokens", type=int, default=2_000_000, help="0: skip the memory run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="cache runs, each between two bare runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # run_cache does this; do it for the bare passes too (fewer page faults)
    print(
        f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        corpus = write_corpus(Path(tmp) / "kjv_repeated.txt", max(args.tokens, args.rss_tokens) * 2)
        cfg = CacheConfig(
            out=Path(tmp) / "cache",
            dataset=str(corpus),
            tokens=args.tokens,
            batch_size=args.batch_size,
            context_size=args.context_size,
        )
        job = prepare_cache(cfg)
        with torch.inference_mode():  # warm-up
            job.model(job.ctx[: args.batch_size], stop_at_layer=1)
        bare, hook, cached = [timed(bare_forward, job)], [timed(forward_to_hook, job)], []
        for r in range(args.rounds):
            job = prepare_cache(dataclasses.replace(cfg, out=Path(tmp) / f"cache-{r}"))
            cached.append(timed(run_cache, job))
            bare.append(timed(bare_forward, job))
            hook.append(timed(forward_to_hook, job))
        n_bytes = sum(s["bytes"] for s in job.writers[0].manifest["shards"])
        del job
        for r in range(args.rounds):
            shutil.rmtree(Path(tmp) / f"cache-{r}")
        n = args.tokens
        for name, runs in (("bare forward", bare), ("to the hook", hook), ("cache", cached)):
            print(
                f"{name:13s}: {n / min(w for w, _ in runs):8,.0f} tokens/s (fastest run); "
                f"wall/CPU s per run: {', '.join(f'{w:.2f}/{c:.1f}' for w, c in runs)}"
            )
        print(f"cache writes {n_bytes / 1e9:.2f} GB per run")
        for name, base, target in (("bare", bare, "; target >= 0.85"), ("to-the-hook", hook, "")):
            ratios = paired(cached, base)
            fastest = min(w for w, _ in base) / min(w for w, _ in cached)
            cpu = min(c for _, c in base) / min(c for _, c in cached)
            print(
                f"ratio cache/{name}: {statistics.median(ratios):.3f} (median of {len(ratios)} runs,"
                f" each against its neighbouring {name} runs: {', '.join(f'{r:.2f}' for r in ratios)}"
                f"{target}); fastest/fastest {fastest:.3f}; CPU time {cpu:.3f}",
                flush=True,
            )

        if not args.rss_tokens:
            return
        out = Path(tmp) / "rss"
        cmd = [
            sys.executable, "-m", "saekit", "cache", "--out", str(out), "--dataset", str(corpus),
            "--tokens", str(args.rss_tokens), "--batch-size", str(args.batch_size),
            "--context-size", str(args.context_size),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, env=env)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
        print(
            f"peak RSS caching {args.rss_tokens:,} tokens of mlp_post: {peak_gb:.2f} GB (target < 2 GB)"
        )


if __name__ == "__main__":
    main()
