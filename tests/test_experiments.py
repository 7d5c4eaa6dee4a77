"""The synthetic rare-feature experiment (scripts/experiments/synthetic_rare.py): a tiny end-to-end
run, and the per-arm aggregation on planted numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from saekit.sae.errors import SaekitError
from saekit.scripts.experiments.synthetic_rare import (
    SyntheticRareConfig,
    _cell,
    aggregate,
    synthetic_rare,
)


def _result(arm: str, seed: int, fvu: float, rare_n: int, resolved: bool = True) -> dict:
    live = {"n": rare_n, "real_rare": rare_n, "unresolved": 0, "imprecise": 0, "absorbed": 0,
            "artifact": 0}  # fmt: skip
    return {
        "variant": "standard", "arm": arm, "seed": seed, "baseline_trend": -0.3, "fvu": fvu, "l0": 2.0, "dead": seed,
        "held_out": 0, "n_matched": 10, "n_rare_resolved": resolved, "rare_live": live,
        "below": {"n": 3, "matched_rare": 1, "matched_frequent": 0, "unmatched": 2},
        "recovery": [{"p_lo": 1e-5, "recall": 0.5 * seed}],
        "trajectory": {"rare": {"n": 4, "falling": seed, "died": 0, "settled": 0,
                                "unresolved": 4 - seed, "n_tested": 4}},
    }  # fmt: skip


def test_aggregate_gives_mean_and_range_over_seeds_and_unresolved_when_a_seed_cannot_say():
    rs = [_result("off", s, f, 2) for s, f in ((0, 0.1), (1, 0.2), (2, 0.6))]
    rs += [_result("below", 0, 0.1, 5), _result("below", 1, 0.1, 7, resolved=False)]
    by = {a["arm"]: a for a in aggregate(rs)}
    off = by["off"]["stats"]
    assert off["fvu"] == pytest.approx({"mean": 0.3, "min": 0.1, "max": 0.6, "n": 3})
    assert off["dead"]["mean"] == 1 and off["traj_rare_falling"]["max"] == 2
    assert off["recall_1e-05"]["max"] == 1.0 and by["off"]["seeds"] == [0, 1, 2]
    # One seed's window could not resolve 1e-5: the count is not reported, for the whole arm.
    assert by["below"]["stats"]["rare_n"] is None and by["below"]["stats"]["fvu"]["n"] == 2
    assert _cell(None) == "unresolved" and _cell(off["fvu"]) == "0.3 (0.1..0.6)"


def test_tiny_study_runs_end_to_end_and_reuses_finished_runs(tmp_path):
    cfg = SyntheticRareConfig(
        out=str(tmp_path / "exp"), features=32, steps=40, batch_size=512, arms=["off", "below"],
        control_arms=[], seeds=[0], resample_at=[0.5], density_window=2048, pool_tokens=4096,
        burn_in_tokens=2048, resample_below=1e-2,
    )  # fmt: skip
    out = synthetic_rare(cfg)
    doc = json.loads((out / "results.json").read_text())
    assert [(r["arm"], r["seed"]) for r in doc["runs"]] == [("off", 0), ("below", 0)]
    below = doc["runs"][1]
    assert below["tokens"] == 40 * 512 and 0 <= below["fvu"] < 2 and below["l0"] > 0
    assert below["n_matched"] >= 0 and sum(b["n_true"] for b in below["recovery"]) == 128
    assert set(below["trajectory"]) >= {"control", "rare"}
    assert set(below["planted"]) == {"1e-04", "1e-05", "1e-06"}
    assert all(0 <= v <= 16 for v in below["planted"].values())
    assert doc["runs"][0]["held_out"] == 0  # no resampling in the off arm
    md = (out / "results.md").read_text()
    assert "| standard | below | 1 |" in md and "Recall of true features" in md
    # A second call reuses the finished runs (same numbers, no retraining).
    stamp = (out / "runs" / "standard-off-s0" / "result.json").stat().st_mtime_ns
    again = json.loads((synthetic_rare(cfg) / "results.json").read_text())
    assert again["runs"] == doc["runs"]
    assert (out / "runs" / "standard-off-s0" / "result.json").stat().st_mtime_ns == stamp
    with pytest.raises(SaekitError, match="arms"):
        synthetic_rare(SyntheticRareConfig(out=str(tmp_path / "x"), arms=["sometimes"]))


def test_calibration_runs_on_a_regime_given_as_tokens_x_windows():
    from saekit.scripts.experiments.calibrate_trajectory import parse_regime, run_scenario

    assert parse_regime("131072x31") == (131072, 31)
    row = run_scenario("constant 1e-5", "1000000x20", 500, seed=1)
    assert row["n"] == 500 and row["falling"] == 0 and row["died"] == 0
    assert row["firings"] == pytest.approx(200, rel=0.2)  # 1e-5 x 2e7 tokens, minus burn-in
    for bad in ("131072", "x31", "131072x1", "ax3"):
        with pytest.raises(SaekitError, match="TOKENSxWINDOWS"):
            parse_regime(bad)


def test_experiment_overwrite_removes_only_its_own_entries(tmp_path):
    from saekit.scripts.experiments import clear_out
    from saekit.scripts.experiments.rare_features import OWN

    out, other = tmp_path / "exp", tmp_path / "other"
    (out / "run").mkdir(parents=True)
    (out / "run" / "sae.safetensors").write_bytes(b"x")
    (out / "experiment.json").write_text("{}")
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (out / "report").symlink_to(other, target_is_directory=True)
    with pytest.raises(SaekitError, match="not empty"):
        clear_out(out, False, OWN)
    clear_out(out, True, OWN)
    assert list(out.iterdir()) == [] and (other / "keep.txt").read_text() == "mine"
    (out / "thesis.tex").write_text("years of work")
    (out / "run").mkdir()
    with pytest.raises(SaekitError, match="thesis.tex"):
        clear_out(out, True, OWN)
    assert (out / "thesis.tex").exists() and (out / "run").is_dir()


def test_arch_rare_groups_seeds_by_arch_and_counts_what_the_reports_say(tmp_path):
    from saekit.scripts.experiments.arch_rare import ArchRareConfig, arch_rare
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import train

    study = synthetic_rare(
        SyntheticRareConfig(
            out=str(tmp_path / "topk"),
            arch="topk",
            k=2,
            features=32,
            steps=30,
            batch_size=512,
            arms=["off"],
            control_arms=[],
            seeds=[0, 1],
            density_window=2048,
            pool_tokens=4096,
            burn_in_tokens=2048,
        )  # fmt: skip
    )
    runs = [
        train(
            TrainConfig(
                out=str(tmp_path / f"r{s}"),
                synthetic=["d_in=16", "n_features=64", "planted_per_block=2"],
                features=24,
                steps=30,
                batch_size=256,
                density_window=1024,
                seed=s,
                checkpoint_every=0,
                resample="none",
            )
        )  # fmt: skip
        for s in (3, 4)
    ]
    cfg = ArchRareConfig(out=str(tmp_path / "t"), synthetic=[str(study)],
                         runs=[str(r) for r in runs], min_window_tokens=2048, rare_threshold=0.05)  # fmt: skip
    doc = json.loads((arch_rare(cfg) / "results.json").read_text())
    (syn,) = doc["synthetic"]
    per_seed = json.loads((study / "results.json").read_text())["runs"]
    assert syn["arch"] == "topk" and syn["k"] == 2 and syn["seeds"] == [0, 1]
    l0 = [r["l0"] for r in per_seed]
    assert syn["stats"]["L0"]["min"] == min(l0) and syn["stats"]["L0"]["max"] == max(l0)
    assert syn["stats"]["ultra-rare (< 1e-6)"] is None  # 4,096 pooled tokens cannot resolve it
    (group,) = doc["run_groups"]
    assert group["arch"] == "relu_l1" and group["seeds"] == [3, 4]
    for n in doc["runs"]:  # the rare count is the report's features below the threshold
        rep = tmp_path / "t" / "reports" / f"{Path(n['run']).parent.name}-{Path(n['run']).name}"
        with open(rep / "features.csv", newline="") as f:
            dens = [float(r["density"]) for r in csv.DictReader(f)]
        assert n["rare"] == sum(0 < d < 0.05 for d in dens) and n["dead"] == dens.count(0.0)
    assert "| topk | k 2 | standard | off | 30 | 2 |" in (tmp_path / "t" / "results.md").read_text()
    with pytest.raises(SaekitError, match="results.json not found"):
        arch_rare(ArchRareConfig(out=str(tmp_path / "u"), synthetic=[str(tmp_path)]))
