"""Diagnostics on planted SAEs and histories: features.csv and summary.json against the planted
values, the dying test on planted trajectories, and logit weights against an independent path
through the real default model."""

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

from saekit.diagnostics import dying
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
    hist, slopes = planted.history(d_sae)
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
        "density_slope",
        "held_out",
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
        if i in (30, 31):
            # Resampled at 650: the fit uses only later (flat) windows.
            assert float(r["density_slope"]) == pytest.approx(0.0, abs=1e-7)
        else:
            assert float(r["density_slope"]) == pytest.approx(slopes[i], abs=2e-5)
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
    assert s["resolvable_threshold"] == pytest.approx(1e-9)
    assert not any("cannot be told apart" in w for w in s["warnings"])
    assert (s["l0"], s["fvu"]) == (212.5, 0.45)  # metrics.jsonl's last line
    assert s["history"]["n_windows"] == len(STEPS) and s["history"]["n_resampling_events"] == 1
    dt = s["dying_test"]
    # Members: control 0-4, 10-12; rare (density < 1e-5 somewhere in their segment): 13-19;
    # died after firing: 5-9 (their segment after 650 still has nonzero windows).
    assert dt["by_group"]["control"]["n"] == 8
    assert dt["by_group"]["rare"]["n"] == 12
    assert dt["counts"]["died"] == 10
    # 10-19: slopes 0 (10,13,16,19), -0.001, -0.002: all but the flat ones keep falling.
    assert dt["counts"]["keeps_falling"] == 6 and dt["counts"]["settles"] == 4
    assert "t-test" in dt["test"] and dt["verdict"]
    geo = s["geometry"]
    assert geo["ultra_rare"]["n"] == 10 and geo["live"]["n"] == 20
    assert -1 <= geo["ultra_rare"]["encoder_mean_cosine_to_mean_direction"] <= 1
    assert s["logit_weights"]["computed"] and s["logit_weights"]["ln_final_scale"] == scale
    assert s["logit_weights"]["direct_path_caveat"] is None  # resid_post of the last layer
    html = (out / "report.html").read_text()
    assert html.count("plotly.js v") == 1 and escape(dt["verdict"]) in html


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

    # Without logit weights the token columns are None; a planted empty slope reads as NaN.
    from saekit.diagnostics.diagnose import DiagnoseConfig as Cfg
    from saekit.diagnostics.diagnose import diagnose as run_diagnose

    hist["counts"][:, 25] = 0  # never fired: no slope to fit
    planted.write_run(tmp_path / "run2", W_enc, bias, W_dec, hist)
    run_diagnose(Cfg(run=str(tmp_path / "run2"), out=str(tmp_path / "rep2"), logits=False))
    f2 = Report.open(tmp_path / "rep2").features
    assert f2["top_logit_tokens"] == [None] * d_sae
    assert np.isnan(f2["density_slope"][25]) and not np.isnan(f2["density_slope"][24])
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
    one_hot = torch.eye(16)[:2] * 3
    geo = rare_cluster_geometry(
        torch.randn(16, 2), one_hot, torch.tensor([1, 1]), neuron_basis=True
    )
    assert geo["ultra_rare"]["decoder_top10_neuron_mass"] == pytest.approx(1.0)
    assert geo["ultra_rare"]["decoder_l1_l2_ratio_over_sqrt_d"] == pytest.approx(1 / 4)


# ---------------------------------------------------------------------------- dying test


def test_dying_test_classifies_planted_histories():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 41) * 250
    tokens = 2_000_000
    n = 30
    rate = np.zeros((len(steps), n))
    rate[:, :10] = 10 ** (-4.0 - 1.5 * steps[:, None] / steps[-1])  # falls 1.5 decades
    rate[:, 10:20] = 3e-5  # flat
    rate[:, 20:30] = np.where(steps[:, None] < 5000, 2e-5, 0.0)  # dies at step 5000
    counts = rng.poisson(rate * tokens)
    control = torch.zeros(n, dtype=torch.bool)
    control[::2] = True
    t = dying.dying_test(
        torch.tensor(counts),
        torch.full((len(steps),), tokens),
        torch.tensor(steps),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, n, dtype=torch.bool),
        control,
        rare_threshold=1e-4,
    )
    assert t.members.all()
    assert list(t.outcome[:10]) == ["keeps_falling"] * 10
    assert list(t.outcome[10:20]) == ["settles"] * 10
    assert list(t.outcome[20:]) == ["died"] * 10
    assert np.allclose(t.fit.slope[:10], -1.5 / steps[-1], rtol=0.3)  # Poisson noise at ~10 counts
    s = dying.summarize(t)
    assert s["counts"] == {"keeps_falling": 10, "settles": 10, "died": 10, "too_few_points": 0}
    assert s["by_group"]["control"]["n"] == 15
    assert "yes" in s["verdict"] and "t-test" in s["verdict"]


def test_t_cdf_matches_scipy():
    from scipy import stats

    t = np.array([-8.0, -2.5, -1.0, 0.0, 0.7, 3.0, -30.0])
    df = np.array([1, 3, 7, 10, 2, 50, 4])
    np.testing.assert_allclose(dying.t_cdf(t, df), stats.t.cdf(t, df), rtol=1e-9, atol=1e-12)
    # OLS slope and p-value against scipy's linregress.
    rng = np.random.default_rng(1)
    x = np.arange(12.0)
    y = -0.05 * x + rng.normal(0, 0.2, 12)
    fit = dying.fit_log_density(y[:, None], x, np.ones((12, 1), bool))
    ref = stats.linregress(x, y)
    assert fit.slope[0] == pytest.approx(ref.slope) and fit.intercept[0] == pytest.approx(
        ref.intercept
    )
    assert fit.p_falling[0] == pytest.approx(ref.pvalue / 2)  # linregress is two-sided


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
    assert [r["class"] for r in rows] == ["dead", "dead", "ultra_rare"] + ["live"] * 5
    s = json.loads((out / "summary.json").read_text())
    assert s["window"]["tokens"] == n_rows - skip and "fresh" in s["density_source"]
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
    assert f"{before}<mark>{tok}</mark>" in html
    assert "9: " in html  # the top activation's value heads its line


def test_cli_diagnose_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from saekit.scripts import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["diagnose", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saekit: error: --run") and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_dying_test_pools_small_windows_but_never_across_a_resampling():
    # 10 windows of 100 tokens ending at steps 1..10; a resampling event after step 6.
    counts = torch.arange(10)[:, None].repeat(1, 2)
    c, tok, end = dying.pool_windows(
        counts, torch.full((10,), 100), torch.arange(1, 11), torch.tensor([6]), 300
    )
    # Pooled backwards from the end to >= 300 tokens; the event cuts the window ending at 7
    # (the first after it) off from the ones before.
    assert end.tolist() == [3, 6, 7, 10]
    assert tok.tolist() == [300, 300, 100, 300]
    assert c[:, 0].tolist() == [0 + 1 + 2, 3 + 4 + 5, 6, 7 + 8 + 9]
