"""Scoring an SAE against the true features of a synthetic source (issue 17, item 3).

1. Matching: cos[j, i] between SAE decoder row j and true direction i; a unique assignment among
   the pairs with cos >= `cos_threshold` (0.9). Hungarian (scipy's linear_sum_assignment,
   maximising the summed cosine of above-threshold pairs) when the rows and columns that have such
   a pair span at most HUNGARIAN_MAX entries, else greedy by descending cosine; `Matching.method`
   says which. A matched pair is an assigned pair (cos >= the threshold).
2. Firing, per matched pair (j, i), with true frequency p = p_i: recall r = P(j fires | i on),
   from `n_probes` rows with i forced on (`SyntheticSource.probes`); false-positive rate
   fp = P(j fires | i off), from `n_ordinary` ordinary rows, counting those where i is off. Then
   precision = p r / (p r + (1-p) fp). Ordinary rows can only bound fp at ~3/n_ordinary, which
   says little for p = 1e-6, so the SAE's own density d over the run (`counts` / `tokens`) gives a
   second estimate: d = p r + (1-p) fp, so precision = p r / d. The reported interval is the
   intersection of both; r and fp get Clopper-Pearson intervals and d a Poisson one, each at level
   alpha/3, so the three hold together with probability >= 1 - alpha. When fp had no event its
   point estimate is 0 and only its upper bound is informative (`fp_is_bound`). Confound: d is
   measured while the SAE trained over the window, r and fp on the final weights.
3. Classes, for SAE features with density below `rare_density` (1e-5):
   - artifact: no true feature has cos >= cos_threshold with it;
   - absorbed: its matched true feature is frequent (p >= rare_true, 1e-4), or it is unmatched
     while its best true feature is matched to another SAE feature (`duplicate`);
   - real_rare: matched to a true feature with p < rare_true and precision's lower bound >=
     min_precision (0.5): with confidence 1 - alpha, at least half its firings are on its feature;
   - imprecise: matched to a rare true feature, precision's upper bound < min_precision;
   - unresolved: matched to a rare true feature, the precision interval straddles min_precision
     (or the two estimates disagree).
   Features with no firing at all (`counts` 0) are classed the same way and counted apart as dead.
4. The recovery curve: the share of true features matched per log-spaced frequency bin (with the
   counts), and the share of rare live SAE features that are real_rare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..activations.synthetic import SyntheticSource
from ..sae.errors import SaekitError

HUNGARIAN_MAX = 4096 * 4096  # entries of the cost matrix above which matching is greedy
CLASSES = ("real_rare", "unresolved", "imprecise", "absorbed", "artifact")


@dataclass
class ScoreConfig:
    """How an SAE is scored against ground truth."""

    cos_threshold: float = 0.9
    """Decoder cosine at or above which an SAE feature and a true feature can be matched."""
    rare_density: float = 1e-5
    """SAE features with a density below this are classed (real_rare, absorbed, artifact, ...)."""
    rare_true: float = 1e-4
    """True features with p below this are rare: a match to a frequent one is absorbed."""
    min_precision: float = 0.5
    """real_rare needs precision's lower bound at or above this."""
    alpha: float = 0.05
    """1 - confidence of the precision interval (split over recall, fp and density)."""
    n_probes: int = 256
    """Rows per matched true feature with that feature forced on (recall)."""
    n_ordinary: int = 131072
    """Ordinary rows for the false-positive rates."""
    match: Literal["auto", "hungarian", "greedy"] = "auto"
    """Unique assignment: hungarian, greedy by descending cosine, or auto (hungarian when small enough)."""
    bins_per_decade: int = 1
    """Bins per decade of true frequency in the recovery curve."""
    seed: int = 0
    """Seed of the probe and ordinary rows."""
    batch_rows: int = 8192
    """Rows encoded at a time."""


class Matching(NamedTuple):
    true_of: Tensor  # [d_sae] int64: the true feature an SAE feature is matched to, -1 if none
    cos: Tensor  # [d_sae] float32: cosine of the matched pair (nan if none)
    best_true: Tensor  # [d_sae] int64: the true feature with the largest cosine
    best_cos: Tensor  # [d_sae] float32
    method: str  # "hungarian" | "greedy"
    threshold: float


