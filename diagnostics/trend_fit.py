"""Vectorised Poisson trend fits: for every column (feature) of [W, F] count arrays at once,
the maximum-likelihood slope b of  log mu_w = logw_w + a + b x_w  with the intercept a profiled
out, its profile likelihood, likelihood-ratio interval bounds and signed roots.

With a free intercept the profile log-likelihood of b is the multinomial one of where the S
counts fell given S:  l(b) = b * sum_w y_w x_w - S * log sum_w exp(logw_w + b x_w),  concave in
b, so every fit is a one-dimensional safeguarded Newton search. Unused cells carry logw = -inf
and x = 0. Covariates are scaled to [0, 1] per column, so b is in nats over the column's span.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

# Bound on a slope over a column's span, in nats: e^40 is "all counts at one end".
B_MAX = 40.0


def moments(b: np.ndarray, logw: np.ndarray, x: np.ndarray, var: bool = True):
    """log sum_w exp(logw + b x), and the mean and variance of x under those weights."""
    p = b * x
    p += logw
    zmax = p.max(0)
    p -= zmax
    np.exp(p, out=p)
    s = p.sum(0)
    ex = np.einsum("wf,wf->f", p, x) / s
    vx = np.maximum(np.einsum("wf,wf,wf->f", p, x, x) / s - ex * ex, 0.0) if var else None
    return zmax + np.log(s), ex, vx


def root(
    f: Callable[[np.ndarray, np.ndarray | slice], tuple[np.ndarray, np.ndarray]],
    lo: np.ndarray,
    hi: np.ndarray,
    x0: np.ndarray,
    tol: float = 1e-9,
    iters: int = 100,
) -> np.ndarray:
    """Root of increasing functions f(x, cols) -> (value, slope) in [lo, hi] per column:
    Newton's step when it stays inside the bracket, bisection otherwise. A column whose f keeps
    one sign ends at that end of its bracket."""
    x, lo, hi = x0.copy(), lo.copy(), hi.copy()
    act = np.arange(len(x))
    for _ in range(iters):
        if len(act) == 0:
            break
        # All columns still active: a slice, so that f does not copy its [W, F] arrays.
        v, d = f(x[act], slice(None) if len(act) == len(x) else act)
        hi[act] = np.where(v > 0, x[act], hi[act])
        lo[act] = np.where(v <= 0, x[act], lo[act])
        with np.errstate(divide="ignore", invalid="ignore"):
            nx = x[act] - v / d
        bad = ~np.isfinite(nx) | (nx <= lo[act]) | (nx >= hi[act])
        nx = np.where(bad, 0.5 * (lo[act] + hi[act]), nx)
        done = (np.abs(nx - x[act]) < tol) | (hi[act] - lo[act] < tol)
        x[act] = nx
        act = act[~done]
    return x


class Fit(NamedTuple):
    b: np.ndarray  # [n] slope over the scaled covariate (nats over the span)
    loglik: np.ndarray  # [n] profile log-likelihood at b (up to a constant per feature)
    loglik0: np.ndarray  # [n] at b = 0 (the constant model)
    mu: np.ndarray  # [W, n] fitted counts


def fit_slope(y: np.ndarray, logw: np.ndarray, x: np.ndarray, b0: np.ndarray | None = None) -> Fit:
    """Maximum likelihood of log mu_w = logw_w + a + b x_w per column, a profiled out (Newton
    from b0, default 0)."""
    t1, s = (y * x).sum(0), y.sum(0)

    def score(b, cols):  # -(d loglik / db), increasing in b
        _, ex, vx = moments(b, logw[:, cols], x[:, cols])
        return s[cols] * ex - t1[cols], s[cols] * vx

    n = y.shape[1]
    b = root(score, np.full(n, -B_MAX), np.full(n, B_MAX), np.zeros(n) if b0 is None else b0)
    lz, _, _ = moments(b, logw, x, var=False)
    lz0, _, _ = moments(np.zeros(n), logw, x, var=False)
    mu = s * np.exp(logw + b * x - lz)
    return Fit(b, b * t1 - s * lz, -s * lz0, mu)


def loglik(b: np.ndarray, y: np.ndarray, logw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The profile log-likelihood l(b) per column (the constant is Fit.loglik's)."""
    lz, _, _ = moments(b, logw, x, var=False)
    return b * (y * x).sum(0) - y.sum(0) * lz


def bound(fit: Fit, y, logw, x, k: np.ndarray, side: int) -> np.ndarray:
    """Where the likelihood-ratio statistic 2(l(b_hat) - l(b)) reaches k, on one side of b_hat
    (side +1: above, -1: below); +-inf when it stays below k up to the slope bound."""
    t1, s = (y * x).sum(0), y.sum(0)
    end = np.full(len(k), side * B_MAX)
    never = 2 * (fit.loglik - loglik(end, y, logw, x)) < k

    def f(b, cols):  # side * (k - LR) below b_hat, (LR - k) above: increasing in b
        lz, ex, _ = moments(b, logw[:, cols], x[:, cols], var=False)
        lr = 2 * (fit.loglik[cols] - (b * t1[cols] - s[cols] * lz))
        g = t1[cols] - s[cols] * ex  # d loglik / db
        return side * (lr - k[cols]), -2 * side * g

    lo, hi = (fit.b, end) if side > 0 else (end, fit.b)
    r = root(f, lo, hi, fit.b + side * 1e-6)
    return np.where(never, side * np.inf, r)


def signed_root(fit: Fit, y, logw, x, b0: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """sign(b_hat - b0) * sqrt(2(l(b_hat) - l(b0)) / phi): about standard normal when b = b0
    (Student's t when phi is estimated)."""
    lr = np.maximum(2 * (fit.loglik - loglik(b0, y, logw, x)), 0.0)
    return np.sign(fit.b - b0) * np.sqrt(lr / phi)


def scaled(v: np.ndarray, used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v [W, n] rescaled to [0, 1] over each column's used windows (0 elsewhere), and the span."""
    lo = np.where(used, v, np.inf).min(0)
    hi = np.where(used, v, -np.inf).max(0)
    span = hi - lo
    return np.where(used, (v - lo) / span, 0.0), span


def pearson(y: np.ndarray, mu: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Pearson's statistic sum_w (y - mu)^2 / mu per column over the used cells."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(used & (mu > 0), (y - mu) ** 2 / mu, 0.0).sum(0)
