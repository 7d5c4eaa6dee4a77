"""Shared fixtures: planted SAEs, density histories and run dirs with known values."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saekit.sae.io import atomic_save_safetensors, save_sae
from saekit.sae.model import SAE, SAEConfig

STEPS = np.arange(1, 13) * 100  # window end steps of planted_history
WIN_TOKENS = 10**9  # big windows so planted densities survive rounding to integer counts


def planted_geometry(d_sae: int, d_in: int, seed: int = 0):
    """W_enc, W_dec with planted D/E projection, cosine and decoder norm, and b_enc."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d_sae, d_in, generator=g)
    u /= u.norm(dim=1, keepdim=True)
    v = torch.randn(d_sae, d_in, generator=g)
    v -= (v * u).sum(1, keepdim=True) * u
    v /= v.norm(dim=1, keepdim=True)
    de = torch.linspace(-0.5, 2.0, d_sae)  # planted D/E projection
    perp = torch.linspace(0.1, 1.0, d_sae).flip(0)
    dec_norm = torch.linspace(0.5, 1.5, d_sae)
    bias = torch.linspace(-1.0, 0.3, d_sae)
    W_dec = u * dec_norm[:, None]
    W_enc = (de[:, None] * u + perp[:, None] * v).T.contiguous()
    cos = de / (de**2 + perp**2).sqrt()
    return W_enc, bias, W_dec, dict(de=de, cos=cos, dec_norm=dec_norm, bias=bias)


def planted_history(d_sae: int = 40):
    """Counts per window for: 0-9 dead (falling, then zero in the last 3 windows), 10-19
    ultra-rare (log-linear, known final density), 20-39 live (flat). Features 5-9 and 30-31 are
    resampled at step 650 (their fit uses only later windows); 0-4 and 10-12 are the control
    group, held out at step 650."""
    n_w = len(STEPS)
    log_d = np.zeros((n_w, d_sae))
    slopes = np.zeros(d_sae)
    for i in range(10):  # falling towards death
        slopes[i] = -0.004
        log_d[:, i] = -3 + slopes[i] * (STEPS - 100)
    for j, i in enumerate(range(10, 20)):
        slopes[i] = -0.001 * (j % 3)  # 0, -0.001, -0.002 per step
        final = -6.9 + 0.08 * j  # log10 density in the last window: -6.9 .. -6.18
        log_d[:, i] = final + slopes[i] * (STEPS - STEPS[-1])
    for i in range(20, 40):
        log_d[:, i] = -1.0 - 0.05 * (i - 20)
    counts = np.round(WIN_TOKENS * 10.0**log_d).astype(np.int64)
    counts[-3:, :10] = 0
    # Resampled at 650: before it, these features had very different densities.
    counts[STEPS < 650, 30:32] = WIN_TOKENS // 2
    counts[STEPS < 650, 5:10] = WIN_TOKENS // 3
    d = {
        "counts": torch.tensor(counts),
        "window_tokens": torch.full((n_w,), WIN_TOKENS, dtype=torch.int64),
        "window_end_step": torch.tensor(STEPS, dtype=torch.int64),
        "resample_steps": torch.tensor([650], dtype=torch.int64),
        "resampled": torch.zeros(1, d_sae, dtype=torch.bool),
        "held_out": torch.zeros(1, d_sae, dtype=torch.bool),
        "control_mask": torch.zeros(d_sae, dtype=torch.bool),
    }
    d["resampled"][0, list(range(5, 10)) + [30, 31]] = True
    d["held_out"][0, list(range(0, 5)) + [10, 11, 12]] = True
    d["control_mask"][list(range(0, 5)) + [10, 11, 12]] = True
    return d, slopes


# planted_trajectories' classes: (name, expected trajectory outcome), 10 features each.
TRAJECTORY_CLASSES = (
    ("constant", "settled"),
    ("exponential", "falling"),
    ("hyperbolic", "falling"),
    ("died", "died"),
    ("too_few", "unresolved"),
    ("control", "settled"),
)


