"""Diagnostics on planted SAEs and histories: features.csv and summary.json against the planted
values, the trajectory test's outcome per planted class, and logit weights against an
independent path through the real default model."""

from __future__ import annotations

import csv
import json
import math
import time
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit.diagnostics.diagnose import DiagnoseConfig, diagnose
from saekit.diagnostics.features import (
    classify,
    feature_geometry,
    ln_final_scale,
    logit_weights,
    rare_cluster_geometry,
    top_logit_tokens,
)
from saekit.sae.errors import SaekitError

D_IN = 128  # the default model's d_model: a resid_post SAE
STEPS = np.arange(1, 13) * 100  # window end steps
WIN_TOKENS = 10**9  # big windows so planted densities survive rounding to integer counts


def default_model():
    from saekit.activations.models import load_model

    return load_model("default")


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_planted_run_features_csv_and_summary(planted, tmp_path):
    d_sae = 40
    W_enc, bias, W_dec, want = planted.geometry(d_sae, D_IN)
    hist, _ = planted.history(d_sae)
    run = tmp_path / "run"
    planted.write_run(run, W_enc, bias, W_dec, hist)
    model = default_model()
    scale = 3.0
    out = diagnose(
        DiagnoseConfig(run=str(run), out=str(tmp_path / "rep"), ln_scale=scale, n_logit_tokens=5)
    ).path

    rows = read_csv(out / "features.csv")
    assert list(rows[0]) == [
        "index",
        "density",
        "log10_density",
        "class",
        "encoder_bias",
        "de_projection",
        "enc_dec_cosine",
        "decoder_norm",
        "held_out",
        "trajectory_group",
        "trajectory",
        "trend",
        "trend_low",
        "trend_high",
        "margin",
        "top_logit_tokens",
        "bottom_logit_tokens",
    ]
    assert len(rows) == d_sae
    final = hist["counts"][-1].numpy() / WIN_TOKENS
    # Independent logit path: ln_final's forward rescaled from its own scale to the fixed one.
    vocab = model.tokenizer.batch_decode([[i] for i in range(model.cfg.d_vocab)])
    with torch.no_grad():
        x = W_dec[:, None, :]
        xc = x - x.mean(-1, keepdim=True)
        rms = (xc.pow(2).mean(-1, keepdim=True) + model.ln_final.eps).sqrt()
        logits = (
            model.unembed((model.ln_final(x) - model.ln_final.b) * rms / scale)[:, 0]
            - model.unembed.b_U
        )
    for i, r in enumerate(rows):
        assert int(r["index"]) == i
        assert float(r["density"]) == pytest.approx(final[i], rel=1e-6)
        want_cls = "dead" if i < 10 else "ultra_rare" if i < 20 else "live"
        assert r["class"] == want_cls
        if i < 10:
            assert r["log10_density"] == "-inf" and float(r["density"]) == 0
        else:
            assert float(r["log10_density"]) == pytest.approx(math.log10(final[i]), abs=1e-6)
        assert float(r["encoder_bias"]) == pytest.approx(float(want["bias"][i]), abs=1e-5)
        assert float(r["de_projection"]) == pytest.approx(float(want["de"][i]), abs=1e-4)
        assert float(r["enc_dec_cosine"]) == pytest.approx(float(want["cos"][i]), abs=1e-4)
        assert float(r["decoder_norm"]) == pytest.approx(float(want["dec_norm"][i]), abs=1e-5)
        assert r["held_out"] == ("true" if i in (0, 1, 2, 3, 4, 10, 11, 12) else "false")
        top = json.loads(r["top_logit_tokens"])
        bottom = json.loads(r["bottom_logit_tokens"])
        want_top = logits[i].topk(5).indices.tolist()
        want_bot = logits[i].topk(5, largest=False).indices.tolist()
        assert top == [vocab[t] for t in want_top]
        assert bottom == [vocab[t] for t in want_bot]

    s = json.loads((out / "summary.json").read_text())
    assert s["n_features"] == d_sae
    assert s["counts"] == {"dead": 10, "ultra_rare": 10, "live": 20}
    assert s["fractions"] == {"dead": 0.25, "ultra_rare": 0.25, "live": 0.5}
    assert s["held_out"] == 8
    assert s["thresholds"] == {"dead": 0.0, "ultra_rare": 1e-6}
    assert s["window"]["tokens"] == WIN_TOKENS and s["window"]["windows_pooled"] == 1
    assert s["resolvable_threshold"] == pytest.approx(1e-8)  # 10 firings in 1e9 tokens
    assert not any("cannot be told apart" in w for w in s["warnings"])
    assert (s["l0"], s["fvu"]) == (212.5, 0.45)  # metrics.jsonl's last line
    assert s["history"]["n_windows"] == len(STEPS) and s["history"]["n_resampling_events"] == 1
    # Groups: the control group; rare: firing below 1e-5 over the first quarter of their
    # windows after burn-in (windows 1-3; for 5-9, resampled at 650, windows 7-8): 15 and 18
    # fall at -0.002 per step and were above it then; live: never resampled and at or above
    # 1e-5 over all their windows: 20-39 but the resampled 30, 31, and 18 (1.3e-5); 15 is
    # neither (7.7e-6).
    groups = [r["trajectory_group"] for r in rows]
    assert [i for i, g in enumerate(groups) if g == "control"] == [0, 1, 2, 3, 4, 10, 11, 12]
    assert [i for i, g in enumerate(groups) if g == "rare"] == [5, 6, 7, 8, 9, 13, 14, 16, 17, 19]
    assert [i for i, g in enumerate(groups) if g == "live"] == [18, *range(20, 30), *range(32, 40)]
    assert groups[15] == groups[30] == groups[31] == ""
    assert all(
        r["trajectory"] == "not_tested" for r in rows if r["trajectory_group"] in ("", "live")
    )
    dt = s["trajectory_test"]
    assert dt["by_group"]["control"]["n"] == 8 and dt["by_group"]["rare"]["n"] == 10
    assert dt["baseline"]["n_features"] == 19 and dt["alpha"] == 0.05
    assert "quasi-Poisson" in dt["test"] and dt["verdict"]
    geo = s["geometry"]
    assert geo["ultra_rare"]["n"] == 10 and geo["live"]["n"] == 20
    assert -1 <= geo["ultra_rare"]["encoder_mean_cosine_to_mean_direction"] <= 1
    assert s["logit_weights"]["computed"] and s["logit_weights"]["ln_final_scale"] == scale
    assert s["logit_weights"]["direct_path_caveat"] is None  # resid_post of the last layer
    html = (out / "report.html").read_text()
    assert html.count("plotly.js v") == 1 and escape(dt["verdict"]) in html
    run_name = Path(s["run"]).name  # the title names the run dir; its full path only on hover
    assert (
        f">saekit report: {run_name}</h1>" in html and f"<title>saekit report: {run_name}<" in html
    )


