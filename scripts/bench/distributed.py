"""Benchmark data-parallel training (issue 7): `saekit train` in one process against
`torchrun --nproc-per-node 2` with the same global batch, steps and seed, on CPU (gloo).

The cache is synthetic (scripts/bench/train.py's: d_in 512, 65,536 rows). Each run's training
time is the `elapsed_s` of its last metrics line (the loop only: no startup, no final save); the
wall time of the whole command is shown too. The single process runs with all --threads; the
ranks with --threads / 2 each, so both use the same cores.

    python -m saekit.scripts.bench.distributed [--features 4096] [--batch-size 4096] [--steps 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from saekit.scripts.bench.train import write_synthetic_cache

REPO = Path(__file__).resolve().parents[2]


def run(
    cache: Path, out: Path, args: argparse.Namespace, ranks: int, threads: int
) -> tuple[float, float]:
    """(training seconds, wall seconds) of one `saekit train`."""
    cmd = [sys.executable, "-m", "saekit", "train", "--cache", str(cache), "--out", str(out),
           "--features", str(args.features), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--log-every", str(args.steps), "--checkpoint-every", "0",
           "--resample", "none"]  # fmt: skip
    if ranks > 1:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(ranks), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["elapsed_s"], wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_synthetic_cache(Path(tmp) / "cache")
        rows = [
            ("1 process", 1, args.threads),
            (f"torchrun, 2 ranks x {args.threads // 2} thread(s)", 2, max(1, args.threads // 2)),
        ]
        results = []
        for i, (name, ranks, threads) in enumerate(rows):
            results.append((name, *run(cache, Path(tmp) / f"run{i}", args, ranks, threads)))
    base = results[0][1]
    print(
        f"relu_l1, d_sae {args.features}, d_in 512, global batch {args.batch_size}, {args.steps} steps, float32, CPU"
    )
    print("| run | train s | steps/s | speed-up | wall s (with startup) |")
    print("|---|---|---|---|---|")
    for name, train_s, wall in results:
        print(
            f"| {name} | {train_s:.2f} | {args.steps / train_s:.1f} | {base / train_s:.2f}x | {wall:.1f} |"
        )


if __name__ == "__main__":
    main()