class Firing(NamedTuple):
    """Per SAE feature (0 where unmatched): firings on its true feature's probes and on ordinary rows."""

    on_fired: Tensor  # [d_sae] int64
    on_rows: Tensor  # [d_sae] int64
    off_fired: Tensor  # [d_sae] int64: fired on ordinary rows where its true feature was off
    off_rows: Tensor  # [d_sae] int64: ordinary rows where its true feature was off


class RecoveryCurve(NamedTuple):
    edges: Tensor  # [n_bins + 1] float64: bin edges in true frequency
    n_true: Tensor  # [n_bins] int64
    n_matched: Tensor  # [n_bins] int64

    def recall(self) -> Tensor:
        return self.n_matched / self.n_true.clamp_min(1).double()


@dataclass
class GroundTruthScore:
    """Per SAE feature [d_sae] (float64, nan where unmatched unless said), the classes and the curve."""

    matching: Matching
    firing: Firing
    density: Tensor  # counts / tokens
    p_true: Tensor  # p of the matched true feature
    recall: Tensor
    recall_lo: Tensor
    recall_hi: Tensor
    fp: Tensor
    fp_hi: Tensor
    fp_is_bound: Tensor  # bool: fp had no event, so only fp_hi says something
    precision_probe: Tensor  # p r / (p r + (1-p) fp)
    precision_density: Tensor  # p r / density
    precision_lo: Tensor
    precision_hi: Tensor
    label: list[str]  # a CLASSES entry for features below rare_density, "" for the others
    duplicate: Tensor  # bool: unmatched, its best true feature matched to another SAE feature
    curve: RecoveryCurve
    tokens: int
    counts: Tensor
    cfg: ScoreConfig

    def columns(self) -> dict[str, list]:
        """Per-SAE-feature columns (e.g. for features.csv): class, matched true feature (-1 if
        none), its cosine and p, recall and the precision interval (nan where unmatched)."""
        m = self.matching
        return {"gt_class": self.label, "gt_true_feature": m.true_of.tolist(),
                "gt_cos": m.cos.tolist(), "gt_p_true": self.p_true.tolist(), "gt_recall": self.recall.tolist(),
                "gt_precision_lo": self.precision_lo.tolist(), "gt_precision_hi": self.precision_hi.tolist(),
                "gt_duplicate": self.duplicate.tolist()}  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """JSON-able: matching, recovery curve, the classes of rare SAE features, the criteria."""
        m, cfg, curve = self.matching, self.cfg, self.curve
        label = np.asarray(self.label)
        dead = (self.counts == 0).numpy()
        groups = {}
        for name, mask in (("live", (label != "") & ~dead), ("dead", (label != "") & dead)):
            groups[name] = {
                "n": int(mask.sum()),
                **{c: int((label[mask] == c).sum()) for c in CLASSES},
            }
        live = groups["live"]
        n = live["n"]
        share = (lambda k: k / n) if n else (lambda k: None)
        return {
            "matching": {"method": m.method, "cos_threshold": m.threshold,
                         "n_true": int(curve.n_true.sum()),
                         "d_sae": len(m.true_of), "n_matched": int((m.true_of >= 0).sum())},
            "recovery_curve": [
                {"p_lo": float(curve.edges[b]), "p_hi": float(curve.edges[b + 1]),
                 "n_true": int(curve.n_true[b]), "n_matched": int(curve.n_matched[b]),
                 "recall": float(curve.recall()[b]) if curve.n_true[b] else None}
                for b in range(len(curve.n_true))
            ],
            "rare": {
                "density_below": cfg.rare_density, "tokens": self.tokens,
                # below ~10 expected firings at the threshold, rare and dead are not told apart
                "resolved": cfg.rare_density * self.tokens >= 10,
                "live": live, "dead": groups["dead"],
                "share_real": share(live["real_rare"]),
                "share_real_bounds": [share(live["real_rare"]),
                                      share(live["real_rare"] + live["unresolved"])],
            },
            "criteria": asdict(cfg),
        }  # fmt: skip


