"""Rare features across architectures: one table from several runs of each (issue 20, item 4).

    # the synthetic source: one synthetic_rare study per arch, then the table across them
    python -m saekit.scripts.experiments.synthetic_rare --out S/topk --arms off --control-arms \\
        --seeds 0 1 2 3 4 --arch topk --k 2                        # and so on per arch
    python -m saekit.scripts.experiments.arch_rare --synthetic S/relu_l1 S/topk ... --out OUT

    # the default model: trained runs (e.g. arch_quality's), diagnosed here on pooled windows
    python -m saekit.scripts.experiments.arch_rare --runs RUN ... --out OUT

Runs are grouped by arch (and, for synthetic studies, by variant and arm); every number is the
mean (min..max) over the group's seeds. Synthetic studies are tabulated from their results.json
(ground truth: which rare SAE features are real). Trained runs have no ground truth: each is
diagnosed (`saekit diagnose`, the last windows pooled to --min-window-tokens, logits off) and
tabulated by density class, D/E projection and encoder bias of rare against live features, and
the trajectory test's rare group. Writes OUT/results.json and OUT/results.md; a run whose report
exists in OUT/reports is not diagnosed again.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from saekit.sae.archs import ARCHS
from saekit.sae.errors import SaekitError
from saekit.scripts.experiments.synthetic_rare import _cell, _flatten, _stat
from saekit.training.density import RESOLVE_FIRINGS, resolves


@dataclass
class ArchRareConfig:
    """Tabulate rare features per architecture across seeds, from synthetic_rare studies or
    trained run dirs."""

    out: str = "saekit-arch-rare"
    """output dir (results.json, results.md, reports/ of diagnosed runs)"""
    synthetic: list[str] = field(default_factory=list)
    """synthetic_rare output dirs (one per arch or coefficient)"""
    runs: list[str] = field(default_factory=list)
    """trained run dirs (no ground truth): diagnosed and tabulated by arch"""
    min_window_tokens: int = 500_000
    """runs: diagnose pools the last density windows until they hold this many tokens"""
    rare_threshold: float = 1e-4
    """runs: features firing below this density on the pool are `rare` (and the trajectory
    test's rare group)"""
    burn_in_tokens: int = 131_072
    """runs: the trajectory test skips this many tokens after each feature's segment start"""
    device: str = "cpu"
    """torch device for diagnose"""


SYN_COLS = {  # column title: the flattened result's key (synthetic_rare._flatten)
    "L0": "l0", "FVU": "fvu", "true feats matched": "n_matched", "dead (pool)": "dead", "SAE feats < 1e-5": "rare_n",
    "real_rare": "rare_real_rare", "artifact": "rare_artifact",
    "planted 1e-4": "planted_1e-04", "planted 1e-5": "planted_1e-05", "planted 1e-6": "planted_1e-06",
    "recall, p in [1e-4, 1e-3)": "recall_1e-04", "rare group n": "traj_rare_n",
    "tested": "traj_rare_n_tested", "falling": "traj_rare_falling", "died": "traj_rare_died",
    "settled": "traj_rare_settled", "median trend": "trend_rare",
    "baseline trend": "baseline_trend", "ultra-rare (< 1e-6)": "ultra_rare",
    "of which real_rare": "ultra_real_rare", "of which artifact": "ultra_artifact",
}  # fmt: skip


def ultra_rare(report: Path) -> dict[str, int | None]:
    """The report's ultra-rare count and those features' ground-truth classes (real_rare,
    artifact); None unless the pool resolves the threshold (training/density.py's resolves)."""
    s = json.loads((report / "summary.json").read_text())
    if not resolves(s["window"]["tokens"], s["thresholds"]["ultra_rare"]):
        return dict.fromkeys(("ultra_rare", "ultra_real_rare", "ultra_artifact"))
    with open(report / "features.csv", newline="") as f:
        classes = [r["gt_class"] for r in csv.DictReader(f) if r["class"] == "ultra_rare"]
    return {"ultra_rare": len(classes), "ultra_real_rare": classes.count("real_rare"),
            "ultra_artifact": classes.count("artifact")}  # fmt: skip


def synthetic_rows(dirs: list[str]) -> list[dict]:
    """Per (arch, coefficient, variant, arm) of the studies: each column's stat over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise SaekitError(f"{path} not found: run synthetic_rare with --out {d} first")
        res = json.loads(path.read_text())
        conf = res["config"]
        k = conf["k"] if conf["arch"] in ("topk", "batchtopk", "matryoshka") else None
        for r in res["runs"]:
            key = (conf["arch"], conf.get("l1_coef"), k, r["variant"], r["arm"], conf["steps"])
            rep = Path(d) / "runs" / f"{r['variant']}-{r['arm']}-s{r['seed']}" / "report"
            groups.setdefault(key, []).append(_flatten(r) | ultra_rare(rep) | {"seed": r["seed"]})
    rows = []
    for (arch, coef, k, variant, arm, steps), flat in groups.items():
        stats = {c: _stat([f.get(key) for f in flat]) for c, key in SYN_COLS.items()}
        rows.append({"arch": arch, "l1_coef": coef, "k": k, "variant": variant, "arm": arm,
                     "steps": steps, "seeds": sorted(f["seed"] for f in flat), "stats": stats})  # fmt: skip
    return rows


def _diagnosed(cfg: ArchRareConfig, run: Path) -> Path:
    from saekit.diagnostics.config import DiagnoseConfig
    from saekit.diagnostics.diagnose import diagnose

    rep = Path(cfg.out) / "reports" / f"{run.parent.name}-{run.name}"
    if not (rep / "summary.json").is_file():
        diagnose(
            DiagnoseConfig(
                run=str(run),
                out=str(rep),
                min_window_tokens=cfg.min_window_tokens,
                rare_threshold=cfg.rare_threshold,
                burn_in_tokens=cfg.burn_in_tokens,
                logits=False,
                device=cfg.device,
                overwrite=rep.exists(),
            )  # fmt: skip
        )
    return rep


def run_numbers(cfg: ArchRareConfig, run: Path) -> dict:
    """One trained run's numbers: held-out L0/FVU (eval.json when present), density classes on
    the pool, D/E and encoder bias of rare against live features, the rare group's test."""
    meta = json.loads((run / "saekit.json").read_text())
    rep = _diagnosed(cfg, run)
    s = json.loads((rep / "summary.json").read_text())
    with open(rep / "features.csv", newline="") as f:
        feats = [(float(r["density"]), float(r["de_projection"]), float(r["encoder_bias"]),
                  float(r["enc_dec_cosine"])) for r in csv.DictReader(f)]  # fmt: skip
    rare = [x for x in feats if 0 < x[0] < cfg.rare_threshold]
    live = [x for x in feats if x[0] >= cfg.rare_threshold]
    med = lambda xs, i: statistics.median(x[i] for x in xs) if xs else None  # noqa: E731
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    traj = s["trajectory_test"]["by_group"]["rare"]
    return {
        "run": str(run), "arch": meta["arch"], "seed": meta["train_config"]["seed"],
        "l1_coef": meta["train_config"].get("l1_coef"),
        "k": meta.get("k") if ARCHS[meta["arch"]].uses_k else None,
        "l0": ev.get("l0"), "fvu": ev.get("fvu_pooled"), "pool_tokens": s["window"]["tokens"],
        "resolves": RESOLVE_FIRINGS / s["window"]["tokens"], "dead": sum(x[0] == 0 for x in feats),
        "rare": len(rare) if resolves(s["window"]["tokens"], cfg.rare_threshold) else None, "de_rare": med(rare, 1), "de_live": med(live, 1),
        "bias_rare": med(rare, 2), "bias_live": med(live, 2), "cos_rare": med(rare, 3),
        "cos_live": med(live, 3), "rare_group": traj["n"],
        "tested": traj["n_tested"], **{o: traj["counts"][o] for o in ("falling", "died", "settled")},
    }  # fmt: skip


RUN_COLS = ("l0", "fvu", "dead", "rare", "de_rare", "de_live", "cos_rare", "cos_live",
            "bias_rare", "bias_live", "rare_group", "tested", "falling", "died", "settled")  # fmt: skip


def run_rows(cfg: ArchRareConfig) -> tuple[list[dict], list[dict]]:
    """Every run's numbers, and per (arch, coefficient) each column's stat over seeds."""
    from tqdm import tqdm

    numbers = [run_numbers(cfg, Path(r)) for r in tqdm(cfg.runs, desc="arch_rare")]
    groups: dict[tuple, list[dict]] = {}
    for n in numbers:
        groups.setdefault((n["arch"], n["l1_coef"], n["k"]), []).append(n)
    rows = [{"arch": a, "l1_coef": c, "k": k, "seeds": sorted(n["seed"] for n in ns),
             "stats": {col: _stat([n[col] for n in ns]) for col in RUN_COLS}}
            for (a, c, k), ns in groups.items()]  # fmt: skip
    return numbers, rows


def _flags(r: dict) -> str:
    return (
        f"k {r['k']}"
        if r["k"]
        else ("λ default" if r["l1_coef"] is None else f"λ {r['l1_coef']:g}")
    )


def markdown(cfg: ArchRareConfig, syn: list[dict], runs: list[dict], numbers: list[dict]) -> str:
    lines = []
    if syn:
        lines += ["Synthetic source, mean (min..max) over seeds:", "",
                  "| arch | flags | variant | arm | steps | seeds | " + " | ".join(SYN_COLS) + " |",
                  "|" + "---|" * (6 + len(SYN_COLS))]  # fmt: skip
        for r in syn:  # an ultra-rare count the pool cannot resolve is not given
            cells = [_cell(r["stats"][c], "{:.3g}", "unresolved" if "ultra" in key else "-")
                     for c, key in SYN_COLS.items()]  # fmt: skip
            lines.append(f"| {r['arch']} | {_flags(r)} | {r['variant']} | {r['arm']} | "
                         f"{r['steps']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")  # fmt: skip
        lines.append("")
    if runs:
        pool = sorted({n["pool_tokens"] for n in numbers})
        res = max(n["resolves"] for n in numbers)
        lines += [f"Trained runs, mean (min..max) over seeds; pooled windows of {pool[0]:,}.."
                  f"{pool[-1]:,} tokens ({RESOLVE_FIRINGS} firings at {res:.2g}); rare: below "
                  f"{cfg.rare_threshold:g} on the pool; D/E, encoder-decoder cosine and encoder bias are "
                  "medians (D/E depends on the arch's input scaling; the cosine does not):", "",
                  "| arch | flags | seeds | " + " | ".join(RUN_COLS) + " |",
                  "|" + "---|" * (3 + len(RUN_COLS))]  # fmt: skip
        for r in runs:
            cells = [_cell(r["stats"][c], "{:.3g}", "-") for c in RUN_COLS]
            lines.append(f"| {r['arch']} | {_flags(r)} | {len(r['seeds'])} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def arch_rare(cfg: ArchRareConfig) -> Path:
    from saekit.sae.io import atomic_write_json

    if not cfg.synthetic and not cfg.runs:
        raise SaekitError("give --synthetic STUDY_DIR ... and/or --runs RUN_DIR ...")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    syn = synthetic_rows(cfg.synthetic)
    numbers, runs = run_rows(cfg) if cfg.runs else ([], [])
    conf = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    atomic_write_json(out / "results.json",
                      {"config": conf, "synthetic": syn, "runs": numbers, "run_groups": runs})  # fmt: skip
    (out / "results.md").write_text(markdown(cfg, syn, runs, numbers))
    print((out / "results.md").read_text())
    return out


def main(argv: list[str] | None = None) -> None:
    from saekit.scripts.cli import run_script

    run_script("saekit.scripts.experiments.arch_rare", __doc__, ArchRareConfig, arch_rare, argv)


if __name__ == "__main__":
    main()
