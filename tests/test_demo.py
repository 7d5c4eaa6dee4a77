"""`saekit demo` end to end on the default model, on a reduced budget (the full demo is ~5 min)."""

import json

import pytest

from saekit.scripts.cli import main


@pytest.mark.slow
def test_demo_reduced_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    main(
        [
            "demo",
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
