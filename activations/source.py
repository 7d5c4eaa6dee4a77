"""Activation sources: the one interface the trainer reads (docs/architecture.md).

Three kinds implement `Source`: `CacheSource` (a cache dir; its stream is `CacheReader`'s, bit for
bit), `SyntheticStream` (activations/synthetic.py's generator: known features, no end) and
`LiveSource` (activations/live.py: a model run as training goes). Each stream is deterministic
given (seed, batch index), so a run killed at any point resumes exactly from its step.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ..sae.errors import SaekitError
from .cache_format import entry_checksum, read_manifest
from .synthetic import SyntheticConfig, SyntheticSource, read_synthetic_config


class Source(Protocol):
    """What the trainer consumes. `batches` and `sample` return rows in activation units."""

    kind: str  # "cache" | "synthetic" | "live"
    d_in: int
    n_rows: int | None  # rows in one pass over the source (None: unlimited)

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of a row (for the default L1 coefficient and input normalisation)."""
        ...

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, *, device="cpu", dtype=torch.float32
    ) -> Iterator[Tensor]:
        """[batch_size, d_in] batches forever from `start_batch`; batch i is a pure function of
        (source, seed, batch_size, i). Closing the iterator stops its threads."""
        ...

    def sample(self, n_rows: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """[n_rows, d_in] random rows on the CPU (the geometric median, resampling)."""
        ...

    def metadata(self) -> dict[str, Any]:
        """cfg.json's description of the activations: model_name, hook_name, site, layer,
        context_size, dataset, include_bos, and `source` {kind, spec, fingerprint}."""
        ...

    def fingerprint(self) -> str:
        """The identity of the stream's contents (never a path): checkpoints refuse another."""
        ...

    def ground_truth(self) -> SyntheticSource | None:
        """The true features when the activations are synthetic (saved next to the run)."""
        ...

    def close(self) -> None: ...


def prefetched(
    make: Callable[[], Iterator[Tensor]], device, dtype, depth: int = 4
) -> Iterator[Tensor]:
    """`make()`'s items computed on a background thread, up to `depth` ahead, moved to
    (device, dtype) on the consumer's; an error there is raised here. Closing joins the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        source = make()
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
            source.close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=produce, daemon=True, name="source-batches")
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item.to(device, dtype)
    finally:
        stop.set()  # joined, not left running (see CacheReader.batches)
        while thread.is_alive():
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def content_sha(obj: Any, tensors: dict[str, Tensor] | None = None) -> str:
    h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode())
    for k, t in sorted((tensors or {}).items()):
        h.update(k.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- the cache


def cache_fingerprint(manifest: dict) -> str:
    """The identity of a cache's contents (its shards' hashes, in order), not of its path."""
    shards = manifest.get("shards") or []
    return hashlib.sha256("\n".join(entry_checksum(s) for s in shards).encode()).hexdigest()


class CacheSource:
    """A complete cache dir; `batches` is `CacheReader(dir, batch_size, seed).batches(start)`."""

    kind = "cache"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise SaekitError(f"--cache {path} is not a directory; build one with `saekit cache`")
        self.manifest = read_manifest(self.path)
        if self.manifest.get("complete") is False:
            raise SaekitError(f"cache {path} is incomplete; finish it by re-running `saekit cache`")
        m = self.manifest
        try:
            self.d_in = int(m["d_in"])
            self._mean_norm = float(m["stats"]["mean_norm"])
        except (KeyError, TypeError, ValueError):
            raise SaekitError(
                "the cache manifest lacks d_in or stats.mean_norm; rebuild the cache with `saekit cache`"
            ) from None
        n = m.get("n_tokens") or sum(int(s["rows"]) for s in m.get("shards", []))
        self.n_rows: int | None = int(n)

    @property
    def mean_norm(self) -> float:
        return self._mean_norm

    def batches(self, batch_size, seed, start_batch=0, *, device="cpu", dtype=torch.float32):
        from .cache_reader import CacheReader

        reader = CacheReader(self.path, batch_size, seed=seed, device=device, dtype=dtype)
        return reader.batches(start_batch)

    def sample(self, n_rows: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
        from .cache_reader import CacheReader

        return CacheReader(self.path, 1, dtype=dtype).sample(n_rows, seed)

    def fingerprint(self) -> str:
        return cache_fingerprint(self.manifest)

    def metadata(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model_name": m.get("model"),
            "hook_name": m.get("hook_name") or m.get("hook"),
            "site": m.get("site"),
            "layer": m.get("layer"),
            # The cache by name and content, never by a path of the machine that trained.
            "cache": self.path.name,
            "cache_fingerprint": self.fingerprint(),
            "include_bos": bool(m.get("include_bos", False)),
            "context_size": m.get("context_size"),
            "dataset": m.get("dataset"),
            "source": {"kind": "cache", "spec": {"cache": self.path.name},
                       "fingerprint": self.fingerprint()},
        }  # fmt: skip

    def ground_truth(self) -> SyntheticSource | None:
        """A synthetic cache's (`saekit cache --model synthetic`) true features."""
        if (self.path / "synthetic.json").is_file():
            return SyntheticSource.load(self.path)
        return None

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- synthetic


