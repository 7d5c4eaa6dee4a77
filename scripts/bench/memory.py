"""Peak memory of training against its estimate (issue 23): training/memory.py's `train_bytes`
beside the measured peak RSS of a short real run (a few steps, a checkpoint, the final save) on
synthetic activations, each size in a fresh process so that each peak is clean. The process'
RSS just before training (torch, saekit and the source loaded) is subtracted from its peak, and
the peak is reset there (/proc/self/clear_refs), so that loading them does not count.

    python -m saekit.scripts.bench.memory                      # the default sizes
    python -m saekit.scripts.bench.memory --sizes 256x65536x2048:relu_l1 512x32768x4096:topk

A size is D_INxFEATURESxBATCH[:ARCH]. tests/test_memory.py runs `measure` at small sizes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = ["128x16384x1024:relu_l1", "256x32768x1024:relu_l1", "256x32768x1024:topk",
         "512x32768x2048:relu_l1", "256x16384x1024:gated"]  # fmt: skip


def rss_now() -> int:
    """This process' resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """This process' peak RSS since the last `reset_peak` (VmHWM). Not ru_maxrss: that keeps the
    largest RSS of the process before its exec, and a child forked by a large parent (pytest
    after a few hundred tests) would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak() -> None:
    """Start the peak RSS (VmHWM, and so ru_maxrss) afresh at the current RSS (Linux >= 4.0), so
    that loading torch and the source does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child(spec: dict) -> dict:
    """Run one short training and return its peak RSS over the baseline, and the estimate."""
    import torch

    from saekit.sae.archs import ARCHS
    from saekit.training.config import TrainConfig
    from saekit.training.memory import train_bytes
    from saekit.training.trainer import open_source, train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            out=str(Path(tmp) / "run"),
            synthetic=[f"d_in={spec['d_in']}", "n_features=256", "planted=1e-4"],
            arch=spec["arch"],
            features=spec["features"],
            batch_size=spec["batch"],
            steps=4,
            checkpoint_every=2,
            log_every=2,
            resample_inputs=spec.get("resample_inputs", 8192),
            # anthropic resampling of (almost) every feature, so that its chunk is measured
            resample_below=1.0 if ARCHS[spec["arch"]].resample == "anthropic" else None,
            resample_steps=[1] if ARCHS[spec["arch"]].resample == "anthropic" else None,
        )
        source = open_source(cfg)
        res = cfg.resolve(source.d_in, source.mean_norm, source.n_rows)
        reset_peak()
        base = rss_now()
        train(cfg, source)
    peak = peak_rss()
    return {**spec, "measured": peak - base, "estimate": train_bytes(cfg, res), "base": base}


def measure(d_in: int, features: int, batch: int, arch: str = "relu_l1", **extra) -> dict:
    """`_child` in a fresh interpreter: {d_in, features, batch, arch, measured, estimate, base}
    (bytes)."""
    spec = {"d_in": d_in, "features": features, "batch": batch, "arch": arch, **extra}
    env_cmd = [sys.executable, "-m", "saekit.scripts.bench.memory", "--child", json.dumps(spec)]
    p = subprocess.run(env_cmd, capture_output=True, text=True, check=False,
                       env={"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore",
                            **__import__("os").environ})  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"measuring {spec} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def parse_size(s: str) -> dict:
    dims, _, arch = s.partition(":")
    d_in, features, batch = (int(v) for v in dims.split("x"))
    return {"d_in": d_in, "features": features, "batch": batch, "arch": arch or "relu_l1"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=SIZES)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    print(
        "| d_in | features | batch | arch | measured peak (MB) | estimate (MB) | estimate / measured |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in args.sizes:
        r = measure(**parse_size(s))
        print(f"| {r['d_in']} | {r['features']} | {r['batch']} | {r['arch']} | "
              f"{r['measured'] / 1e6:,.0f} | {r['estimate'] / 1e6:,.0f} | "
              f"{r['estimate'] / r['measured']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
