"""The synthetic source's spec (issue 17): a dataclass read from flags, JSON or YAML, checked
before anything is drawn. The generator itself is activations/synthetic.py."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..sae.errors import SEED_MAX, SaekitError

CONTROL_FLOOR = 1e-3  # artifact_control: no true feature is rarer than this


@dataclass
class SyntheticConfig:
    """A synthetic activation source: true features, their frequencies, magnitudes and noise."""

    d_in: int = 64
    """Width of the activations."""
    n_features: int = 512
    """Number of true features N_true, planted blocks and children included (> d_in: superposition)."""
    p_max: float = 0.1
    """Firing probability of the most frequent power-law feature."""
    p_min: float = 1e-7
    """Firing probability of the rarest power-law feature."""
    tail_exponent: float = 0.0
    """beta of the power law dN/dp ~ p^-(1+beta) that spaces the power-law features from p_max to p_min: 0 puts the same number in every decade (log-uniform, so every bin of the recovery curve gets as many); beta > 0 puts more at the rare end, where p_r ~ r^(-1/beta) (Zipf's law with exponent 1/beta)."""
    planted: list[float] = field(default_factory=lambda: [1e-4, 1e-5, 1e-6, 1e-7])
    """Firing probabilities of the planted blocks: features at exactly these densities."""
    planted_per_block: int = 16
    """Features in each planted block."""
    n_parents: int = 0
    """Parents: the n most frequent power-law features get children (0: no hierarchy)."""
    children_per_parent: int = 2
    """Children of each parent; a child fires only in rows where its parent fires."""
    child_prob: float = 0.25
    """P(child fires | parent fires), independently for each child."""
    magnitude_offset: float = 0.5
    """Each firing's magnitude is scale_i (offset + mean Exp(1)): the offset is the smallest."""
    magnitude_mean: float = 1.0
    """Mean of the exponential part of each firing's magnitude."""
    magnitude_spread: float = 0.0
    """sigma of the log-normal per-feature scale_i (0: every feature has scale 1)."""
    max_cos: float | None = None
    """Largest |cosine| between two true directions (None: independent random unit vectors); reached by pushing apart the pairs above it."""
    offset_norm: float = 1.0
    """Norm of the mean offset mu (a random direction)."""
    noise_std: float = 0.05
    """Geometric mean of the per-dimension standard deviations of the Gaussian noise."""
    noise_ratio: float = 10.0
    """Largest over smallest per-dimension noise scale (log-spaced, in random order; 1: isotropic)."""
    variant: Literal["standard", "artifact_control"] = "standard"
    """artifact_control: no true feature below 1e-3 (the power law stops there and the planted blocks' features join it), so every SAE feature rarer than 1e-5 is an artifact."""
    seed: int = 0
    """Seed of the dictionary and of every batch."""

    @property
    def n_planted(self) -> int:
        return (
            0 if self.variant == "artifact_control" else len(self.planted) * self.planted_per_block
        )

    @property
    def n_power(self) -> int:
        return self.n_features - self.n_planted - self.n_parents * self.children_per_parent

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "synthetic config") -> SyntheticConfig:
        """The config from a mapping (a JSON/YAML spec); SaekitError on unknown fields or bad values."""
        if not isinstance(d, dict):
            raise SaekitError(f"{where} must be a mapping of field names to values")
        d = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise SaekitError(f"{where}: unknown field(s) {unknown}; see SyntheticConfig")
        cfg = cls(**d)
        cfg.check(where)
        return cfg

    def check(self, where: str = "synthetic config") -> None:
        """SaekitError naming the first bad field and what it must be."""
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        prob = lambda v: num(v) and 0 < v < 1  # noqa: E731
        rules: list[tuple[str, Any, str]] = [
            ("d_in", lambda v: whole(v) and v >= 1, "an integer >= 1"),
            *((n, whole, "an integer >= 0") for n in ("n_features", "planted_per_block",
              "n_parents", "children_per_parent")),
            ("seed", lambda v: whole(v) and v <= SEED_MAX, f"an integer from 0 to {SEED_MAX}"),
            ("p_max", prob, "in (0, 1)"),
            ("p_min", lambda v: prob(v) and v <= self.p_max, "in (0, p_max]"),
            ("tail_exponent", num, "a number"),
            ("planted", lambda v: isinstance(v, list) and all(map(prob, v)), "a list of numbers in (0, 1)"),
            ("child_prob", lambda v: num(v) and 0 < v <= 1, "in (0, 1]"),
            *((n, lambda v: num(v) and v >= 0, "a number >= 0") for n in ("magnitude_offset",
              "magnitude_mean", "magnitude_spread", "offset_norm", "noise_std")),
            ("magnitude_mean", lambda v: v + self.magnitude_offset > 0, "> 0 when magnitude_offset is 0"),
            ("noise_ratio", lambda v: num(v) and v >= 1, "a number >= 1 (1: isotropic noise)"),
            ("max_cos", lambda v: v is None or prob(v), "in (0, 1) or null"),
            ("variant", lambda v: v in ("standard", "artifact_control"), "standard or artifact_control"),
            ("n_features", lambda v: self.n_power >= max(1, self.n_parents),
             "large enough to leave a power-law feature for each parent after the planted blocks and children"),
        ]  # fmt: skip
        for name, ok, what in rules:
            if not ok(getattr(self, name)):
                raise SaekitError(f"{where}: {name} must be {what}, not {getattr(self, name)!r}")
        if self.variant == "artifact_control":
            if self.p_max <= CONTROL_FLOOR:
                raise SaekitError(f"{where}: artifact_control needs p_max > {CONTROL_FLOOR}")
            low = max(self.p_min, CONTROL_FLOOR)
            power = power_law(self.n_power, self.p_max, low, self.tail_exponent)
            if self.n_parents and power[self.n_parents - 1] * self.child_prob < CONTROL_FLOOR:
                raise SaekitError(f"{where}: artifact_control: a child would fire below "
                                  f"{CONTROL_FLOOR}; raise child_prob or lower n_parents")  # fmt: skip


def read_synthetic_config(path: str | Path) -> SyntheticConfig:
    """A SyntheticConfig from a JSON or YAML file (the `--synthetic` spec)."""
    p = Path(path)
    if not p.is_file():
        raise SaekitError(f"synthetic config {path} does not exist; check the path")
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            data = _yaml_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # JSON, YAML or UTF-8 errors
        raise SaekitError(f"synthetic config {path} is not valid JSON/YAML ({e})") from None
    return SyntheticConfig.from_dict(data, where=f"synthetic config {path}")


def _yaml_load(text: str) -> Any:
    """yaml.safe_load, but reading 1e-7 as a number (YAML 1.1, PyYAML's, wants 1.0e-7)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    num = (
        r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(num), list("-+0123456789."))
    loader = Loader(text)  # what yaml.load does, spelled out so no unsafe loader can slip in
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def power_law(n: int, p_max: float, p_min: float, beta: float) -> np.ndarray:
    """n frequencies from p_max down to p_min at evenly spaced quantiles of dN/dp ~ p^-(1+beta)."""
    u = np.linspace(0.0, 1.0, n)
    if beta == 0:
        return p_max * (p_min / p_max) ** u
    a, b = p_max**-beta, p_min**-beta
    return (a + u * (b - a)) ** (-1.0 / beta)
