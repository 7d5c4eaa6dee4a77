"""Training without a cache: `LiveSource` runs the model as training goes (as SAELens'
ActivationsStore and sparsify do) and serves shuffled batches of one hook's activations.

The stream, deterministic given (seed, batch index):
- the contexts are the corpus tokenised as the cache does it (activations/corpus.py), BOS rows
  left out unless `include_bos`;
- epoch e visits them in a random order (seeded by (seed, e)), cut into chunks of
  `buffer_tokens // context_size` contexts; a chunk's rows come from forward passes of
  `model_batch_size` contexts (stop_at_layer and a names_filter: activations/sites.py's
  `harvest`) and are permuted with a seed of (seed, e, chunk);
- batch i is rows [i B, (i + 1) B) of the concatenated chunks. Resuming at batch i recomputes
  only the chunk holding its first row (rows per context are counted from the tokens alone).

Memory: the chunk being served plus the next one, computed on a background thread while the
current one trains: 2 x buffer_tokens x d_in x 4 bytes (float32) plus a few batches (at the
default 65,536 tokens and d_in 512: 256 MB). The model itself is used under a lock, so a
`sample` (the geometric median, resampling) never runs a forward pass alongside the producer's.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..sae.errors import SaekitError
from .source import content_sha, prefetched

POOL_TOKENS = 2_000_000  # at least this much of the corpus is tokenised (all of the default)
MEAN_NORM_ROWS = 16_384  # rows of a fixed sample whose mean norm stands for the source's
_SAMPLE, _NORM = 0x5A3, 0x4E0


class LiveSource:
    """Activations of `hook`/`site` at `layer` of `model` on `dataset`, computed on demand."""

    kind = "live"

    def __init__(
        self,
        model: str = "default",
        site: str = "mlp_post",
        layer: int = 0,
        hook: str | None = None,
        dataset: str = "default",
        split: str = "train",
        text_column: str = "text",
        context_size: int = 128,
        model_batch_size: int = 32,
        buffer_tokens: int = 65_536,
        include_bos: bool = False,
        device: str = "cpu",
        max_tokens: int | None = None,
    ):
        from .corpus import load_texts, tokenize_contexts
        from .models import load_model, model_spec
        from .sites import resolve_hook

        if context_size < 2 or model_batch_size < 1 or buffer_tokens < context_size:
            raise SaekitError(
                f"need --context-size >= 2, --model-batch-size >= 1 and --buffer-tokens >= --context-size "
                f"(got {context_size}, {model_batch_size}, {buffer_tokens})"
            )
        self.model = load_model(model, device, torch.float32)
        self.model.eval()
        tok = self.model.tokenizer
        if tok is None or tok.bos_token_id is None:
            raise SaekitError(f"model {model} has no tokenizer with a BOS token; it cannot be used")
        if context_size > self.model.cfg.n_ctx:
            raise SaekitError(
                f"--context-size {context_size} exceeds the model's n_ctx {self.model.cfg.n_ctx}; lower it"
            )
        self.site = resolve_hook(self.model, site, layer, hook)
        self.d_in = self.site.d_in
        self.device, self.context_size, self.include_bos = device, context_size, include_bos
        self.model_batch_size = model_batch_size
        self.chunk_contexts = max(1, buffer_tokens // context_size)
        texts = load_texts(dataset, split, text_column)
        self.tokens = tokenize_contexts(
            texts, tok, context_size, max_tokens=max(POOL_TOKENS, max_tokens or 0)
        )
        keep = self.keep(self.tokens)
        self.rows_per_context = keep.sum(1).numpy()
        self.n_rows: int | None = int(self.rows_per_context.sum())
        if not self.n_rows:
            raise SaekitError(f"dataset {dataset!r} gives no rows to train on; use more text")
        self._spec = {
            "model": model_spec(self.model), "site": self.site.site, "hook_name": self.site.hook_name,
            "layer": self.site.layer, "context_size": context_size, "include_bos": include_bos,
            "dataset": {"name": dataset, "split": split, "text_column": text_column},
            "contexts": len(self.tokens), "buffer_contexts": self.chunk_contexts,
            "model_batch_size": model_batch_size,
        }  # fmt: skip
        self._lock = threading.Lock()
        self._mean_norm: float | None = None
        self._fingerprint: str | None = None

    def keep(self, tokens: Tensor) -> Tensor:
        """[n, context_size] bool: the positions whose rows are served (BOS left out)."""
        if self.include_bos:
            return torch.ones_like(tokens, dtype=torch.bool)
        return tokens != self.model.tokenizer.bos_token_id

    # -- forward passes --
    def rows_of(self, ids: np.ndarray) -> Tensor:
        """[rows, d_in] float32 on the CPU: the kept rows of contexts `ids`, in order."""
        from .sites import harvest

        n = int(self.rows_per_context[ids].sum())
        out = torch.empty(n, self.d_in, dtype=torch.float32)
        at = 0
        for b in range(0, len(ids), self.model_batch_size):
            tok = self.tokens[torch.from_numpy(ids[b : b + self.model_batch_size])]
            idx = self.keep(tok).reshape(-1).nonzero().squeeze(1)
            with self._lock:  # TransformerLens' hooks live on the model: one forward at a time
                (a,) = harvest(self.model, tok.to(self.device), idx.to(self.device), [self.site])
            out[at : at + len(a)] = a.float().cpu()
            at += len(a)
        return out

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(self.tokens))

    def _chunk(self, seed: int, epoch: int, j: int, order: np.ndarray) -> tuple[Tensor, np.ndarray]:
        acts = self.rows_of(order[j * self.chunk_contexts : (j + 1) * self.chunk_contexts])
        return acts, np.random.default_rng([seed, epoch, j]).permutation(len(acts))

    def _host_batches(self, batch_size: int, seed: int, start_batch: int) -> Iterator[Tensor]:
        """The stream on the host: the chunk after the current one is computed on a pool thread."""
        epoch, skip = divmod(start_batch * batch_size, self.n_rows)
        C = self.chunk_contexts
        order = self._order(seed, epoch)
        per_chunk = lambda o: np.add.reduceat(self.rows_per_context[o], np.arange(0, len(o), C))  # noqa: E731
        rows = per_chunk(order)
        j = 0
        while skip >= rows[j]:  # the chunk holding the first row
            skip -= int(rows[j])
            j += 1
        key = (epoch, j, order)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-forward")

        def after(e: int, j: int, order: np.ndarray) -> tuple[int, int, np.ndarray]:
            n_chunks = math.ceil(len(order) / C)
            return (e, j + 1, order) if j + 1 < n_chunks else (e + 1, 0, self._order(seed, e + 1))

        try:
            fut = pool.submit(self._chunk, seed, *key)
            carry: list[Tensor] = []
            n_carry = 0
            while True:
                acts, perm = fut.result()
                key = after(*key)
                fut = pool.submit(self._chunk, seed, *key)
                x = acts.numpy()
                i, skip = skip, 0
                while i < len(perm):
                    take = min(batch_size - n_carry, len(perm) - i)
                    part = torch.from_numpy(x[perm[i : i + take]])
                    i += take
                    if n_carry == 0 and take == batch_size:
                        yield part
                        continue
                    carry.append(part)
                    n_carry += take
                    if n_carry == batch_size:
                        yield torch.cat(carry)
                        carry, n_carry = [], 0
                del acts, perm, x
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- the Source interface --
    def batches(self, batch_size, seed, start_batch=0, *, device="cpu", dtype=torch.float32):
        return prefetched(lambda: self._host_batches(batch_size, seed, start_batch), device, dtype)

    def sample(self, n_rows: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows of random contexts (taken whole, in a seeded order, until there are enough),
        then a random n_rows of them; with replacement only past the corpus' rows."""
        rng = np.random.default_rng([seed, _SAMPLE])
        order = rng.permutation(len(self.tokens))
        need = np.searchsorted(np.cumsum(self.rows_per_context[order]), n_rows) + 1
        acts = self.rows_of(order[:need])
        idx = rng.choice(len(acts), size=n_rows, replace=n_rows > len(acts))
        return acts[torch.from_numpy(idx)].to(dtype)

    @property
    def mean_norm(self) -> float:
        """Mean row norm on a fixed sample of MEAN_NORM_ROWS rows (the same for every --seed)."""
        if self._mean_norm is None:
            x = self.sample(min(MEAN_NORM_ROWS, self.n_rows or 1), _NORM)
            self._mean_norm = float(x.double().norm(dim=1).mean())
        return self._mean_norm

    def fingerprint(self) -> str:
        """The model's weights, the site, the contexts and the stream's settings."""
        if self._fingerprint is None:
            params = {
                f"w.{k}": v for k, v in self.model.state_dict().items() if v.is_floating_point()
            }
            self._fingerprint = content_sha(self._spec, {"tokens": self.tokens, **params})
        return self._fingerprint

    def metadata(self) -> dict[str, Any]:
        s = self._spec
        return {
            "model_name": s["model"],
            "hook_name": s["hook_name"],
            "site": s["site"],
            "layer": s["layer"],
            "include_bos": self.include_bos,
            "context_size": self.context_size,
            "dataset": s["dataset"],
            "source": {"kind": "live", "spec": s, "fingerprint": self.fingerprint()},
        }

    def ground_truth(self) -> None:
        return None

    def close(self) -> None:
        pass