def test_resolvable_threshold_warning_and_pooling(planted, tmp_path):
    d_sae = 40
    W_enc, bias, W_dec, _ = planted.geometry(d_sae, D_IN)
    hist, _ = planted.history(d_sae)
    hist["window_tokens"][:] = 100_000  # resolves only densities >= 1e-5
    run = tmp_path / "run"
    planted.write_run(run, W_enc, bias, W_dec, hist)
    out = diagnose(
        DiagnoseConfig(
            run=str(run), out=str(tmp_path / "r"), logits=False, min_window_tokens=250_000
        )
    ).path
    s = json.loads((out / "summary.json").read_text())
    assert s["window"]["windows_pooled"] == 3 and s["window"]["tokens"] == 300_000
    assert any("below what the window can resolve" in w for w in s["warnings"])
    rows = read_csv(out / "features.csv")
    assert rows[0]["top_logit_tokens"] == "" and not s["logit_weights"]["computed"]
    # Pooled counts: feature 20's density is its count sum over 300k tokens.
    assert float(rows[20]["density"]) == pytest.approx(
        float(hist["counts"][-3:, 20].sum()) / 300_000
    )
    with pytest.raises(SaekitError, match="--overwrite"):
        diagnose(DiagnoseConfig(run=str(run), out=str(tmp_path / "r"), logits=False))
    with pytest.raises(SaekitError, match="not a directory"):
        diagnose(DiagnoseConfig(run=str(tmp_path / "nope"), out=str(tmp_path / "r2")))