def _field_value(name: str, text: str, where: str) -> Any:
    """A FIELD=VALUE item's value, typed by SyntheticConfig's annotation of FIELD."""
    hints = typing.get_type_hints(SyntheticConfig)
    if name not in hints:
        fields = ", ".join(hints)
        raise SaekitError(f"{where}: unknown field {name!r}; fields: {fields}")
    tp = hints[name]
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
    try:
        if optional and text.lower() in ("none", "null"):
            return None
        if typing.get_origin(base) is list:
            return [float(v) for v in text.split(",") if v.strip()]
        if base in (int, float):
            return base(text)
        return text
    except ValueError:
        raise SaekitError(
            f"{where}: {name}={text!r} is not a valid value; see SyntheticConfig"
        ) from None


def parse_synthetic(items: list[str] | None, where: str = "--synthetic") -> SyntheticConfig:
    """A SyntheticConfig from --synthetic's items: JSON/YAML files of its fields and FIELD=VALUE
    items (a list as comma-separated numbers), later items winning; [] or None: the defaults."""
    d: dict[str, Any] = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        if eq and key and "/" not in key:
            d[key.strip().replace("-", "_")] = _field_value(
                key.strip().replace("-", "_"), text.strip(), where
            )
        elif Path(item).is_file():
            d.update(read_synthetic_config(item).to_dict())
        else:
            raise SaekitError(
                f"{where}: {item!r} is neither a JSON/YAML file nor FIELD=VALUE (e.g. n_features=1024)"
            )
    if not items:
        return SyntheticConfig()
    return SyntheticConfig.from_dict(d, where=where)


class SyntheticStream:
    """The synthetic generator as a `Source`: batch i of training seed s is the generator's
    batch i of stream s (so --seed varies the rows, the config's seed the dictionary). Rows are
    made on a background thread, a few batches ahead."""

    kind = "synthetic"
    n_rows: int | None = None

    def __init__(self, source: SyntheticSource | SyntheticConfig):
        self.generator = source if isinstance(source, SyntheticSource) else SyntheticSource(source)
        self.d_in = self.generator.d_in

    @property
    def mean_norm(self) -> float:
        return self.generator.mean_norm

    def batches(self, batch_size, seed, start_batch=0, *, device="cpu", dtype=torch.float32):
        return prefetched(
            lambda: self.generator.batches(batch_size, start_batch, stream=seed), device, dtype
        )

    def sample(self, n_rows: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.generator.sample(n_rows, seed).to(dtype)

    def fingerprint(self) -> str:
        return content_sha({"synthetic": 1}, self.generator.tensors())

    def metadata(self) -> dict[str, Any]:
        cfg = self.generator.cfg.to_dict()
        return {
            "model_name": "synthetic",
            "hook_name": "synthetic",
            "site": None,
            "layer": None,
            "include_bos": False,
            "context_size": None,
            "dataset": None,
            "source": {"kind": "synthetic", "spec": cfg, "fingerprint": self.fingerprint()},
        }

    def ground_truth(self) -> SyntheticSource | None:
        return self.generator

    def close(self) -> None:
        pass


def is_synthetic(model: str | None, synthetic: list[str] | None) -> bool:
    """Whether --model/--synthetic ask for synthetic activations."""
    return model == "synthetic" or synthetic is not None
