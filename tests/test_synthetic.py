"""The synthetic activation source (activations/synthetic.py): frequencies, exact active sets,
determinism, probes, the file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from saekit.activations.synthetic import (
    JSON_FILE,
    TENSORS_FILE,
    SyntheticConfig,
    SyntheticSource,
    read_synthetic_config,
)
from saekit.sae.errors import SaekitError


def _on(active, n_true: int) -> torch.Tensor:
    """[B, n_true] bool from an active set."""
    on = torch.zeros(len(active.row_ptr) - 1, n_true, dtype=torch.bool)
    on[active.rows(), active.feature] = True
    return on


@pytest.fixture(scope="module")
def small() -> SyntheticSource:
    cfg = SyntheticConfig(d_in=16, n_features=80, planted_per_block=4, n_parents=3,
                          children_per_parent=2, child_prob=0.3, magnitude_spread=0.3, seed=5)  # fmt: skip
    return SyntheticSource(cfg)


# -- the generator --
def test_frequencies_match_p_on_1e8_rows_planted_blocks_included():
    # Streaming: 10 batches of 1e7 rows, only the counts kept. Low p_max keeps it fast; the planted
    # blocks at 1e-4 .. 1e-7 get ~1e4 .. ~10 events per feature, and children their p_parent * q.
    cfg = SyntheticConfig(d_in=8, n_features=72, p_max=1e-2, planted_per_block=8,
                          n_parents=4, children_per_parent=2, child_prob=0.25, seed=1)  # fmt: skip
    src = SyntheticSource(cfg)
    rows, B = 10**8, 10**7
    counts = torch.zeros(src.n_true, dtype=torch.int64)
    for i in range(rows // B):
        counts += src.active(i, B).counts(src.n_true)
    c, lam = counts.numpy(), src.p.numpy() * rows
    # Each feature: exact two-sided Poisson test, Bonferroni over features at 1%.
    pval = np.minimum(1, 2 * np.minimum(stats.poisson.cdf(c, lam), stats.poisson.sf(c - 1, lam)))
    assert pval.min() > 0.01 / len(c), (c[pval.argmin()], lam[pval.argmin()])
    # Each planted block summed (1e-7: lambda 80), and a chi-square over all features.
    for d in cfg.planted:
        blk = src.p.numpy() == d
        lo, hi = stats.poisson.ppf([0.0005, 0.9995], lam[blk].sum())
        assert lo <= c[blk].sum() <= hi, (d, c[blk].sum(), lam[blk].sum())
    chi2 = ((c - lam) ** 2 / lam).sum()
    assert stats.chi2.sf(chi2, len(c)) > 1e-3
    assert c[src.p.numpy() == 1e-7].sum() > 0  # the rarest block is really drawn


def test_rows_are_exactly_bernoulli_distinct_rows_no_collisions():
    # One sparse feature at p 0.2 (distinct-row sampling with collisions redrawn) and one dense at 0.4:
    # the firing count per 50-row batch must be Binomial(50, p), which sampling rows with
    # replacement (collisions merged) would fail, and every row position equally likely.
    cfg = SyntheticConfig(d_in=4, n_features=2, p_max=0.4, p_min=0.2, planted=[], seed=2)
    src = SyntheticSource(cfg)
    B, n = 50, 2000
    per_batch = np.zeros((n, 2), dtype=np.int64)
    per_row = np.zeros((B, 2), dtype=np.int64)
    for i in range(n):
        a = src.active(i, B)
        f, r = a.feature.numpy(), np.repeat(np.arange(B), np.diff(a.row_ptr.numpy()))
        on = np.zeros((B, 2), dtype=bool)
        on[r, f] = True  # a row drawn twice for a feature counts once, as a Bernoulli row does
        per_batch[i] = on.sum(0)
        per_row += on
    for f, p in enumerate((0.4, 0.2)):
        hist = np.bincount(per_batch[:, f], minlength=B + 1)
        expect = stats.binom.pmf(np.arange(B + 1), B, p) * n
        keep = expect >= 5  # pool the tails into one cell each side
        obs = np.concatenate(
            [[hist[: keep.argmax()].sum()], hist[keep], [hist[keep.nonzero()[0][-1] + 1 :].sum()]]
        )
        exp = np.concatenate(
            [
                [expect[: keep.argmax()].sum()],
                expect[keep],
                [expect[keep.nonzero()[0][-1] + 1 :].sum()],
            ]
        )
        assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3, f
        assert stats.chisquare(per_row[:, f]).pvalue > 1e-3, f
        assert abs(per_batch[:, f].mean() - B * p) < 4 * math.sqrt(B * p * (1 - p) / n)


def test_same_seed_same_rows_any_order(small):
    B = 512
    ordered = [small.batch(i, B) for i in range(4)]
    shuffled = {i: small.batch(i, B) for i in (3, 0, 2, 1)}
    again = SyntheticSource(small.cfg).batch(2, B)
    for i, b in enumerate(ordered):
        assert torch.equal(b.x, shuffled[i].x)
        assert all(torch.equal(u, v) for u, v in zip(b.active, shuffled[i].active, strict=True))
    assert torch.equal(again.x, ordered[2].x)
    assert not torch.equal(ordered[0].x, ordered[1].x)
    assert all(
        torch.equal(u, v) for u, v in zip(small.active(1, B), ordered[1].active, strict=True)
    )
    stream = small.batches(B, start_batch=2)
    assert torch.equal(next(stream), ordered[2].x) and torch.equal(next(stream), ordered[3].x)
    other = SyntheticSource(SyntheticConfig(**{**small.cfg.to_dict(), "seed": 6}))
    assert not torch.equal(other.batch(0, B).x, ordered[0].x)


def test_active_set_rebuilds_x_exactly(small):
    b = small.batch(7, 1024)
    a = b.active
    assert a.feature.dtype == torch.int64 and a.magnitude.dtype == b.x.dtype == torch.float32
    assert (a.magnitude >= 0).all() and len(a.row_ptr) == 1025
    # Features ascend within each row, so no (row, feature) pair repeats.
    key = a.rows() * small.n_true + a.feature
    assert (key.diff() > 0).all()
    rebuilt = (small.mu.double() + small.noise(7, 1024).double()).index_add(
        0, a.rows(), small.directions[a.feature].double() * a.magnitude.double()[:, None]
    )
    assert torch.allclose(rebuilt, b.x.double(), atol=1e-5, rtol=0)
    # The noise is what it claims: per-dimension scales, mean 0.
    z = small.noise(8, 20000)
    assert torch.allclose(z.std(0), small.noise_scale, rtol=0.05)
    assert small.noise_scale.max() / small.noise_scale.min() == pytest.approx(10, rel=1e-4)
    # Magnitudes: scale_i (0.5 + Exp(1)); the smallest per feature is at least 0.5 scale_i.
    assert (a.magnitude >= 0.5 * small.scale[a.feature] * (1 - 1e-6)).all()


def test_children_fire_only_with_their_parent(small):
    on = _on(small.active(0, 200_000), small.n_true)
    child = torch.nonzero(small.parent >= 0).squeeze(1)
    par = small.parent[child]
    assert len(child) == 6
    assert not (on[:, child] & ~on[:, par]).any()
    k_child, k_par = on[:, child].sum().item(), on[:, par].sum().item()
    lo, hi = stats.binom.ppf([0.0005, 0.9995], k_par, 0.3)
    assert lo <= k_child <= hi
    assert torch.allclose(small.p[child], small.p[par] * 0.3)


def test_artifact_control_has_no_rare_true_feature():
    std = SyntheticSource(SyntheticConfig(n_features=200))
    ctl = SyntheticSource(SyntheticConfig(n_features=200, variant="artifact_control"))
    assert std.p.min() == pytest.approx(1e-7) and (std.p == 1e-6).sum() == 16
    assert ctl.n_true == std.n_true == 200
    assert ctl.p.min() >= 1e-3 and ctl.p.max() == pytest.approx(0.1)
    with pytest.raises(SaekitError, match="child"):
        SyntheticSource(SyntheticConfig(variant="artifact_control", n_parents=10, child_prob=0.001))


def test_power_law_shape():
    cfg = SyntheticConfig(n_features=600, planted=[], p_max=0.1, p_min=1e-7)
    per_decade = lambda p: np.histogram(np.log10(p), bins=np.arange(-7, 0))[0]  # noqa: E731
    flat = per_decade(SyntheticSource(cfg).p.numpy())
    assert flat.max() - flat.min() <= 2  # tail_exponent 0: log-uniform
    tilt = per_decade(
        SyntheticSource(SyntheticConfig(**{**cfg.to_dict(), "tail_exponent": 0.5})).p.numpy()
    )
    # beta 0.5: sqrt(10) x more features per decade towards the rare end (up to the quantile grid)
    assert np.all(np.diff(tilt) < 0) and tilt[0] / tilt[1] == pytest.approx(10**0.5, rel=0.1)


def test_max_cos_is_reached_or_refused():
    src = SyntheticSource(SyntheticConfig(d_in=32, n_features=128, max_cos=0.4, planted=[]))
    G = src.directions @ src.directions.T
    G.fill_diagonal_(0)
    assert G.abs().max() <= 0.4 + 1e-6
    assert torch.allclose(src.directions.norm(dim=1), torch.ones(128))
    with pytest.raises(SaekitError, match="Welch"):
        SyntheticSource(SyntheticConfig(d_in=32, n_features=128, max_cos=0.1, planted=[]))


def test_probes_force_features_on_and_off(small):
    child = int(torch.nonzero(small.parent >= 0)[0])
    ids = [0, child, small.n_true - 10]
    pr = small.probes(ids, 500, seed=3)
    on = _on(pr.batch.active, small.n_true)
    assert len(pr.target) == 1500 and on[torch.arange(1500), pr.target].all()
    assert on[500:1000, small.parent[child]].all()  # a forced child brings its parent
    # The other features stay ordinary: feature 1 (p 0.1 here) fires at its rate in feature 0's block.
    k = on[:500, 1].sum().item()
    assert (
        stats.binom.ppf(0.0005, 500, small.p[1].item())
        <= k
        <= stats.binom.ppf(0.9995, 500, small.p[1].item())
    )
    off = small.probes(ids, 2000, seed=3, on=False)
    on_off = _on(off.batch.active, small.n_true)
    assert not on_off[torch.arange(len(off.target)), off.target].any()
    dropped = 2000 - (off.target == 0).sum().item()  # feature 0 fires at p 0.1: ~200 rows dropped
    assert 140 < dropped < 260 and len(off.batch.x) == len(off.target)


def test_save_load_round_trip_and_damage(small, tmp_path):
    small.save(tmp_path)
    back = SyntheticSource.load(tmp_path)
    for k, v in small.tensors().items():
        assert torch.equal(v, back.tensors()[k]), k
    assert torch.equal(back.batch(3, 256).x, small.batch(3, 256).x)
    meta = json.loads((tmp_path / JSON_FILE).read_text())
    assert meta["spec"]["config"]["seed"] == 5 and meta["spec"]["n_true"] == small.n_true
    assert meta["spec"]["mean_norm"] == pytest.approx(
        small.batch(0, 8192).x.norm(dim=1).mean().item(), rel=0.03
    )
    data = bytearray((tmp_path / TENSORS_FILE).read_bytes())
    data[-3] ^= 1
    (tmp_path / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(SaekitError, match="checksum"):
        SyntheticSource.load(tmp_path)
    with pytest.raises(SaekitError, match="does not exist"):
        SyntheticSource.load(tmp_path / "nowhere")


def test_config_file_and_bad_values(tmp_path):
    (tmp_path / "s.yaml").write_text("d-in: 16\nn_features: 40\nvariant: artifact_control\n")
    cfg = read_synthetic_config(tmp_path / "s.yaml")
    assert (cfg.d_in, cfg.n_features, cfg.variant) == (16, 40, "artifact_control")
    for bad, match in (({"d_inn": 3}, "unknown field"), ({"p_min": 0.5, "p_max": 0.1}, "p_min"),
                       ({"n_features": 10}, "n_features"), ({"child_prob": 0}, "child_prob"),
                       ({"max_cos": 1.5}, "max_cos"), ({"d_in": 2.5}, "d_in")):  # fmt: skip
        with pytest.raises(SaekitError, match=match):
            SyntheticConfig.from_dict(bad)
