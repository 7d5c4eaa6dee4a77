"""The architecture table: everything saekit knows about each SAE recipe, in one place.

Code reads these fields instead of comparing names; only where the math itself differs (the
forward of `relu` vs `topk`, the hand-written steps) does it dispatch, and then on a field
(`activation`, `penalty`, `aux_loss`), never on `name`. A new architecture (batchtopk, jumprelu,
gated, matryoshka) is a new row here, a new `activation` (and `penalty`) value implemented in
sae/model.py's forward, and, where it pays, a hand-written step in sae/fast_step.py; without one
it trains through autograd on the forward. The default lr and L1 coefficients were tuned on the
default model's mlp_post (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Arch:
    name: str
    """The --arch value, stored as cfg.json's metadata.arch."""
    paper: str
    """Where the recipe comes from."""
    activation: Literal["relu", "topk"]
    """How pre-activations become features: relu(pre), or relu of each row's k largest (--k).
    The forward's math dispatches on this (jumprelu, gated, batchtopk will add values)."""
    penalty: Literal["none", "l1", "l1_dec_norm"]
    """The loss's sparsity term: none, l1 = mean_b sum_i f_i, or l1_dec_norm =
    mean_b sum_i f_i ||W_dec,i|| (the decoder norm is free, so the penalty must see it)."""
    aux_loss: Literal["none", "auxk"]
    """An auxiliary loss on dead latents: auxk (Gao et al.: the top --k-aux dead latents
    reconstruct the residual, weighted by --aux-coef), or none."""
    default_lr: float
    """Adam learning rate when --lr is not given."""
    default_l1: float | None
    """Sparsity coefficient when --l1-coef is not given, for inputs of mean norm sqrt(d_in)
    (rescaled to the cache's norm unless `input_norm`); None: the loss has no such term."""
    lr_decay: float
    """Default fraction of training at the end over which the lr decays linearly to 0."""
    l1_warmup: float
    """Default fraction of training at the start over which the coefficient rises from 0."""
    unit_decoder: bool
    """Keep decoder rows at unit norm: project their gradients, renormalise after each step."""
    input_norm: bool
    """Train on inputs rescaled to mean norm sqrt(d_in) (folded into the saved weights)."""
    subtract_b_dec: bool
    """The encoder sees x - b_dec (SAELens' apply_b_dec_to_input)."""
    b_dec_init: Literal["zero", "geometric_median"]
    """b_dec at the start of training: zero, or the geometric median of a cache sample."""
    init: Literal["kaiming_untied", "tied"]
    """Weights at the start: kaiming_untied (W_enc and W_dec drawn independently, as SAELens'
    standard SAE) or tied (random unit decoder rows, W_enc = W_dec^T)."""
    init_decoder_norm: float
    """Norm of each decoder row at the start."""
    resample: Literal["anthropic", "none"]
    """What --resample auto means: anthropic (dead-feature resampling) or none."""
    clip_grad: float | None
    """Clip the gradients' global norm to this before each Adam step (None: no clipping)."""
    saelens_architecture: str
    """cfg.json's `architecture`: the SAELens class that loads (and encodes) the saved SAE."""

    def __post_init__(self) -> None:
        if (self.default_l1 is None) != (self.penalty == "none"):
            raise ValueError(f"{self.name}: default_l1 must be None exactly when penalty is none")

    @property
    def uses_k(self) -> bool:
        """Whether --k (latents kept per input) applies."""
        return self.activation == "topk"


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            name="relu_l1",
            paper="Anthropic, Towards Monosemanticity (2023)",
            activation="relu",
            penalty="l1",
            aux_loss="none",
            default_lr=1e-3,
            default_l1=3.0,
            lr_decay=0.0,
            l1_warmup=0.0,
            unit_decoder=True,
            input_norm=False,
            subtract_b_dec=True,
            b_dec_init="geometric_median",
            init="kaiming_untied",
            init_decoder_norm=1.0,
            resample="anthropic",
            clip_grad=None,
            saelens_architecture="standard",
        ),
        Arch(
            name="relu_l1_v2",
            paper="Anthropic, Circuits Updates April 2024",
            activation="relu",
            penalty="l1_dec_norm",
            aux_loss="none",
            default_lr=5e-4,
            default_l1=5.0,
            lr_decay=0.2,
            l1_warmup=0.05,
            unit_decoder=False,
            input_norm=True,
            subtract_b_dec=False,
            b_dec_init="zero",
            init="tied",
            init_decoder_norm=0.1,
            resample="none",
            clip_grad=1.0,
            saelens_architecture="standard",
        ),
        Arch(
            name="topk",
            paper="Gao et al., Scaling and evaluating sparse autoencoders (2024)",
            activation="topk",
            penalty="none",
            aux_loss="auxk",
            default_lr=1e-3,
            default_l1=None,
            lr_decay=0.0,
            l1_warmup=0.0,
            unit_decoder=True,
            input_norm=False,
            subtract_b_dec=True,
            b_dec_init="geometric_median",
            init="tied",
            init_decoder_norm=1.0,
            resample="none",
            clip_grad=None,
            saelens_architecture="topk",
        ),
    )
}

# TrainConfig.arch's type: the CLI reads a Literal's choices, so these come from the table.
ArchName = Literal[tuple(ARCHS)]  # type: ignore[valid-type]


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(ARCHS)}") from None


def saved_arch(arch: str | None, architecture: str | None, apply_b_dec_to_input: bool) -> str:
    """The arch of a saved cfg.json: its metadata.arch (None for SAEs not saved by saekit: the
    first row saved as SAELens `architecture`, default standard), switched to the row of the same
    SAELens class whose b_dec handling matches apply_b_dec_to_input if it disagrees."""
    if arch is None:
        want = architecture or "standard"
        rows = [a for a in ARCHS.values() if a.saelens_architecture == want]
        if not rows:
            raise ValueError(f"no saekit arch is saved as SAELens architecture {want!r}")
        arch = rows[0].name
    a = ARCHS[arch]
    if a.subtract_b_dec == apply_b_dec_to_input:
        return arch
    twins = [
        b.name
        for b in ARCHS.values()
        if b.saelens_architecture == a.saelens_architecture
        and b.subtract_b_dec == apply_b_dec_to_input
    ]
    return twins[0] if twins else arch
