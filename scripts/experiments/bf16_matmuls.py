"""Does training with bfloat16 matmuls reach the SAE float32 training reaches? (issue 21)

Train the same relu_l1 SAE on the default model's mlp_post twice, same seed, steps and data:
float32 throughout, and with `--matmul-dtype bfloat16` (float32 weights, Adam state and loss).
Then `saekit evaluate` both on the held-out split and compare FVU and L0 (target: within 2%).

    python -m saekit.scripts.experiments.bf16_matmuls                      # ~10-15 min on 2 cores
    python -m saekit.scripts.experiments.bf16_matmuls --cache /tmp/exp/cache_mlp --seeds 0 1 2

The recipe is docs/benchmarks.md's best relu_l1 on this site (2048 features, batch 1024, lr 4e-3,
λ 0.9 warmed up over 10%, lr decayed over the last 20%, 3000 steps): L0 ~37, where the step runs
sparse after the first windows. Outputs in --out: cache/ (unless --cache), runs/<seed>-<dtype>/
(each with eval.json) and compare.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

RECIPE = ["--arch", "relu_l1", "--features", "2048", "--batch-size", "1024", "--lr", "4e-3",
          "--l1-coef", "0.9", "--l1-warmup", "0.1", "--lr-decay", "0.2", "--log-every", "100",
          "--checkpoint-every", "0"]  # fmt: skip


@dataclass
class Bf16MatmulsConfig:
    """Train float32 and bfloat16-matmul SAEs with the same seed and compare FVU and L0."""

    out: str = "saekit-bf16-matmuls"
    """output dir (cache/, runs/, compare.json)"""
    cache: str | None = None
    """an mlp_post cache of the default model to use (None: build one in OUT/cache)"""
    tokens: int = 950_000
    """tokens to cache when building one (the default corpus' whole train split at context 128)"""
    steps: int = 3000
    """training steps of each run"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """seeds: one float32 and one bfloat16 run each"""
    eval_tokens: int = 65_536
    """held-out tokens for `saekit evaluate`"""


def _row(run: Path) -> dict:
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    ev = json.loads((run / "eval.json").read_text())
    return {"fvu": ev["fvu_pooled"], "l0": ev["l0"], "fvu_last_batch": last["fvu"],
            "l0_last_batch": last["l0"], "dead": last["dead"], "train_s": last["elapsed_s"]}  # fmt: skip


def run(cfg: Bf16MatmulsConfig) -> dict:
    from saekit.scripts.cli import main as cli

    out = Path(cfg.out)
    cache = Path(cfg.cache) if cfg.cache else out / "cache"
    if not cfg.cache and not (cache / "manifest.json").is_file():
        cli(["cache", "--out", str(cache), "--site", "mlp_post", "--tokens", str(cfg.tokens)])
    result: dict = {"recipe": " ".join(RECIPE), "steps": cfg.steps, "runs": {}}
    for seed in cfg.seeds:
        for dtype in ("float32", "bfloat16"):
            r = out / "runs" / f"{seed}-{dtype}"
            if not (r / "eval.json").is_file():
                extra = ["--matmul-dtype", "bfloat16"] if dtype == "bfloat16" else []
                cli(["train", "--cache", str(cache), "--out", str(r), "--steps", str(cfg.steps),
                     "--seed", str(seed), "--overwrite", *RECIPE, *extra])  # fmt: skip
                cli(["evaluate", "--run", str(r), "--tokens", str(cfg.eval_tokens)])
            result["runs"][f"{seed}-{dtype}"] = _row(r)
    print(f"{'run':14s} {'FVU (held out)':>15s} {'L0 (held out)':>14s} {'FVU last':>9s} "
          f"{'L0 last':>8s} {'dead':>5s} {'train s':>8s}")  # fmt: skip
    for name, m in result["runs"].items():
        print(f"{name:14s} {m['fvu']:15.4f} {m['l0']:14.2f} {m['fvu_last_batch']:9.4f} "
              f"{m['l0_last_batch']:8.2f} {m['dead']:5d} {m['train_s']:8.1f}")  # fmt: skip
    for seed in cfg.seeds:
        a, b = result["runs"][f"{seed}-float32"], result["runs"][f"{seed}-bfloat16"]
        rel = {k: b[k] / a[k] - 1 for k in ("fvu", "l0")}
        result[f"seed {seed}: bfloat16 / float32 - 1"] = rel
        ok = all(abs(v) <= 0.02 for v in rel.values())
        print(f"seed {seed}: bfloat16 vs float32: FVU {rel['fvu']:+.2%}, L0 {rel['l0']:+.2%} "
              f"({'within' if ok else 'NOT within'} 2%)")  # fmt: skip
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    from saekit.scripts.cli import run_script

    run_script("saekit.scripts.experiments.bf16_matmuls", __doc__, Bf16MatmulsConfig, run, argv)


if __name__ == "__main__":
    main()