def test_report_handle_reads_the_tables_back_typed(planted, tmp_path):
    import saekit
    from saekit.diagnostics.report import FEATURE_COLUMNS, Report

    d_sae = 40
    W_enc, bias, W_dec, want = planted.geometry(d_sae, D_IN)
    hist, _ = planted.history(d_sae)
    planted.write_run(tmp_path / "run", W_enc, bias, W_dec, hist)
    rep = saekit.diagnose(tmp_path / "run", out=str(tmp_path / "rep"), ln_scale=3.0)
    assert isinstance(rep, Report) and rep.path == tmp_path / "rep" and rep.html.is_file()
    assert rep.summary == json.loads((tmp_path / "rep" / "summary.json").read_text())
    f = rep.features
    assert list(f) == list(FEATURE_COLUMNS)
    assert f["index"].dtype == np.int64 and f["index"].tolist() == list(range(d_sae))
    final = hist["counts"][-1].numpy() / WIN_TOKENS
    assert f["density"].dtype == np.float64
    np.testing.assert_allclose(f["density"], final, rtol=1e-6)
    assert np.isneginf(f["log10_density"][:10]).all() and np.isfinite(f["log10_density"][10:]).all()
    assert f["class"].tolist() == ["dead"] * 10 + ["ultra_rare"] * 10 + ["live"] * 20
    assert f["held_out"].dtype == bool and np.flatnonzero(f["held_out"]).tolist() == [
        0, 1, 2, 3, 4, 10, 11, 12
    ]  # fmt: skip
    np.testing.assert_allclose(f["encoder_bias"], want["bias"].numpy(), atol=1e-5)
    assert len(f["top_logit_tokens"]) == d_sae
    assert all(isinstance(t, list) and len(t) == 10 for t in f["top_logit_tokens"])
    assert "40 features: 10 dead, 10 ultra-rare, 20 live" in repr(rep)

    # Without logit weights the token columns are None; an untested trend reads as NaN.
    from saekit.diagnostics.diagnose import DiagnoseConfig as Cfg
    from saekit.diagnostics.diagnose import diagnose as run_diagnose

    hist["counts"][:, 25] = 0  # never fired: no slope to fit
    planted.write_run(tmp_path / "run2", W_enc, bias, W_dec, hist)
    run_diagnose(Cfg(run=str(tmp_path / "run2"), out=str(tmp_path / "rep2"), logits=False))
    f2 = Report.open(tmp_path / "rep2").features
    assert f2["top_logit_tokens"] == [None] * d_sae
    assert np.isnan(f2["margin"]).all() and rep.summary["margin_source"] is None
    assert np.isnan(f2["trend"][25]) and f2["trajectory"][25] == "not_tested"
    assert f2["trajectory_group"].dtype.kind == "U" and np.isfinite(f2["trend"][14])
    with pytest.raises(SaekitError, match="not a report dir"):
        Report.open(tmp_path / "run")