def planted_trajectories(n_live: int = 100, per_class: int = 10, seed: int = 0):
    """A density history for the trajectory test: 40 windows of 1e6 tokens (250 steps of 4,000
    tokens each), `n_live` live features at 1e-2, then `per_class` features per
    TRAJECTORY_CLASSES entry, in that order: constant at 2e-4; exponential 5e-4 falling 1.5
    decades over the run (-0.375 decades per 1e7 tokens); hyperbolic 5e-4/(1 + t/2e6 tokens);
    3e-4 until window 25, then silent; 1 firing in window 3 and 3 more later (too few);
    and a control group held out at step 2000 (the end of window 7) after firing in no window
    before, then constant at 2e-4. Returns (history dict, class name per feature [F])."""
    rng = np.random.default_rng(seed)
    n_w, tok = 40, 1_000_000
    t = (np.arange(n_w) + 0.5) * tok  # window midpoints in tokens
    rates = {
        "constant": np.full(n_w, 2e-4),
        "exponential": 5e-4 * 10 ** (-1.5 * t / (n_w * tok)),
        "hyperbolic": 5e-4 / (1 + t / 2e6),
        "died": np.where(np.arange(n_w) < 25, 3e-4, 0.0),
        "control": np.where(np.arange(n_w) < 8, 0.0, 2e-4),
    }
    cols, names = [rng.poisson(1e-2 * tok, (n_w, n_live))], ["live"] * n_live
    for name, _ in TRAJECTORY_CLASSES:
        if name == "too_few":
            c = np.zeros((n_w, per_class), dtype=np.int64)
            c[[3, 12, 20, 30], :] = 1
        else:
            c = rng.poisson(rates[name][:, None] * tok, (n_w, per_class))
        cols.append(c)
        names += [name] * per_class
    counts = np.concatenate(cols, 1).astype(np.int64)
    names = np.array(names)
    d_sae = len(names)
    held = torch.zeros(1, d_sae, dtype=torch.bool)
    held[0, torch.from_numpy(names == "control")] = True
    hist = {
        "counts": torch.from_numpy(counts),
        "window_tokens": torch.full((n_w,), tok, dtype=torch.int64),
        "window_end_step": torch.arange(1, n_w + 1, dtype=torch.int64) * 250,
        "resample_steps": torch.tensor([2000], dtype=torch.int64),
        "resampled": torch.zeros(1, d_sae, dtype=torch.bool),
        "held_out": held,
        "control_mask": held[0].clone(),
    }
    return hist, names


