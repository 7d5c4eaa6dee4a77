"""Benchmark `saekit cache`: throughput against the bare forward pass, and peak memory.

1. Caches the default model's `mlp_post` (--tokens, default 1M) into a temp dir and, in the same
   run, times the bare forward pass (`stop_at_layer=layer+1`, same batches, same contexts),
   alternating bare, cache, bare, cache, bare; prints both throughputs (fastest run of each) and
   their ratio (cache / bare, target >= 0.85).
2. Runs `saekit cache` for --rss-tokens (default 2M) of mlp_post in a subprocess and prints its
   peak resident memory (target < 2 GB).

The KJV train split holds about 1M tokens of the default tokenizer, so the corpus here is the
whole KJV (train and test chapters) repeated as often as needed, written to a temp text file
(one chapter per line). Repeated text costs the same to run and store as new text.

    python -m scripts.bench_cache [--tokens 1000000] [--rss-tokens 2000000] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from activations.cache import CacheConfig, prepare_cache, run_cache
from activations.corpus import load_texts


def write_corpus(path: Path, min_tokens: int) -> Path:
    chapters = list(load_texts("default", "train")["text"]) + list(
        load_texts("default", "test")["text"]
    )
    # ~0.75 default-tokenizer tokens per character is generous; repeat until surely enough
    chars = sum(len(c) for c in chapters)
    reps = max(1, -(-min_tokens * 4 // chars) + 1)
    path.write_text("\n".join(chapters * reps) + "\n")
    return path


def bare_forward(job, repeats: int = 1) -> float:
    """Seconds for the forward passes the cache makes, without reading or storing anything."""
    model, B = job.model, job.cfg.batch_size
    stop = max(s.stop_at_layer for s in job.sites)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats):
            for b0 in range(0, len(job.ctx), B):
                model(job.ctx[b0 : b0 + B].to(job.cfg.device), stop_at_layer=stop)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--rss-tokens", type=int, default=2_000_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="cache runs, each followed by a bare run")
    args = p.parse_args()
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
        # The machine may be shared: alternate bare and cached passes and compare the fastest.
        job = prepare_cache(cfg)
        with torch.inference_mode():  # warm-up
            job.model(job.ctx[: args.batch_size], stop_at_layer=1)
        bare, cached = [bare_forward(job)], []
        for _ in range(args.rounds):
            job = prepare_cache(dataclasses.replace(cfg, overwrite=True))
            cached.append(run_cache(job))
            bare.append(bare_forward(job))
        n_bytes = sum(s["bytes"] for s in job.writers[0].manifest["shards"])
        t_bare, t_cache = min(bare), min(cached)
        print(
            f"bare forward : {args.tokens / t_bare:10,.0f} tokens/s (runs: {', '.join(f'{t:.1f}s' for t in bare)})"
        )
        print(
            f"cache        : {args.tokens / t_cache:10,.0f} tokens/s (runs: {', '.join(f'{t:.1f}s' for t in cached)}; "
            f"{n_bytes / 1e9:.2f} GB written per run)"
        )
        print(f"ratio cache/bare (fastest runs): {t_bare / t_cache:.3f}  (target >= 0.85)")
        print(
            f"ratio cache/bare (medians): {statistics.median(bare) / statistics.median(cached):.3f}",
            flush=True,
        )
        del job

        out = Path(tmp) / "rss"
        cmd = [
            sys.executable, "-m", "scripts.cli", "cache", "--out", str(out), "--dataset", str(corpus),
            "--tokens", str(args.rss_tokens), "--batch-size", str(args.batch_size),
            "--context-size", str(args.context_size),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
        print(
            f"peak RSS caching {args.rss_tokens:,} tokens of mlp_post: {peak_gb:.2f} GB (target < 2 GB)"
        )


if __name__ == "__main__":
    main()