def test_classify_and_geometry_on_planted_tensors(planted):
    counts = torch.tensor([0, 1, 5, 1000])
    assert classify(counts, 1_000_000).tolist() == [0, 2, 2, 2]  # 1e-6 is not below 1e-6
    assert classify(counts, 1_000_000_000).tolist() == [0, 1, 1, 2]
    W_enc, bias, W_dec, p = planted.geometry(30, 16)
    g = feature_geometry(W_enc, bias, W_dec)
    torch.testing.assert_close(g.de_projection, p["de"], atol=1e-5, rtol=0)
    torch.testing.assert_close(g.enc_dec_cosine, p["cos"], atol=1e-5, rtol=0)
    # Rare cluster: ultra-rare encoders all along one direction -> mean cosine 1.
    d = torch.randn(16)
    W_enc2 = torch.randn(16, 30)
    W_enc2[:, :10] = d[:, None] * torch.rand(10)[None, :] + 1e-4 * torch.randn(16, 10)
    cls = torch.tensor([1] * 10 + [2] * 20)
    geo = rare_cluster_geometry(W_enc2, W_dec, cls, neuron_basis=True)
    assert geo["ultra_rare"]["encoder_mean_cosine_to_mean_direction"] == pytest.approx(
        1.0, abs=1e-3
    )
    assert geo["live"]["encoder_mean_cosine_to_mean_direction"] < 0.5
    # Collinear encoders of either sign: one line (top singular share 1), though their mean
    # direction is weak; random ones sit near the Marchenko-Pastur edge.
    signs = torch.tensor([1.0, -1.0] * 5)
    W_enc3 = torch.randn(16, 30)
    W_enc3[:, :10] = d[:, None] * signs * (1 + torch.rand(10))
    geo = rare_cluster_geometry(W_enc3, W_dec, cls, neuron_basis=False, control=cls == 2)
    assert geo["ultra_rare"]["encoder_top_singular_share"] == pytest.approx(1.0, abs=1e-6)
    assert abs(geo["ultra_rare"]["encoder_mean_cosine_to_mean_direction"]) < 0.1
    live = geo["live"]
    assert live["encoder_top_singular_share"] < 2 * live["encoder_top_singular_share_random"]
    assert live["encoder_top_singular_share_random"] == pytest.approx((20**0.5 + 4) ** 2 / 320)
    assert geo["control"]["n"] == 20 and "encoder_negative_mass_mean" not in live
    # The negative orthant: planted shares 9/25 (3 rows) and 1 (2 rows, all <= 0).
    enc = torch.tensor([[-3.0, 4.0, 0.0]] * 3 + [[-1.0, 0.0, -2.0]] * 2)
    geo = rare_cluster_geometry(
        enc.T, torch.randn(5, 3), torch.tensor([1] * 5), neuron_basis=False, non_negative=True
    )
    r = geo["ultra_rare"]
    assert r["encoder_negative_mass_mean"] == pytest.approx((3 * 0.36 + 2) / 5)
    assert r["encoder_negative_mass_median"] == pytest.approx(0.36)
    assert r["encoder_all_nonpositive_fraction"] == pytest.approx(0.4)
    assert geo["dead"]["encoder_negative_mass_mean"] is None  # fewer than 2 features
    one_hot = torch.eye(16)[:2] * 3
    geo = rare_cluster_geometry(
        torch.randn(16, 2), one_hot, torch.tensor([1, 1]), neuron_basis=True
    )
    assert geo["ultra_rare"]["decoder_top10_neuron_mass"] == pytest.approx(1.0)
    assert geo["ultra_rare"]["decoder_l1_l2_ratio_over_sqrt_d"] == pytest.approx(1 / 4)


# ---------------------------------------------------------------------------- trajectory test


