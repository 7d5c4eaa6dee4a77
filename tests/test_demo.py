"""`saekit demo` end to end on reduced budgets: the synthetic default (the rare-feature story
with a known answer) and `--model default` (the bundled model, spliced and with text contexts)."""

import json

import pytest

from saekit.scripts.cli import main


@pytest.mark.slow
def test_demo_reduced_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    main(
        [
            "demo",
            "--model",
            "default",
            "--out",
            str(out),
            "--tokens",
            "200000",
            "--steps",
            "300",
            "--features",
            "1024",
            "--l1-coef",
            "0.5",
            "--eval-tokens",
            "16384",
        ]
    )
    printed = capsys.readouterr().out
    assert f"report: {out / 'report' / 'report.html'}" in printed
    for f in (
        "cache/manifest.json",
        "run/cfg.json",
        "run/sae_weights.safetensors",
        "run/density_history.safetensors",
        "run/eval.json",
        "report/report.html",
        "report/features.csv",
        "report/summary.json",
        "report/features.html",
        "report/features/index.js",
        "report/features/f-0000.js",
        "demo.json",
    ):
        assert (out / f).is_file(), f
    summary = json.loads((out / "report" / "summary.json").read_text())
    ev = json.loads((out / "run" / "eval.json").read_text())
    demo = json.loads((out / "demo.json").read_text())
    assert summary["counts"]["live"] > 0
    assert ev["fvu_pooled"] < 0.2
    assert ev["loss_recovered_zero"] > 0.8
    assert demo["live"] == summary["counts"]["live"] and demo["fvu"] == ev["fvu_pooled"]


@pytest.mark.slow
def test_synthetic_demo_reduced_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    # (a higher --resample-below than the default: 300 steps leave few features below 2e-4)
    main(["demo", "--out", str(out), "--steps", "300", "--features", "256", "--resample-below",
          "0.01", "--scan-tokens", "16384", "--eval-tokens", "16384"])  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = out / "report" / "report.html"
    assert last.startswith("demo: 256 features, ") and last.endswith(f"report: {report}"), last
    assert "real, " in last and "absorbed, " in last and "control group" in last
    for f in ("run/synthetic.json", "run/eval.json", "report/features.csv",
              "report/features.html", "report/features/index.js", "demo.json"):  # fmt: skip
        assert (out / f).is_file(), f
    assert not (out / "cache").exists()  # synthetic rows are made as training goes
    summary = json.loads((out / "report" / "summary.json").read_text())
    demo = json.loads((out / "demo.json").read_text())
    assert summary["ground_truth"]["matching"]["n_matched"] > 0
    assert demo["ground_truth"]["n"] == summary["ground_truth"]["rare"]["live"]["n"]
    assert demo["control"] == summary["held_out"] > 0  # resampling held a control group out
    assert summary["trajectory_test"]["by_group"]["control"]["n"] == demo["control"]
    html = report.read_text()
    assert "Features per density band over training" in html and "0.16327361382210256" not in html