def match_features(
    W_dec: Tensor, directions: Tensor, threshold: float = 0.9, method: str = "auto"
) -> Matching:
    """Unique assignment of SAE decoder rows to true directions by cosine (see the module doc)."""
    if method not in ("auto", "hungarian", "greedy"):
        raise SaekitError(f"match method {method!r}: use auto, hungarian or greedy")
    unit = lambda W: W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    dec, true = unit(W_dec.detach().float().cpu()), unit(directions.float().cpu())
    best_cos, best_true, pj, pt, pv = [], [], [], [], []
    for s in range(0, len(dec), 4096):  # [4096, N_true] at a time
        c = dec[s : s + 4096] @ true.T
        v, i = c.max(dim=1)
        best_cos.append(v)
        best_true.append(i)
        j, t = torch.nonzero(c >= threshold, as_tuple=True)
        pj.append(j + s)
        pt.append(t)
        pv.append(c[j, t])
    J, T, V = (torch.cat(a).numpy() for a in (pj, pt, pv))
    rows, cols = np.unique(J), np.unique(T)
    if method == "auto":
        method = "hungarian" if len(rows) * len(cols) <= HUNGARIAN_MAX else "greedy"
    true_of = torch.full((len(dec),), -1, dtype=torch.int64)
    if len(J) and method == "hungarian":
        W = np.zeros((len(rows), len(cols)))
        W[np.searchsorted(rows, J), np.searchsorted(cols, T)] = V
        r, c = linear_sum_assignment(W, maximize=True)
        ok = W[r, c] >= threshold
        true_of[torch.from_numpy(rows[r[ok]])] = torch.from_numpy(cols[c[ok]])
    elif len(J):
        used_j, used_t = set(), set()
        for k in np.argsort(-V, kind="stable"):
            if J[k] not in used_j and T[k] not in used_t:
                used_j.add(J[k])
                used_t.add(T[k])
                true_of[int(J[k])] = int(T[k])
    cos = torch.full((len(dec),), float("nan"))
    m = true_of >= 0
    cos[m] = (dec[m] * true[true_of[m]]).sum(1)
    return Matching(true_of, cos, torch.cat(best_true), torch.cat(best_cos), method, threshold)


@torch.no_grad()
def _fires(sae, x: Tensor, cols: Tensor, batch_rows: int) -> Tensor:
    """[rows, len(cols)] bool: whether SAE features `cols` fire (activation > 0) on the rows of x."""
    dev = sae.W_dec.device
    out = [(sae.encode(x[s : s + batch_rows].to(dev))[:, cols.to(dev)] > 0).cpu()
           for s in range(0, len(x), batch_rows)]  # fmt: skip
    return torch.cat(out) if out else torch.zeros(0, len(cols), dtype=torch.bool)