def test_planted_classes_get_their_trajectory(planted, tmp_path):
    hist, names = planted.trajectories()
    d_sae = len(names)
    W_enc, bias, W_dec, _ = planted.geometry(d_sae, D_IN)
    planted.write_run(tmp_path / "run", W_enc, bias, W_dec, hist)
    from saekit.sae.io import atomic_save_safetensors
    from saekit.training.mechanisms import KEYS

    mech = {k: torch.randn(40, d_sae) for k in KEYS}
    mech["window_end_step"] = hist["window_end_step"]
    atomic_save_safetensors(tmp_path / "run" / "mechanisms.safetensors", mech)
    cfg = DiagnoseConfig(
        run=str(tmp_path / "run"), out=str(tmp_path / "rep"), logits=False, rare_threshold=1e-3
    )
    rep = diagnose(cfg)
    f = rep.features
    for name, want in planted.TRAJECTORY_CLASSES:
        sel = names == name
        group = "control" if name == "control" else "rare"
        assert (f["trajectory_group"][sel] == group).all(), name
        assert (f["trajectory"][sel] == want).all(), (name, f["trajectory"][sel])
    np.testing.assert_array_equal(f["margin"].astype(np.float32), mech["margin"][-1].numpy())
    assert "mechanisms.safetensors" in rep.summary["margin_source"]
    live = names == "live"
    assert (f["trajectory_group"][live] == "live").all()
    assert (f["trajectory"][live] == "not_tested").all()
    # Trends in decades per 1e7 tokens: the exponential's planted -0.375 inside its interval,
    # the constant ones' intervals inside the +-0.3 band.
    exp = names == "exponential"
    assert ((f["trend_low"][exp] <= -0.375) & (-0.375 <= f["trend_high"][exp])).all()
    assert np.median(f["trend"][exp]) == pytest.approx(-0.375, abs=0.05)
    flat = np.isin(names, ("constant", "control"))
    assert ((f["trend_low"][flat] > -0.3) & (f["trend_high"][flat] < 0.3)).all()
    assert np.isnan(f["trend"][names == "too_few"]).all()
    s = rep.summary["trajectory_test"]
    assert s["by_group"]["rare"]["counts"] == {
        "falling": 20, "settled": 10, "died": 10, "unresolved": 10
    }  # fmt: skip
    assert s["by_group"]["control"]["counts"]["settled"] == 10
    assert s["baseline"]["n_features"] == 100
    assert s["baseline"]["mean_density"] == pytest.approx(1e-2, rel=0.01)
    assert s["band_decades_per_1e7_tokens"] == 0.3 and s["burn_in_tokens"] == 131_072
    assert s["windows"]["n"] == 40 and s["verdict"].startswith("Mostly")
    geo = rep.summary["geometry"]
    assert geo["inputs"]["non_negative"] is False and geo["control"]["n"] == 10
    html = rep.html.read_text()
    assert escape(s["verdict"]) in html and "Trajectory test: falling, settled" in html


def test_ultra_rare_count_only_where_the_window_resolves_it(planted, tmp_path, capsys):
    d_sae = 40
    W_enc, bias, W_dec, _ = planted.geometry(d_sae, D_IN)
    hist, _ = planted.history(d_sae)
    hist["window_tokens"][:] = 100_000  # resolves only densities >= 1e-5
    planted.write_run(tmp_path / "run", W_enc, bias, W_dec, hist)
    rep = diagnose(DiagnoseConfig(run=str(tmp_path / "run"), out=str(tmp_path / "r"), logits=False))
    s = rep.summary
    assert s["counts"]["ultra_rare"] is None and s["fractions"]["ultra_rare"] is None
    assert s["resolvable"] == {"dead": True, "ultra_rare": False}
    assert isinstance(s["counts"]["dead"], int)
    assert "ultra-rare not resolvable" in capsys.readouterr().out
    assert "not resolvable" in rep.html.read_text() and "not resolvable" in repr(rep)


# ---------------------------------------------------------------------------- logit weights