def write_run(run: Path, W_enc, b_enc, W_dec, hist: dict, site="resid_post", model_name="default"):
    d_in, d_sae = W_enc.shape
    sae = SAE(SAEConfig(arch="relu_l1", d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
    hook = "blocks.0.mlp.hook_post" if site == "mlp_post" else f"blocks.0.hook_{site}"
    meta = dict(
        model_name=model_name,
        hook_name=hook,
        site=site,
        layer=0,
        cache_dir=None,
        context_size=64,
        dataset="default",
        arch="relu_l1",
        d_in=d_in,
        d_sae=d_sae,
    )
    save_sae(sae, run, meta)
    n_w = len(hist["counts"])
    md = {
        "density_window": str(int(hist["window_tokens"][0])),
        "batch_size": "4096",
        "d_sae": str(d_sae),
        "dead_window_steps": "100",
    }
    atomic_save_safetensors(run / "density_history.safetensors", hist, md)
    with open(run / "metrics.jsonl", "w") as f:
        for s in (100, 200):
            f.write(
                json.dumps(
                    dict(
                        step=s,
                        tokens=s * 4096,
                        elapsed_s=1.0,
                        loss=1.0,
                        mse=1.0,
                        sparsity=1.0,
                        l0=12.5 + s,
                        fvu=0.25 + s / 1000,
                        dead=0,
                        ultra_rare=0,
                        lr=1e-3,
                        l1_coef=1.0,
                    )
                )
                + "\n"
            )
    assert n_w


def make_big_run(run: Path, d_sae: int = 16384, d_in: int = 512, n_windows: int = 100) -> None:
    """A random mlp_post SAE with a synthetic history (for the 60 s speed check)."""
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.contiguous() + 0.1 * torch.randn(d_in, d_sae, generator=g)
    bias = -0.1 * torch.rand(d_sae, generator=g)
    steps = torch.arange(1, n_windows + 1) * 500
    rate = 10 ** (-1 - 7 * torch.rand(d_sae, generator=g))
    counts = torch.poisson(
        (rate * 2_000_000).expand(n_windows, -1).contiguous(), generator=g
    ).long()
    n_ev = 4
    hist = {
        "counts": counts,
        "window_tokens": torch.full((n_windows,), 2_000_000),
        "window_end_step": steps,
        "resample_steps": torch.arange(1, n_ev + 1) * 5000,
        "resampled": torch.rand(n_ev, d_sae, generator=g) < 0.02,
        "held_out": torch.rand(n_ev, d_sae, generator=g) < 0.005,
    }
    hist["control_mask"] = hist["held_out"].any(0)
    write_run(run, W_enc, bias, W_dec, hist, site="mlp_post")


def write_synthetic_cache(out: Path, n_rows=100_000, d_in=512, n_true=1024, shard_rows=25_000,
                          seed=0, complete=True, nan_shard=None) -> Path:  # fmt: skip
    """A cache in the on-disk format holding sparse sums of random unit directions (optionally
    incomplete, or with a NaN in one shard)."""
    from saekit.activations.cache_files import write_cache

    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_true, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    p = torch.rand(n_true, generator=g) * 0.01
    shards = []
    for i, s in enumerate(range(0, n_rows, shard_rows)):
        n = min(shard_rows, n_rows - s)
        codes = (torch.rand(n, n_true, generator=g) < p) * torch.rand(n, n_true, generator=g) * 3
        a = (codes @ D + 0.05 * torch.randn(n, d_in, generator=g)).relu().float()
        if nan_shard == i:
            a[0, 0] = float("nan")
        shards.append({"activations": a, "tokens": torch.zeros(n), "context": torch.arange(s, s + n),
                       "position": torch.ones(n)})  # fmt: skip
    return write_cache(out, shards, complete=complete)


@pytest.fixture
def synthetic_cache():
    """write_synthetic_cache(out, n_rows=..., d_in=..., ...) -> the cache dir."""
    return write_synthetic_cache


@pytest.fixture(scope="session")
def mlp_post_cache(tmp_path_factory):
    """mlp_post_cache(tokens) -> a cache of the default model's mlp_post, built once per session
    for each size."""
    from saekit.activations.cache import build_cache
    from saekit.activations.cache_config import CacheConfig

    made: dict[int, Path] = {}

    def make(tokens: int) -> Path:
        if tokens not in made:
            out = tmp_path_factory.mktemp("cache") / "mlp_post"
            cfg = CacheConfig(out=out, model="default", site="mlp_post", tokens=tokens)
            made[tokens] = build_cache(cfg).path
        return made[tokens]

    return make


@pytest.fixture(scope="session")
def cache(mlp_post_cache) -> Path:
    """100k tokens of the default model's mlp_post."""
    return mlp_post_cache(100_000)


@pytest.fixture
def planted() -> SimpleNamespace:
    """Builders of planted data: geometry(d_sae, d_in), history(d_sae), trajectories() (a
    history with one planted class per trajectory outcome), write_run(run, ...), big_run(run)
    (16,384 features with a random history)."""
    return SimpleNamespace(
        geometry=planted_geometry,
        history=planted_history,
        trajectories=planted_trajectories,
        TRAJECTORY_CLASSES=TRAJECTORY_CLASSES,
        write_run=write_run,
        big_run=make_big_run,
        STEPS=STEPS,
        WIN_TOKENS=WIN_TOKENS,
    )


@pytest.fixture(scope="session", autouse=True)
def sigint_reaches_children():
    """Processes the tests start stop on SIGINT (Ctrl-C) as in a terminal: a shell starts a
    background job with SIGINT ignored, which its children would inherit."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
