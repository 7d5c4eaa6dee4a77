"""Synthetic activations whose features are known (issue 17): x = mu + sum_i a_i s_i f_i + noise.

N_true unit directions f_i in R^d (N_true > d: superposition); s_i ~ Bernoulli(p_i) independently
per row, except children, which fire only in rows where their parent fires (with a conditional
probability); per-firing magnitudes a = scale_i (offset + mean Exp(1)) >= 0; a mean offset mu and
Gaussian noise with per-dimension scales. The p_i follow a power law from p_max down to p_min,
plus planted blocks at exact densities (1e-4 ... 1e-7); the artifact-control variant has no true
feature below 1e-3, so any SAE feature rarer than 1e-5 is an artifact by construction.

A batch is a pure function of (seed, batch index, batch size): resuming at batch i is exact and
batches can be made in any order. It is drawn sparsely, O(B L0 d + N_true): each feature's firing
count in the batch (binomial), then that many distinct rows, uniformly (so exactly Bernoulli(p_i)
per row), then a scatter-add of magnitude x direction. No dense [B, N_true] pass: only features
with p >= DENSE_P are drawn densely, where distinct sampling would cost more. A batch carries its
exact active set (CSR), and `probes` makes rows with chosen features forced on (or off), which is
how diagnostics/ground_truth.py scores a 1e-6 feature without 1e8 rows.

Streams are numpy's PCG64 (and torch's generator for the noise), so the rows of a given seed are
fixed for one numpy/torch version; a run dir records its dictionary (`save`), not its rows.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..sae.errors import SaekitError
from ..sae.io import atomic_save_safetensors, atomic_write_json, load_safetensors, sha256_file
from .synthetic_config import CONTROL_FLOOR, SyntheticConfig, power_law, read_synthetic_config

__all__ = ["SyntheticConfig", "SyntheticSource", "read_synthetic_config"]

DENSE_P = 0.25  # features at least this frequent are drawn with a dense Bernoulli pass
TENSORS_FILE, JSON_FILE, FORMAT = "synthetic.safetensors", "synthetic.json", 1
MEAN_NORM_ROWS = 65536
_DICT, _ACTIVE, _PROBE, _SAMPLE, _NORM = range(5)  # independent random streams


def _spread_directions(D: Tensor, max_cos: float, iters: int = 3000) -> Tensor:
    """Unit rows with every pairwise |cos| <= max_cos: gradient steps on the summed squared excess
    over a slightly lower target, renormalising after each."""
    n, d = D.shape
    welch = math.sqrt(max(0.0, (n - d) / (d * max(n - 1, 1))))  # no n unit vectors do better
    if max_cos <= welch:
        raise SaekitError(f"max_cos {max_cos} is below the Welch bound {welch:.3f} for {n} "
                          f"directions in {d} dimensions; raise it or lower n_features")  # fmt: skip
    target = max_cos - 0.1 * (max_cos - welch)
    for _ in range(iters):
        G = (D @ D.T).fill_diagonal_(0)
        if G.abs().max() <= max_cos:
            return D
        D = D - 0.5 * (G.sign() * (G.abs() - target).clamp_min(0)) @ D
        D = D / D.norm(dim=1, keepdim=True)
    raise SaekitError(
        f"could not spread {n} directions in {d} dimensions to max |cos| {max_cos}; raise it"
    )


def _distinct(
    rng: np.random.Generator, group: np.ndarray, high: np.ndarray, n_groups: int
) -> np.ndarray:
    """Sorted keys `value * n_groups + group`, one per entry of `group` (ascending), with values
    uniform in [0, high[group]) and distinct within a group. Collisions are redrawn until none
    remain; the procedure is symmetric in the values, so each group's set is a uniformly random
    subset. The keys depend only on the draws, not on how they are sorted."""
    values = _uniform(rng, high[group])
    if len(values) and values.max() < 2**16:  # a stable radix sort by value keeps groups ascending
        keys = (values * n_groups + group)[np.argsort(values.astype(np.uint16), kind="stable")]
    else:
        keys = np.sort(values * n_groups + group)
    while len(dup := np.flatnonzero(keys[1:] == keys[:-1]) + 1):
        g = keys[dup] % n_groups
        keys = _merge(np.delete(keys, dup), _uniform(rng, high[g]) * n_groups + g)
    return keys


def _uniform(rng: np.random.Generator, high: np.ndarray) -> np.ndarray:
    """rng.integers(0, high): one scalar bound draws the same numbers as an array of it, faster."""
    if len(high) and high.min() == high.max():
        return rng.integers(0, int(high[0]), len(high))
    return rng.integers(0, high)


def _merge(keys: np.ndarray, new: np.ndarray) -> np.ndarray:
    """np.sort(np.concatenate([keys, new])) for sorted `keys`, in O(len(keys)) when `new` is short."""
    new = np.sort(new)
    return np.insert(keys, np.searchsorted(keys, new), new)


class ActiveSet(NamedTuple):
    """The exact active set of each row, as CSR: row r's features are feature[row_ptr[r]:row_ptr[r+1]]."""

    row_ptr: Tensor  # [B + 1] int64
    feature: Tensor  # [nnz] int64, ascending within a row
    magnitude: Tensor  # [nnz] float32, a >= 0

    def rows(self) -> Tensor:
        """[nnz] int64: the row of each entry."""
        return torch.repeat_interleave(torch.arange(len(self.row_ptr) - 1), self.row_ptr.diff())

    def counts(self, n_true: int) -> Tensor:
        """[n_true] int64: in how many rows each true feature fired."""
        return torch.bincount(self.feature, minlength=n_true)