@pytest.mark.parametrize("site", ["resid_post", "mlp_post"])
def test_logit_weights_against_the_model(site):
    model = default_model()
    g = torch.Generator().manual_seed(0)
    d_in = model.cfg.d_mlp if site == "mlp_post" else model.cfg.d_model
    W_dec = torch.randn(6, d_in, generator=g)
    scale = 2.5
    got = logit_weights(W_dec, model, "mlp_post" if site == "mlp_post" else "residual", 0, scale)
    with torch.no_grad():
        if site == "mlp_post":
            # Independent: patch the decoder rows into hook_post and read the MLP's update,
            # minus the update of a zero input (b_out).
            toks = torch.full((6, 2), model.tokenizer.bos_token_id)

            def patch(acts, hook):
                return torch.stack([torch.zeros_like(W_dec), W_dec], 1)

            with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", patch)]):
                _, cache = model.run_with_cache(toks, names_filter="blocks.0.hook_mlp_out")
            mo = cache["blocks.0.hook_mlp_out"]
            x = (mo[:, 1] - mo[:, 0])[:, None, :]
        else:
            x = W_dec[:, None, :]
        xc = x - x.mean(-1, keepdim=True)
        rms = (xc.pow(2).mean(-1, keepdim=True) + model.ln_final.eps).sqrt()
        want = (
            model.unembed((model.ln_final(x) - model.ln_final.b) * rms / scale)[:, 0]
            - model.unembed.b_U
        )
    want = want - want.median(-1, keepdim=True).values
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got.median(-1).values, torch.zeros(6))
    top = top_logit_tokens(
        W_dec, model, "mlp_post" if site == "mlp_post" else "residual", 0, scale, k=7
    )
    assert torch.equal(top.top_ids, want.topk(7).indices)
    assert torch.equal(top.bottom_ids, want.topk(7, largest=False).indices)


