"""Reading a cache: `CacheReader`, the trainer's deterministic, shuffled stream of verified
activation batches (and random samples of rows)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..sae.errors import SaekitError
from .cache_format import DTYPES, SHARD_KEYS, read_manifest, read_verified


class CacheReader:
    """A deterministic, shuffled, endless stream of activation batches from a cache dir.

    Epoch e visits the shards in a random order (seeded by (seed, e)); they are loaded
    `shuffle_shards` at a time and the rows of each group are permuted (seeded by (seed, e, g)),
    so batches mix shards and contexts. Batch i is rows [i*B, (i+1)*B) of that stream: a pure
    function of (cache, seed, batch_size, i), so training resumes exactly from `start_batch`.
    A background thread loads and verifies the next group while the current one is consumed;
    memory holds at most two groups.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        batch_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        shuffle_shards: int = 8,
    ):
        if batch_size < 1 or shuffle_shards < 1:
            raise SaekitError(
                f"batch size and shuffle_shards must be at least 1, not {batch_size}, {shuffle_shards}"
            )
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        self.d_in: int = self.manifest["d_in"]
        self.batch_size, self.seed, self.device, self.dtype = batch_size, seed, device, dtype
        self.shuffle_shards = shuffle_shards
        self.shards = self.manifest["shards"]
        self.rows = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.n_rows = int(self.rows.sum())
        if self.n_rows == 0:
            raise SaekitError(f"cache {self.dir} has no rows; rebuild it with more --tokens")

    def load_shard(self, i: int) -> dict[str, Tensor]:
        """Shard i's tensors, verified against the manifest (size, checksum, keys, dtype, shape, finite)."""
        entry = self.shards[i]
        path = self.dir / entry["file"]
        t = read_verified(path, entry)
        a = t.get("activations")
        want = (entry["rows"], self.d_in)
        if (
            set(t) != set(SHARD_KEYS)
            or a is None
            or tuple(a.shape) != want
            or a.dtype != DTYPES[self.manifest["dtype"]]
        ):
            raise SaekitError(
                f"cache file {path} does not match the manifest (keys, dtype or shape); rebuild the cache"
            )
        if not bool(torch.isfinite(a).all()):
            raise SaekitError(f"cache file {path} holds NaN or inf activations; rebuild the cache")
        return t

    def _epoch_groups(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [
            order[i : i + self.shuffle_shards] for i in range(0, len(order), self.shuffle_shards)
        ]

    def _load_group(self, epoch: int, g: int, shard_ids: np.ndarray) -> tuple[Tensor, Tensor]:
        acts = torch.empty(int(self.rows[shard_ids].sum()), self.d_in, dtype=self.dtype)
        at = 0
        for i in shard_ids:  # one shard at a time: memory is the group plus one shard
            a = self.load_shard(int(i))["activations"]
            acts[at : at + len(a)] = a
            at += len(a)
        perm = np.random.default_rng([self.seed, epoch, g]).permutation(len(acts))
        return acts, torch.from_numpy(perm)

    def batches(self, start_batch: int = 0, depth: int = 4) -> Iterator[Tensor]:
        """Batches [batch_size, d_in] forever, starting with batch `start_batch`. A background
        thread cuts them (the shuffle's gather), up to `depth` ahead, while the consumer trains;
        a load error is raised here, on the consumer's thread."""
        q: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()

        def produce() -> None:
            source = self._host_batches(start_batch)
            try:
                for item in source:
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if stop.is_set():
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)
            finally:
                source.close()

        thread = threading.Thread(target=produce, daemon=True, name="cache-batches")
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item.to(self.device)
        finally:
            # Joined, not left running: a daemon thread still inside a torch op when the
            # interpreter exits is killed mid-C++ frame, which aborts the process ("terminate
            # called without an active exception") after a run that had finished.
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.1)  # unblock a put of an error
                except queue.Empty:
                    pass
            thread.join()

    def _host_batches(self, start_batch: int) -> Iterator[Tensor]:
        """The stream of `batches`, in host memory, computed on the calling thread."""
        pos = start_batch * self.batch_size
        epoch, skip = divmod(pos, self.n_rows)
        groups = self._epoch_groups(epoch)
        g = 0
        while skip >= (n := int(self.rows[groups[g]].sum())):  # find the group holding row `pos`
            skip -= n
            g += 1

        def next_key(e: int, g: int, groups: list) -> tuple[int, int, list]:
            return (
                (e, g + 1, groups) if g + 1 < len(groups) else (e + 1, 0, self._epoch_groups(e + 1))
            )

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-prefetch")
        try:
            fut = pool.submit(self._load_group, epoch, g, groups[g])
            key = (epoch, g, groups)
            carry: list[Tensor] = []
            n_carry = 0
            while True:
                acts, perm = fut.result()  # re-raises a load error
                key = next_key(*key)
                fut = pool.submit(self._load_group, key[0], key[1], key[2][key[1]])
                # The gather in numpy: one thread, where a torch op on this thread would start
                # a second OpenMP team competing with the trainer's for the cores.
                dtype = acts.dtype
                rows = (acts.view(torch.int16) if dtype == torch.bfloat16 else acts).numpy()
                perm_np = perm.numpy()
                i = skip
                skip = 0
                while i < len(perm):
                    take = min(self.batch_size - n_carry, len(perm) - i)
                    part = torch.from_numpy(rows[perm_np[i : i + take]]).view(dtype)
                    i += take
                    if n_carry == 0 and take == self.batch_size:
                        yield part
                        continue
                    carry.append(part)
                    n_carry += take
                    if n_carry == self.batch_size:
                        yield torch.cat(carry)
                        carry, n_carry = [], 0
                del acts, perm, rows
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def sample(self, n_rows: int, seed: int) -> Tensor:
        """`n_rows` rows drawn uniformly at random (without replacement if the cache has enough),
        in random order, [n_rows, d_in]. Reads one shard at a time."""
        rng = np.random.default_rng([seed, 0x5A3])
        idx = rng.choice(self.n_rows, size=n_rows, replace=n_rows > self.n_rows)
        bounds = np.concatenate([[0], np.cumsum(self.rows)])
        shard_of = np.searchsorted(bounds, idx, side="right") - 1
        out = torch.empty(n_rows, self.d_in, dtype=self.dtype)
        for i in np.unique(shard_of):
            sel = np.nonzero(shard_of == i)[0]
            acts = self.load_shard(int(i))["activations"]
            out[torch.from_numpy(sel)] = acts[torch.from_numpy(idx[sel] - bounds[i])].to(self.dtype)
        return out.to(self.device)