@torch.no_grad()
def measure_firing(sae, source: SyntheticSource, matching: Matching, cfg: ScoreConfig) -> Firing:
    """Recall probes and ordinary-row false positives for every matched pair (see the module doc).
    `sae`: anything with `encode(x) -> [B, d_sae]` (fires: > 0) and `W_dec`, in the source's units."""
    d_sae = len(matching.true_of)
    z = [torch.zeros(d_sae, dtype=torch.int64) for _ in range(4)]
    sae_ids = torch.nonzero(matching.true_of >= 0).squeeze(1)
    if not len(sae_ids):
        return Firing(*z)
    true_ids = matching.true_of[sae_ids]
    group = max(1, cfg.batch_rows * 4 // cfg.n_probes)  # features probed per call
    for s in range(0, len(sae_ids), group):
        probes = source.probes(true_ids[s : s + group], cfg.n_probes, seed=cfg.seed + s)
        fired = _fires_diag(sae, probes.batch.x, sae_ids[s : s + group], cfg)
        z[0][sae_ids[s : s + group]] = fired
        z[1][sae_ids[s : s + group]] = cfg.n_probes
    pair_of_true = torch.full((source.n_true,), -1, dtype=torch.int64)
    pair_of_true[true_ids] = torch.arange(len(true_ids))
    ordinary = source.sample_batch(cfg.n_ordinary, seed=cfg.seed)
    pair = pair_of_true[ordinary.active.feature]
    hit_row, hit_pair = ordinary.active.rows()[pair >= 0], pair[pair >= 0]
    off_fired, off_rows = torch.zeros(2, len(true_ids), dtype=torch.int64)
    for s in range(0, cfg.n_ordinary, cfg.batch_rows):
        fires = _fires(sae, ordinary.x[s : s + cfg.batch_rows], sae_ids, cfg.batch_rows)
        on = torch.zeros_like(fires)
        sel = (hit_row >= s) & (hit_row < s + len(fires))
        on[hit_row[sel] - s, hit_pair[sel]] = True
        off_fired += (fires & ~on).sum(0)
        off_rows += (~on).sum(0)
    z[2][sae_ids], z[3][sae_ids] = off_fired, off_rows
    return Firing(*z)


def _fires_diag(sae, x: Tensor, sae_ids: Tensor, cfg: ScoreConfig) -> Tensor:
    """Per probed feature: in how many of its n_probes rows (consecutive in x) its SAE feature fired."""
    n = cfg.n_probes
    f = _fires(sae, x, sae_ids, cfg.batch_rows).view(len(sae_ids), n, len(sae_ids))
    k = torch.arange(len(sae_ids))
    return f[k, :, k].sum(1)


def _cp(k: np.ndarray, n: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson two-sided interval at level 1 - a for k successes in n trials."""
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(a / 2, k, n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - a / 2, k + 1, n - k), 1.0)
    return lo, hi


def _poisson(c: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Garwood) two-sided interval at level 1 - a for the mean of a Poisson count c."""
    lo = np.where(c > 0, stats.chi2.ppf(a / 2, 2 * c) / 2, 0.0)
    return lo, stats.chi2.ppf(1 - a / 2, 2 * c + 2) / 2


def _prec(p: np.ndarray, r: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """p r / (p r + (1-p) fp); 1 when only the fp term is 0, nan when both are."""
    num, den = p * r, p * r + (1 - p) * fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def score(
    sae, source: SyntheticSource, counts: Tensor, tokens: int, cfg: ScoreConfig | None = None
) -> GroundTruthScore:
    """Score `sae` against `source`'s true features. `counts` [d_sae]: firings of each SAE feature
    over `tokens` rows of the run (e.g. its last density window); `sae` as in `measure_firing`."""
    cfg = cfg or ScoreConfig()
    if not (0 < cfg.cos_threshold <= 1 and 0 < cfg.alpha < 1 and 0 < cfg.min_precision <= 1):
        raise SaekitError(
            "score: need 0 < cos_threshold <= 1, 0 < alpha < 1, 0 < min_precision <= 1"
        )
    if min(cfg.n_probes, cfg.n_ordinary, cfg.bins_per_decade, cfg.batch_rows) < 1:
        raise SaekitError(
            "score: n_probes, n_ordinary, bins_per_decade and batch_rows must be >= 1"
        )
    d_sae = sae.W_dec.shape[0]
    counts = torch.as_tensor(counts, dtype=torch.int64).cpu()
    if counts.shape != (d_sae,) or tokens < 1 or (counts < 0).any():
        raise SaekitError(f"counts must be [{d_sae}] firings >= 0 over tokens >= 1 rows")
    if sae.W_dec.shape[1] != source.d_in:
        raise SaekitError(
            f"the SAE reads d_in {sae.W_dec.shape[1]}, the source makes {source.d_in}"
        )
    m = match_features(sae.W_dec, source.directions, cfg.cos_threshold, cfg.match)
    fir = measure_firing(sae, source, m, cfg)
    matched = (m.true_of >= 0).numpy()
    p = np.where(matched, source.p.numpy()[m.true_of.clamp_min(0).numpy()], np.nan)
    a = cfg.alpha / 3
    on_k, on_n, off_k, off_n = (t.numpy().astype(np.float64) for t in fir)
    with np.errstate(invalid="ignore", divide="ignore"):
        r, fp = on_k / on_n, off_k / off_n
    r_lo, r_hi = _cp(on_k, on_n, a)
    fp_lo, fp_hi = _cp(off_k, off_n, a)
    c = counts.numpy().astype(np.float64)
    d_lo, d_hi = (v / tokens for v in _poisson(c, a))
    d = c / tokens
    with np.errstate(invalid="ignore", divide="ignore"):
        prec_d = np.where(d > 0, np.minimum(1.0, p * r / d), np.nan)
        lo_d = np.where(d_hi > 0, p * r_lo / d_hi, 0.0)
        hi_d = np.where(d_lo > 0, np.minimum(1.0, p * r_hi / d_lo), 1.0)
    lo = np.fmax(np.nan_to_num(_prec(p, r_lo, fp_hi), nan=0.0), lo_d)
    hi = np.fmin(np.nan_to_num(_prec(p, r_hi, fp_lo), nan=1.0), hi_d)
    lo, hi = np.where(matched, lo, np.nan), np.where(matched, hi, np.nan)
    label, dup = _classify(m, p, lo, hi, d < cfg.rare_density, cfg)
    nan = ~matched
    f64 = lambda v: torch.from_numpy(np.where(nan, np.nan, v).astype(np.float64))  # noqa: E731
    return GroundTruthScore(
        matching=m, firing=fir, density=torch.from_numpy(d), p_true=f64(p), recall=f64(r), recall_lo=f64(r_lo),
        recall_hi=f64(r_hi), fp=f64(fp), fp_hi=f64(fp_hi), fp_is_bound=torch.from_numpy(matched & (off_k == 0)),
        precision_probe=f64(_prec(p, r, fp)), precision_density=f64(prec_d), precision_lo=f64(lo),
        precision_hi=f64(hi), label=label, duplicate=torch.from_numpy(dup),
        curve=recovery_curve(source.p, m, cfg.bins_per_decade), tokens=int(tokens), counts=counts, cfg=cfg,
    )  # fmt: skip


def _classify(m: Matching, p: np.ndarray, lo: np.ndarray, hi: np.ndarray, rare: np.ndarray,
              cfg: ScoreConfig) -> tuple[list[str], np.ndarray]:  # fmt: skip
    matched = (m.true_of >= 0).numpy()
    near = (m.best_cos >= cfg.cos_threshold).numpy()
    dup = ~matched & near
    rare_true = matched & (p < cfg.rare_true)
    out = np.full(len(matched), "", dtype=object)
    out[rare & ~near] = "artifact"
    out[rare & (dup | (matched & ~rare_true))] = "absorbed"
    out[rare & rare_true] = "unresolved"  # lo > hi (estimates disagree) stays unresolved
    out[rare & rare_true & (lo >= cfg.min_precision) & (lo <= hi)] = "real_rare"
    out[rare & rare_true & (hi < cfg.min_precision) & (lo <= hi)] = "imprecise"
    return out.tolist(), dup


def recovery_curve(p: Tensor, m: Matching, bins_per_decade: int = 1) -> RecoveryCurve:
    """Share of true features matched per log-spaced bin of true frequency (decade-aligned edges)."""
    lp = np.log10(p.numpy()) * bins_per_decade
    lo, hi = np.floor(lp.min() + 1e-9), np.floor(lp.max() + 1e-9) + 1
    edges = np.array(
        [10.0 ** (k / bins_per_decade) for k in range(int(lo), int(hi) + 1)]
    )  # 1e-05, not 9.99e-06
    b = (np.floor(lp + 1e-9) - lo).astype(np.int64)
    is_matched = np.zeros(len(lp), dtype=bool)
    is_matched[m.true_of[m.true_of >= 0].numpy()] = True
    n = np.bincount(b, minlength=len(edges) - 1)
    k = np.bincount(b, weights=is_matched, minlength=len(edges) - 1).astype(np.int64)
    return RecoveryCurve(torch.from_numpy(edges), torch.from_numpy(n), torch.from_numpy(k))


@torch.no_grad()
def measure_density(
    sae, source: SyntheticSource, n_rows: int, seed: int = 0, batch_rows: int = 8192
) -> Tensor:
    """[d_sae] int64 firings of each SAE feature on n_rows ordinary rows (`score`'s counts when a run's
    history is not at hand; it cannot resolve densities much below 10 / n_rows)."""
    x = source.sample(n_rows, seed)
    cols = torch.arange(sae.W_dec.shape[0])
    return _fires(sae, x, cols, batch_rows).sum(0)
