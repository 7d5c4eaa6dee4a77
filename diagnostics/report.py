"""The report dir of `saekit diagnose`: the data it is made from (`ReportData`), its tables, and
`Report`, the handle that `saekit.diagnose(...)` returns and `Report.open(path)` reads back.

Files (design.md): `report.html` (one self-contained page, plotly.js inlined once),
`features.csv` (a row per feature) and `summary.json`.

features.csv conventions: `log10_density` is `-inf` for features with zero firings; a value
that cannot be computed (a trend of a feature the trajectory test did not fit, logit tokens
when they are off) is an empty field; `top_logit_tokens` / `bottom_logit_tokens` are JSON lists of token texts,
highest (lowest) logit weight first.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..sae.errors import SaekitError
from .config import REPORT_FILES, DiagnoseConfig
from .features import CLASSES

if TYPE_CHECKING:
    from ..training.run import History
    from .contexts import Context
    from .features import FeatureGeometry, TopLogits
    from .ground_truth import GroundTruthScore
    from .trajectory import Trajectory

# features.csv: column -> the type `Report.features` parses it to (list: a JSON list, or None).
FEATURE_COLUMNS: dict[str, type] = {
    "index": int,
    "density": float,
    "log10_density": float,
    "class": str,
    "encoder_bias": float,
    "de_projection": float,
    "enc_dec_cosine": float,
    "decoder_norm": float,
    "held_out": bool,
    "trajectory_group": str,
    "trajectory": str,
    "trend": float,
    "trend_low": float,
    "trend_high": float,
    "margin": float,
    "top_logit_tokens": list,
    "bottom_logit_tokens": list,
}
CSV_COLUMNS = tuple(FEATURE_COLUMNS)
# Runs on synthetic activations add these (diagnostics/ground_truth.py): the matched true
# feature (-1: none), its true firing probability, the decoder cosine, the class below 1e-5.
GT_COLUMNS: dict[str, type] = {
    "gt_true_feature": int,
    "gt_p_true": float,
    "gt_cos": float,
    "gt_class": str,
}


@dataclass
class ReportData:
    """Everything the tables and the page are made from: filled by `diagnose()`'s steps, read by
    the features.csv writer, the figure functions (diagnostics/figures.py) and the page."""

    cfg: DiagnoseConfig
    """the flags the report was made with"""
    summary: dict
    """summary.json, as written (NaN and inf become null only on writing)"""
    density: np.ndarray
    """float64 [F]: firings / tokens over the measured window"""
    classes: np.ndarray
    """int64 [F]: index into features.CLASSES (dead, ultra_rare, live)"""
    geometry: FeatureGeometry
    """per-feature encoder bias, D/E projection, encoder-decoder cosine, decoder norm ([F] tensors)"""
    control: np.ndarray
    """bool [F]: the held-out control group (never resampled after being held out)"""
    margin: np.ndarray
    """float64 [F]: each feature's largest pre-activation (NaN: not known; summary's
    margin_source says where it came from)"""
    history: History | None
    """the run's density history (None when the run dir has none)"""
    trajectory: Trajectory | None
    """the trajectory test: groups, outcomes, trends, the windows each used (None without
    history)"""
    logits: TopLogits | None
    """top and bottom logit-weight token ids and values per feature (None when not computed)"""
    vocab: list[str]
    """the text of each token id (empty when the run's model was not loaded)"""
    chosen: list[int]
    """the features shown with logit weights and contexts"""
    contexts: list[list[Context]] | None
    """per chosen feature, its top-activating rows of the cache as text (None without --cache)"""
    warnings: list[str]
    """what the reader must know (also summary["warnings"])"""
    ground_truth: GroundTruthScore | None = None
    """the scoring against a synthetic source's true features (None: the run is not synthetic)"""
    metrics: list[dict] = field(default_factory=list)
    """metrics.jsonl's lines (the training curves; [] when absent)"""
    evaluation: dict | None = None
    """the run's eval.json (None when `saekit evaluate` has not run)"""
    mechanisms: dict | None = None
    """mechanisms.safetensors: per window [W, F] checks and window_end_step (None when absent)"""

    @property
    def n_features(self) -> int:
        return len(self.density)


def _fmt(x: float) -> str:
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.9g}"


def features_csv(data: ReportData) -> str:
    """features.csv: one row per feature, the columns of FEATURE_COLUMNS."""
    n = data.n_features
    geo, vocab = data.geometry, data.vocab

    def tok_lists(ids) -> list[str]:
        if ids is None:
            return [""] * n
        return [json.dumps([vocab[i] for i in row], ensure_ascii=False) for row in ids.tolist()]

    with np.errstate(divide="ignore"):
        log10 = np.log10(data.density)
    cols = {
        "index": [str(i) for i in range(n)],
        "density": [_fmt(x) for x in data.density.tolist()],
        "log10_density": [_fmt(x) for x in log10.tolist()],
        "class": [CLASSES[c] for c in data.classes.tolist()],
        "encoder_bias": [_fmt(x) for x in geo.encoder_bias.tolist()],
        "de_projection": [_fmt(x) for x in geo.de_projection.tolist()],
        "enc_dec_cosine": [_fmt(x) for x in geo.enc_dec_cosine.tolist()],
        "decoder_norm": [_fmt(x) for x in geo.decoder_norm.tolist()],
        "held_out": ["true" if b else "false" for b in data.control.tolist()],
        **trajectory_columns(data.trajectory, n),
        "margin": [_fmt(x) for x in data.margin.tolist()],
        "top_logit_tokens": tok_lists(data.logits.top_ids if data.logits is not None else None),
        "bottom_logit_tokens": tok_lists(
            data.logits.bottom_ids if data.logits is not None else None
        ),
    }
    assert tuple(cols) == CSV_COLUMNS
    if data.ground_truth is not None:
        gt = data.ground_truth
        cols["gt_true_feature"] = [str(i) for i in gt.matching.true_of.tolist()]
        cols["gt_p_true"] = [_fmt(x) for x in gt.p_true.tolist()]
        cols["gt_cos"] = [_fmt(x) for x in gt.matching.cos.tolist()]
        cols["gt_class"] = gt.label
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows(zip(*cols.values(), strict=True))
    return buf.getvalue()


