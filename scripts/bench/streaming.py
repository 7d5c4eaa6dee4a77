"""Benchmark training from a source (issue 17): synthetic training end to end, and a live model
against cache-then-train.

1. `saekit train --model synthetic` (SyntheticConfig's defaults: d_in 64, 512 true features) with
   1,024 features, relu_l1 and topk, at each --batch-size in --batch-sizes: tokens/s over the
   whole run (the trainer's own clock: data, steps, density tracking, logging), and the minutes
   1e8 tokens would take at that rate.
2. The default model's mlp_post, --tokens tokens: `saekit cache` then `saekit train --cache`,
   against `saekit train --model default` on the same number of tokens, same SAE (relu_l1,
   expansion 8, batch 4096). Wall time of each pipeline, in one process, one after the other.

No checkpoints, resampling off, so only the data path and the step are timed.

    python -m saekit.scripts.bench.streaming [--steps 300] [--tokens 409600]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

from saekit.activations.cache import build_cache
from saekit.activations.cache_config import CacheConfig
from saekit.training.config import TrainConfig
from saekit.training.trainer import train


def run(tmp: Path, name: str, **kw) -> float:
    """Seconds the trainer reports for its loop (it prints them in its last line)."""
    err = io.StringIO()
    common = dict(checkpoint_every=0, log_every=100, resample="none")
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        train(TrainConfig(out=str(tmp / name), **{**common, **kw}))
    last = err.getvalue().strip().splitlines()[-1]
    return float(last.split(" in ")[1].split("s;")[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="steps of each synthetic run")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--tokens", type=int, default=409_600, help="tokens of the live/cache runs")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for arch in ("relu_l1", "topk"):
            for B in a.batch_sizes:
                s = run(tmp, f"syn-{arch}-{B}", model="synthetic", arch=arch, features=1024,
                        steps=a.steps, batch_size=B)  # fmt: skip
                rate = a.steps * B / s
                print(f"synthetic {arch}, 1024 features, batch {B}: {rate:,.0f} tokens/s; "
                      f"1e8 tokens in {1e8 / rate / 60:.1f} min")  # fmt: skip
        steps = a.tokens // 4096
        t0 = time.perf_counter()
        with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            build_cache(CacheConfig(out=tmp / "cache", tokens=steps * 4096))
        t_cache = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(tmp, "from-cache", cache=str(tmp / "cache"), steps=steps)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(tmp, "live", model="default", steps=steps)
        t_live = time.perf_counter() - t0
        n = steps * 4096
        print(f"default model mlp_post, {n:,} tokens, 4096 features: cache {t_cache:.1f}s + "
              f"train {t_train:.1f}s = {t_cache + t_train:.1f}s ({n / (t_cache + t_train):,.0f} tokens/s); "
              f"live {t_live:.1f}s ({n / t_live:,.0f} tokens/s); live / (cache + train) = "
              f"{t_live / (t_cache + t_train):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
