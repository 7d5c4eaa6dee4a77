"""saekit: train sparse autoencoders on transformer activations and study how their features
live and die (above all the dead and ultra-rare ones).

The pipeline, as in a notebook (each call takes the fields of its CLI verb's config; see
`saekit <verb> --help`)::

    import saekit
    cache = saekit.cache(model="default", site="mlp_post", tokens=900_000, out="cache")
    run = saekit.train(cache, out="run", features=2048, steps=1500)
    report = saekit.diagnose(run, cache=cache, out="report")
    run.sae, run.history, report.summary, report.features   # the objects, which know their paths

Importing saekit loads nothing heavy; torch and the model code load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from .activations.cache import Cache
    from .diagnostics.evaluate import Evaluation
    from .diagnostics.report import Report
    from .training.run import Run

__all__ = ["__version__", "cache", "train", "evaluate", "diagnose", "load_cache", "load_run"]


def cache(**config: Any) -> Cache | dict[str, Cache]:
    """Harvest activations into a cache dir (`saekit cache`): `out=` and any CacheConfig field.
    Returns the Cache ({site: Cache} when `site=` names several)."""
    from .activations.cache import build_cache
    from .activations.cache_config import CacheConfig

    return build_cache(CacheConfig(**config))


def load_cache(path: str) -> Cache:
    """An existing, complete cache dir."""
    from .activations.cache import Cache

    return Cache.open(path)


def train(source: Any = None, **config: Any) -> Run:
    """Train an SAE (`saekit train`): `source` is a Cache, a cache dir, a SyntheticConfig or a
    SyntheticSource (or give model= for a live model); `out=` and any TrainConfig field."""
    from .training.run import train_api

    return train_api(source, **config)


def load_run(path: str) -> Run:
    """A finished run dir: its SAE, density history and metrics."""
    from .training.run import Run

    return Run.open(path)


def evaluate(run: Any, **config: Any) -> Evaluation:
    """Splice the SAE into its model and measure loss recovered (`saekit evaluate`)."""
    from .diagnostics.evaluate import EvaluateConfig
    from .diagnostics.evaluate import evaluate as _evaluate

    return _evaluate(EvaluateConfig(run=str(getattr(run, "path", run)), **config))


def diagnose(run: Any, **config: Any) -> Report:
    """Classify features, run the trajectory test and write the report (`saekit diagnose`)."""
    from .diagnostics.diagnose import DiagnoseConfig
    from .diagnostics.diagnose import diagnose as _diagnose

    if "cache" in config and config["cache"] is not None:
        config["cache"] = str(getattr(config["cache"], "path", config["cache"]))
    return _diagnose(DiagnoseConfig(run=str(getattr(run, "path", run)), **config))