def trajectory_columns(t: Trajectory | None, n: int) -> dict[str, list[str]]:
    """features.csv's trajectory-test columns (empty without a history)."""
    if t is None:
        return {
            k: [""] * n
            for k in ("trajectory_group", "trajectory", "trend", "trend_low", "trend_high")
        }
    return {
        "trajectory_group": [str(g) for g in t.group.tolist()],
        "trajectory": [str(o) for o in t.outcome.tolist()],
        "trend": [_fmt(x) for x in t.trend.tolist()],
        "trend_low": [_fmt(x) for x in t.trend_low.tolist()],
        "trend_high": [_fmt(x) for x in t.trend_high.tolist()],
    }


def _parse_column(kind: type, values: list[str]) -> np.ndarray | list:
    if kind is int:
        return np.array([int(v) for v in values], dtype=np.int64)
    if kind is float:  # "" is NaN; "-inf" and "inf" parse as such
        return np.array([float(v) if v else math.nan for v in values], dtype=np.float64)
    if kind is bool:
        return np.array([v == "true" for v in values], dtype=bool)
    if kind is list:
        return [json.loads(v) if v else None for v in values]
    return np.array(values, dtype=str)


def read_features(path: str | Path) -> dict[str, np.ndarray | list]:
    """features.csv by column, typed by FEATURE_COLUMNS and GT_COLUMNS (others stay str)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SaekitError(
            f"{path} is not a readable features.csv ({e}); re-run saekit diagnose"
        ) from None
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise SaekitError(f"{path} is empty or has rows of uneven length; re-run saekit diagnose")
    header, body = rows[0], rows[1:]
    try:
        return {
            name: _parse_column(
                FEATURE_COLUMNS.get(name, GT_COLUMNS.get(name, str)), [r[j] for r in body]
            )
            for j, name in enumerate(header)
        }
    except (ValueError, json.JSONDecodeError) as e:
        raise SaekitError(f"{path} holds a malformed value ({e}); re-run saekit diagnose") from None


def jsonable(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class Report:
    """A report dir written by `saekit diagnose`; its files are read on first use.

        report = saekit.diagnose(run, cache=cache, out="report")   # or Report.open("report")
        report.html                        # Path of report.html
        report.summary["counts"]           # summary.json as a dict
        report.features["density"]         # features.csv by column: float64 [F]
        pandas.DataFrame(report.features)  # a row per feature

    `features` maps each column to a numpy array (int64 `index`; float64 densities, geometry and
    the trajectory test's `trend`, `trend_low`, `trend_high`, `margin`, NaN where the CSV field is empty
    and -inf for log10 of zero; bool `held_out`; str `class`, `trajectory_group`, `trajectory`) or, for the logit token columns, a list holding one list of token
    texts per feature (None when logit weights were not computed).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._summary: dict | None = None
        self._features: dict[str, np.ndarray | list] | None = None

    @classmethod
    def open(cls, path: str | Path) -> Report:
        p = Path(path)
        missing = [f for f in REPORT_FILES if not (p / f).is_file()]
        if missing:
            raise SaekitError(
                f"{p} is not a report dir (no {missing[0]}); pass the --out of a finished `saekit diagnose`"
            )
        return cls(p)

    @property
    def html(self) -> Path:
        """report.html: open it in a browser (it works offline)."""
        return self.path / "report.html"

    @property
    def summary(self) -> dict:
        """summary.json: class counts and fractions, thresholds, window, trajectory test, geometry,
        logit-weight recipe, shown features and warnings."""
        if self._summary is None:
            path = self.path / "summary.json"
            try:
                self._summary = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise SaekitError(
                    f"{path} is not readable JSON ({e}); re-run saekit diagnose"
                ) from None
        return self._summary

    @property
    def features(self) -> dict[str, np.ndarray | list]:
        """features.csv by column (see the class docstring for the types)."""
        if self._features is None:
            self._features = read_features(self.path / "features.csv")
        return self._features

    def __repr__(self) -> str:
        c = self.summary.get("counts", {})
        rare = "not resolvable" if c.get("ultra_rare") is None else c.get("ultra_rare")
        return (
            f"Report({str(self.path)!r}: {self.summary.get('n_features')} features: "
            f"{c.get('dead')} dead, {rare} ultra-rare, {c.get('live')} live)"
        )