class SyntheticBatch(NamedTuple):
    x: Tensor  # [B, d_in] float32
    active: ActiveSet


class Probes(NamedTuple):
    batch: SyntheticBatch
    target: Tensor  # [rows] int64: the true feature forced on (or off) in each row


# The ground truth: name -> (shape in N_true "N" and d_in "d", dtype).
_TRUTH = {"directions": ("Nd", torch.float32), "p": ("N", torch.float64), "parent": ("N", torch.int64),
          "child_prob": ("N", torch.float64), "scale": ("N", torch.float32), "mu": ("d", torch.float32),
          "noise_scale": ("d", torch.float32)}  # fmt: skip


class SyntheticSource:
    """The generator: the ground truth of a SyntheticConfig and its batches. Feature order: the
    power law (descending p), the planted blocks, the children. Everything is on the CPU: move
    batches to the training device."""

    directions: Tensor  # [N_true, d_in] float32: unit rows f_i
    p: Tensor  # [N_true] float64: marginal firing probabilities
    parent: Tensor  # [N_true] int64: -1, or the parent a child fires only with (one level)
    child_prob: Tensor  # [N_true] float64: P(fires | parent fires); 1 for roots
    scale: Tensor  # [N_true] float32: per-feature magnitude scale
    mu: Tensor  # [d_in] float32: mean offset
    noise_scale: Tensor  # [d_in] float32: per-dimension noise standard deviation

    def __init__(self, cfg: SyntheticConfig):
        cfg.check()
        gen = torch.Generator().manual_seed(
            int(np.random.default_rng([cfg.seed, _DICT]).integers(2**62))
        )
        low = max(cfg.p_min, CONTROL_FLOOR) if cfg.variant == "artifact_control" else cfg.p_min
        power = power_law(cfg.n_power, cfg.p_max, low, cfg.tail_exponent)
        planted = np.repeat(np.asarray(cfg.planted, dtype=np.float64), cfg.planted_per_block)
        par = np.repeat(np.arange(cfg.n_parents), cfg.children_per_parent)
        p = np.concatenate([power, planted[: cfg.n_planted], power[par] * cfg.child_prob])
        parent = np.concatenate([np.full(len(p) - len(par), -1), par]).astype(np.int64)
        D = torch.randn(len(p), cfg.d_in, generator=gen, dtype=torch.float64)
        D /= D.norm(dim=1, keepdim=True)
        if cfg.max_cos is not None:
            D = _spread_directions(D, cfg.max_cos)
        mu = torch.randn(cfg.d_in, generator=gen, dtype=torch.float64)
        half = 0.5 * math.log10(cfg.noise_ratio)
        noise = cfg.noise_std * torch.logspace(-half, half, cfg.d_in, dtype=torch.float64)
        t = {"directions": D, "p": torch.from_numpy(p), "parent": torch.from_numpy(parent),
             "child_prob": torch.from_numpy(np.where(parent >= 0, cfg.child_prob, 1.0)),
             "scale": torch.exp(cfg.magnitude_spread * torch.randn(len(p), generator=gen, dtype=torch.float64)),
             "mu": mu * (cfg.offset_norm / mu.norm()),
             "noise_scale": noise[torch.randperm(cfg.d_in, generator=gen)]}  # fmt: skip
        self._set(cfg, {k: v.to(_TRUTH[k][1]) for k, v in t.items()})

    def _set(self, cfg: SyntheticConfig, t: dict[str, Tensor]) -> None:
        self.cfg, self.d_in, self.n_true = cfg, cfg.d_in, len(t["p"])
        for k in _TRUTH:
            setattr(self, k, t[k])
        p, parent = self.p.numpy(), self.parent.numpy()
        root = parent < 0
        if not root[parent[~root]].all():
            raise SaekitError(
                "synthetic source: a child's parent is a child; one level is supported"
            )
        self._p_sparse = np.where(root & (p < DENSE_P), p, 0.0)
        self._dense = np.flatnonzero(root & (p >= DENSE_P))
        self._child = np.flatnonzero(~root)
        self._child_parent = parent[self._child]
        self._is_parent = np.zeros(self.n_true, dtype=bool)
        self._is_parent[self._child_parent] = True
        self._mean_norm: float | None = None

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, *key])

    # -- drawing --
    def _draw_keys(self, rng: np.random.Generator, B: int, forced: np.ndarray | None) -> np.ndarray:
        """Sorted unique keys row * N + feature of the active set of B rows; `forced`: keys that
        must be on (parents included), unioned in so that the other rows stay Bernoulli."""
        N = self.n_true
        keys = _distinct(
            rng, np.repeat(np.arange(N), rng.binomial(B, self._p_sparse)), np.full(N, B), N
        )
        if len(self._dense):
            r, c = np.nonzero(rng.random((B, len(self._dense))) < self.p.numpy()[self._dense])
            keys = _merge(keys, r * N + self._dense[c])
        if forced is not None:
            keys = np.union1d(keys, forced[self.parent.numpy()[forced % N] < 0])
        if len(self._child):
            keys = _merge(keys, self._child_keys(rng, keys))
        return keys if forced is None else np.union1d(keys, forced)

    def _child_keys(self, rng: np.random.Generator, keys: np.ndarray) -> np.ndarray:
        """Each child fires in a uniformly random Binomial(k_parent, q) subset of its parent's rows."""
        N, nc = self.n_true, len(self._child)
        pk = keys[self._is_parent[keys % N]]
        order = np.argsort(pk % N, kind="stable")  # parent-major; rows stay ascending in a parent
        seg_rows = (pk // N)[order]
        k_par = np.bincount(pk % N, minlength=N)
        start = np.concatenate([[0], np.cumsum(k_par)])
        kc = k_par[self._child_parent]
        m = rng.binomial(kc, self.child_prob.numpy()[self._child])
        ck = _distinct(rng, np.repeat(np.arange(nc), m), kc, nc)
        c = ck % nc
        return seg_rows[start[self._child_parent[c]] + ck // nc] * N + self._child[c]

    def _make(
        self,
        rng: np.random.Generator,
        B: int,
        forced: np.ndarray | None = None,
        with_x: bool = True,
    ) -> SyntheticBatch:
        noise_seed = int(rng.integers(2**62))  # drawn first, so that active() and batch() agree
        keys = self._draw_keys(rng, B, forced)
        rows, feat = keys // self.n_true, torch.from_numpy(keys % self.n_true)
        mag = rng.standard_exponential(len(keys), dtype=np.float32)
        mag = torch.from_numpy(
            mag * np.float32(self.cfg.magnitude_mean) + np.float32(self.cfg.magnitude_offset)
        )
        row_ptr = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=B), out=row_ptr[1:])
        active = ActiveSet(torch.from_numpy(row_ptr), feat, mag.mul_(self.scale[feat]))
        if not with_x:
            return SyntheticBatch(None, active)  # type: ignore[arg-type]
        # Each row's sum of magnitude x direction is one bag of an embedding_bag: no [nnz, d] temporary.
        x = F.embedding_bag(feat, self.directions, active.row_ptr, mode="sum",
                            per_sample_weights=active.magnitude, include_last_offset=True)  # fmt: skip
        z = self._z(noise_seed, B)
        return SyntheticBatch(x.add_(torch.addcmul(self.mu, z, self.noise_scale)), active)

    def _z(self, noise_seed: int, B: int) -> Tensor:
        """Standard normal [B, d_in]; the noise is z * noise_scale."""
        return torch.randn(B, self.d_in, generator=torch.Generator().manual_seed(noise_seed))

    @staticmethod
    def _check(i: int, rows: int) -> None:
        if i < 0 or rows < 1:
            raise SaekitError(f"batch {i} of {rows} rows: need a batch index >= 0 and rows >= 1")

    # -- the stream --
    def _stream_rng(self, i: int, batch_size: int, stream: int) -> np.random.Generator:
        """Batch i's generator; stream 0 is the default stream, others (a trainer's --seed) are
        independent streams of the same features."""
        self._check(i, batch_size)
        if stream < 0:
            raise SaekitError(f"stream {stream}: need a stream (seed) >= 0")
        key = (_ACTIVE, i, batch_size) if stream == 0 else (_ACTIVE, i, batch_size, stream)
        return self._rng(*key)

    def batch(self, i: int, batch_size: int, stream: int = 0) -> SyntheticBatch:
        """Batch i: rows and their exact active sets, a pure function of (seed, stream, i, batch_size)."""
        return self._make(self._stream_rng(i, batch_size, stream), batch_size)

    def active(self, i: int, batch_size: int, stream: int = 0) -> ActiveSet:
        """Batch i's active sets (equal to `batch(i, batch_size).active`), without building x."""
        rng = self._stream_rng(i, batch_size, stream)
        return self._make(rng, batch_size, with_x=False).active

    def noise(self, i: int, batch_size: int, stream: int = 0) -> Tensor:
        """Batch i's noise: x = mu + noise + the sum over its active set of magnitude x direction."""
        z = self._z(int(self._stream_rng(i, batch_size, stream).integers(2**62)), batch_size)
        return z.mul_(self.noise_scale)

    def batches(self, batch_size: int, start_batch: int = 0, stream: int = 0) -> Iterator[Tensor]:
        """x of batches start_batch, start_batch + 1, ... forever (what a trainer consumes)."""
        for i in itertools.count(start_batch):
            yield self.batch(i, batch_size, stream).x

    def sample(self, n_rows: int, seed: int) -> Tensor:
        """[n_rows, d_in] rows from a stream of their own (the geometric median, resampling)."""
        return self.sample_batch(n_rows, seed).x

    def sample_batch(self, n_rows: int, seed: int) -> SyntheticBatch:
        """`sample`'s rows with their active sets: ordinary rows apart from the training stream."""
        self._check(0, n_rows)
        return self._make(self._rng(_SAMPLE, seed, n_rows), n_rows)

    def probes(self, feature_ids: Tensor | list[int], n: int, seed: int, on: bool = True) -> Probes:
        """n rows per true feature in `feature_ids` (in blocks, in that order) with the feature
        forced on: a child's parent with it, and everything else drawn as usual given that. With
        `on=False`, forced off: ordinary rows where it fired are dropped (exact conditioning), so a
        block may hold fewer than n rows."""
        ids = torch.as_tensor(feature_ids, dtype=torch.int64).reshape(-1).numpy()
        if n < 1 or (len(ids) and (ids.min() < 0 or ids.max() >= self.n_true)):
            raise SaekitError(f"probes: feature ids must be in [0, {self.n_true}) and n >= 1")
        B, N = len(ids) * n, self.n_true
        target = np.repeat(ids, n)
        rng = self._rng(
            _PROBE, seed, int(on), n, zlib.crc32(ids.tobytes())
        )  # other ids: other rows
        own = np.arange(B) * N + target
        if on:
            par = self.parent.numpy()[target]
            forced = np.concatenate([own, (np.arange(B) * N + par)[par >= 0]])
            return Probes(self._make(rng, B, forced), torch.from_numpy(target))
        b = self._make(rng, B)
        keep = np.flatnonzero(~np.isin(own, b.active.rows().numpy() * N + b.active.feature.numpy()))
        return Probes(_select_rows(b, torch.from_numpy(keep)), torch.from_numpy(target[keep]))

    # -- summaries and the file --
    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of x on a fixed sample of MEAN_NORM_ROWS rows (as a cache's stats.mean_norm)."""
        if self._mean_norm is None:
            x = self._make(self._rng(_NORM), MEAN_NORM_ROWS).x
            self._mean_norm = float(x.norm(dim=1).mean())
        return self._mean_norm

    def spec(self) -> dict[str, Any]:
        """JSON-able description for run metadata."""
        return {"source": "synthetic", "format": FORMAT, "config": self.cfg.to_dict(),
                "n_true": self.n_true, "d_in": self.d_in, "expected_l0": float(self.p.sum()),
                "p_max": float(self.p.max()), "p_min": float(self.p.min()), "mean_norm": self.mean_norm}  # fmt: skip

    def tensors(self) -> dict[str, Tensor]:
        """The ground truth, as saved."""
        return {k: getattr(self, k) for k in _TRUTH}

    def save(self, run_dir: str | Path) -> Path:
        """Write run_dir/synthetic.safetensors (the ground truth), then synthetic.json (the spec,
        its config included, and the tensors' sha256), both atomically. Returns the JSON's path."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        sha = atomic_save_safetensors(run_dir / TENSORS_FILE, self.tensors())
        meta = {"format": FORMAT, "tensors": TENSORS_FILE, "sha256": sha, "spec": self.spec()}
        atomic_write_json(run_dir / JSON_FILE, meta)
        return run_dir / JSON_FILE

    @classmethod
    def load(cls, path: str | Path) -> SyntheticSource:
        """The source `save` wrote (a run dir or its synthetic.json), verified (checksum, tensor
        names, shapes, dtypes). The saved ground truth is used as it is, not regenerated."""
        path = Path(path)
        jpath = path / JSON_FILE if path.is_dir() else path
        if not jpath.is_file():
            raise SaekitError(f"{jpath} does not exist; the run has no synthetic ground truth")
        try:
            meta = json.loads(jpath.read_text())
            fmt, tpath, sha = meta["format"], jpath.parent / meta["tensors"], meta["sha256"]
            cfg = SyntheticConfig.from_dict(meta["spec"]["config"], where=str(jpath))
        except (ValueError, KeyError, TypeError) as e:
            raise SaekitError(
                f"{jpath} is not a synthetic ground-truth file ({e}); re-save it"
            ) from None
        if fmt != FORMAT:
            raise SaekitError(f"{jpath} has format {fmt}; this saekit reads {FORMAT}: re-save it")
        if not tpath.is_file() or sha256_file(tpath) != sha:
            raise SaekitError(
                f"{tpath} is missing or does not match its checksum in {jpath}; re-save it"
            )
        t = load_safetensors(tpath)
        dims = {"N": cfg.n_features, "d": cfg.d_in}
        for name, (shape, dtype) in _TRUTH.items():
            want = tuple(dims[c] for c in shape)
            if name not in t or tuple(t[name].shape) != want or t[name].dtype != dtype:
                raise SaekitError(f"{tpath}: {name} is missing or not {dtype} {want}; re-save it")
        src = cls.__new__(cls)
        src._set(cfg, t)
        return src


def _select_rows(b: SyntheticBatch, keep: Tensor) -> SyntheticBatch:
    """Rows `keep` (ascending) of a batch, with their active sets."""
    per_row = b.active.row_ptr.diff()
    entries = torch.repeat_interleave(
        torch.zeros(len(per_row), dtype=torch.bool).index_fill_(0, keep, True), per_row
    )
    row_ptr = F.pad(torch.cumsum(per_row[keep], 0), (1, 0))
    return SyntheticBatch(
        b.x[keep], ActiveSet(row_ptr, b.active.feature[entries], b.active.magnitude[entries])
    )