def test_ln_final_scale_is_the_mean_rms_of_the_final_residual():
    model = default_model()
    toks = torch.randint(1, model.cfg.d_vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    toks[:, 0] = model.tokenizer.bos_token_id
    _, cache = model.run_with_cache(toks, names_filter="blocks.0.hook_resid_post")
    r = cache["blocks.0.hook_resid_post"][:, 1:]
    rc = r - r.mean(-1, keepdim=True)
    want = (rc.pow(2).mean(-1) + model.ln_final.eps).sqrt().mean()
    assert ln_final_scale(model, toks) == pytest.approx(float(want), rel=1e-5)


# ---------------------------------------------------------------------------- speed


def test_diagnose_16k_features_under_60s(planted, tmp_path):
    torch.set_num_threads(2)
    run = tmp_path / "run"
    planted.big_run(run)
    t0 = time.time()
    out = diagnose(DiagnoseConfig(run=str(run), out=str(tmp_path / "rep"))).path
    elapsed = time.time() - t0
    print(f"diagnose on 16384 features: {elapsed:.1f}s")
    assert elapsed < 60
    size = (out / "report.html").stat().st_size
    assert size < 10 * 2**20, size
    geo = json.loads((out / "summary.json").read_text())["geometry"]
    assert geo["inputs"]["non_negative"] is True  # mlp_post of the default (ReLU) model
    assert 0 <= geo["live"]["encoder_negative_mass_mean"] <= 1
    assert len(read_csv(out / "features.csv")) == 16384


# ---------------------------------------------------------------------------- --cache


def write_cache(
    cache: Path, acts: torch.Tensor, tokens: torch.Tensor, hook: str, shard_rows: int
) -> None:
    """A cache dir in the documented format (manifest + verified shards) with planted rows."""
    from saekit.activations.cache_files import write_cache as write

    rows = torch.arange(len(acts))
    shards = [
        {"activations": acts[sl], "tokens": tokens[sl], "context": rows[sl] // 50,
         "position": rows[sl] % 50 + 1}
        for sl in (slice(lo, lo + shard_rows) for lo in range(0, len(acts), shard_rows))
    ]  # fmt: skip
    write(cache, shards, model="default", site="resid_post", hook_name=hook, context_size=51)


def test_fresh_density_and_top_contexts_from_a_cache(planted, tmp_path):
    model = default_model()
    d_sae, n_rows, skip = 8, 2000, 500
    g = torch.Generator().manual_seed(0)
    acts = 0.1 * torch.randn(n_rows, D_IN, generator=g)
    acts[:, :d_sae] = 0
    fires = [
        [],
        [100],
        [700],
        [600, 900, 1999],
        list(range(510, 520)),
        list(range(1000, 1050)),
        list(range(1500, 1600)),
        list(range(1000, 1500)),
    ]
    for i, rows in enumerate(fires):
        acts[rows, i] = torch.rand(len(rows), generator=g) + 0.5
    acts[1234, 7] = 9.0  # feature 7's top activation
    tokens = torch.randint(1, model.cfg.d_vocab, (n_rows,), generator=g)
    eye = torch.eye(D_IN)[:, :d_sae]
    per_feature = ("counts", "resampled", "held_out", "control_mask")
    hist = {k: v[..., :d_sae] if k in per_feature else v for k, v in planted.history()[0].items()}
    planted.write_run(tmp_path / "run", eye, torch.zeros(d_sae), eye.T.contiguous(), hist)
    write_cache(tmp_path / "cache", acts, tokens, "blocks.0.hook_resid_post", shard_rows=1000)
    out = diagnose(
        DiagnoseConfig(
            run=str(tmp_path / "run"),
            out=str(tmp_path / "rep"),
            cache=str(tmp_path / "cache"),
            tokens=n_rows - skip,
            batch_size=256,
            ultra_rare_threshold=1e-3,
            features=[7, 2],
            ln_scale=2.0,
        )
    ).path
    rows = read_csv(out / "features.csv")
    want = [sum(r >= skip for r in f) / (n_rows - skip) for f in fires]
    assert [float(r["density"]) for r in rows] == pytest.approx(want)
    # The margin: the largest pre-activation over the measured rows (identity encoder, 0 biases).
    margin = acts[skip:, :d_sae].amax(0)
    assert [float(r["margin"]) for r in rows] == pytest.approx(margin.tolist())
    assert [r["class"] for r in rows] == ["dead", "dead", "ultra_rare"] + ["live"] * 5
    s = json.loads((out / "summary.json").read_text())
    assert s["window"]["tokens"] == n_rows - skip and "fresh" in s["density_source"]
    x_min = float(acts[skip:].min())
    assert s["geometry"]["inputs"] == {
        "non_negative": False,
        "how": f"the smallest of the {n_rows - skip} measured cache rows' values is {x_min:.4g}",
    }
    x = acts[skip:]
    recon = x.clone()
    recon[:, d_sae:] = 0
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert s["l0"] == pytest.approx(sum(want)) and s["fvu"] == pytest.approx(fvu, rel=1e-4)
    html = (out / "report.html").read_text()
    vocab = model.tokenizer.batch_decode([[i] for i in range(model.cfg.d_vocab)])
    import html as h

    tok = h.escape(vocab[int(tokens[1234])])
    before = h.escape(
        "".join(vocab[int(t)] for t in tokens[1234 - 12 + 0 : 1234])
    )  # same context: 1200..1249
    assert f"{before}<mark title='activation 9'>{tok}</mark>" in html
    assert "<td>9</td><td class='ctx'>" in html  # the top activation's value: its own column
    assert f"9: {before}" not in html  # (not a prefix that reads like a verse reference)
    # the dashboards scanned the whole cache: the same row heads its examples
    chunks = "".join(p.read_text() for p in sorted((out / "features").glob("f-*.js")))
    assert json.dumps(vocab[int(tokens[1234])], ensure_ascii=False) in chunks


def test_cli_diagnose_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from saekit.scripts import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["diagnose", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saekit: error: --run") and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_display_windows_pool_small_windows_but_never_across_a_resampling():
    from types import SimpleNamespace

    from saekit.diagnostics.figures import display_windows

    # 10 windows of 100 tokens ending at steps 1..10; a resampling event after step 6.
    hist = SimpleNamespace(
        window_tokens=torch.full((10,), 100),
        window_end_step=torch.arange(1, 11),
        resample_steps=torch.tensor([6]),
    )
    # Pooled backwards from the end to >= 300 tokens; the event cuts the window ending at 7
    # (the first after it) off from the ones before.
    assert display_windows(hist, 300).tolist() == [0, 3, 6, 7]
