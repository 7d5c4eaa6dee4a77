"""The architecture table: everything saekit knows about each SAE recipe, in one place.

Code reads these fields instead of comparing names; only where the math itself differs (the
forward of each `activation`, the penalties, the hand-written steps) does it dispatch, and then
on a field (`activation`, `penalty`, `aux_loss`, `prefixes`), never on `name`. A new
architecture is a new row here, new field values implemented in sae/model.py where its math is
new, and, where it pays, a hand-written step in sae/fast_step.py; without one it trains through
autograd on the forward.

Where each default comes from is said in the row's comment. The recipes (activation, penalty,
auxiliary loss, initialisation, decoder constraint, input normalisation, threshold and kernel
settings, Adam's betas) are the published ones. Learning rates and sparsity coefficients are
tuned on the default model's mlp_post at saekit's default 3,000 steps (docs/benchmarks.md):
the papers' values are for runs 100 times longer, and are named next to ours.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class Arch:
    name: str
    """The --arch value, stored as cfg.json's metadata.arch."""
    paper: str
    """Where the recipe comes from."""
    activation: Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
    """How pre-activations become features: relu(pre); topk: relu of each row's --k largest;
    batchtopk: relu of the --k x batch largest of the whole batch in training, and at inference
    pre where pre > a threshold estimated during training; jumprelu: pre where pre > a trained
    per-feature threshold; gated: a gate (pre > 0) times a magnitude path that shares W_enc
    (relu((x W_enc) exp(r_mag) + b_mag)). The forward's math dispatches on this."""
    penalty: Literal["none", "l1", "l1_dec_norm", "l0"]
    """The loss's sparsity term: none, l1 = mean_b sum_i f_i (gated: of relu(pre), the gate's
    pre-activation), l1_dec_norm = mean_b sum_i f_i ||W_dec,i|| (the decoder norm is free, so
    the penalty must see it), or l0 = mean_b sum_i H(pre_i - threshold_i) with a
    straight-through estimator for the threshold's gradient."""
    aux_loss: Literal["none", "auxk", "gate_recon"]
    """An auxiliary loss: auxk (Gao et al.: the top --k-aux dead latents reconstruct the
    residual, weighted by --aux-coef), gate_recon (Gated SAEs: relu of the gate pre-activation
    reconstructs the input through a frozen copy of the decoder, weight 1), or none."""
    default_lr: float
    """Adam learning rate when --lr is not given."""
    default_l1: float | None
    """Sparsity coefficient when --l1-coef is not given, for inputs of mean norm sqrt(d_in)
    (rescaled to the cache's norm if `input_norm` is none); None: the loss has no such term."""
    lr_decay: float
    """Default fraction of training at the end over which the lr decays linearly to 0."""
    l1_warmup: float
    """Default fraction of training at the start over which the coefficient rises from 0."""
    unit_decoder: bool
    """Keep decoder rows at unit norm: project their gradients, renormalise after each step."""
    input_norm: Literal["none", "sqrt_d_in", "unit"]
    """Train on inputs rescaled by one constant (folded into the saved weights) to mean norm
    sqrt(d_in) (Anthropic, April 2024) or 1 (GDM's mean squared norm 1; the cache records the
    mean norm, so the mean norm is what is set), or not at all."""
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
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    threshold_init: float = 0.0
    """jumprelu: every threshold at the start, in training units."""
    bandwidth: float = 0.0
    """jumprelu: width of the rectangle kernel of the straight-through estimators."""
    threshold_rate: float = 0.0
    """batchtopk: each step the inference threshold moves this fraction of the way to the
    smallest activation the batch top-k kept (an exponential moving average from 0)."""
    prefixes: tuple[float, ...] = ()
    """Matryoshka: the nested dictionaries as fractions of d_sae (the last is 1); the
    reconstruction loss is the mean over them of each prefix's squared error. Empty: one."""

    def __post_init__(self) -> None:
        if (self.default_l1 is None) != (self.penalty == "none"):
            raise ValueError(f"{self.name}: default_l1 must be None exactly when penalty is none")
        if self.prefixes and (
            self.prefixes[-1] != 1 or list(self.prefixes) != sorted(self.prefixes)
        ):
            raise ValueError(f"{self.name}: prefixes must increase to 1")

    @property
    def uses_k(self) -> bool:
        """Whether --k (latents kept per input, on average for batchtopk) applies."""
        return self.activation in ("topk", "batchtopk")

    @property
    def threshold(self) -> Literal["none", "trained", "estimated"]:
        """The per-feature inference threshold: trained (jumprelu, a parameter), estimated
        during training (batchtopk, a buffer), or none. Saved as SAELens' `threshold`."""
        if self.activation == "jumprelu":
            return "trained"
        return "estimated" if self.activation == "batchtopk" else "none"


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
            input_norm="none",
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
            input_norm="sqrt_d_in",
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
            input_norm="none",
            subtract_b_dec=True,
            b_dec_init="geometric_median",
            init="tied",
            init_decoder_norm=1.0,
            resample="none",
            clip_grad=None,
            saelens_architecture="topk",
        ),
        # Bussmann, Leask & Nanda 2024 (arXiv 2412.06410; github.com/bartbussmann/BatchTopK):
        # top k x batch over the whole batch, unit decoder rows with projected gradients, tied
        # init, AuxK with weight 1/32 over the d_in/2 top dead latents, and the inference
        # threshold as a moving average (rate 0.01, from 0) of the smallest kept activation
        # (their code and SAELens' topk_threshold_lr). Saved as SAELens saves it: jumprelu with
        # that threshold for every feature. Their lr is 3e-4 (Matryoshka code) for 500M tokens.
        Arch(
            name="batchtopk",
            paper="Bussmann et al., BatchTopK Sparse Autoencoders (2024)",
            activation="batchtopk",
            penalty="none",
            aux_loss="auxk",
            default_lr=1e-3,
            default_l1=None,
            lr_decay=0.0,
            l1_warmup=0.0,
            unit_decoder=True,
            input_norm="none",
            subtract_b_dec=True,
            b_dec_init="geometric_median",
            init="tied",
            init_decoder_norm=1.0,
            resample="none",
            clip_grad=None,
            saelens_architecture="jumprelu",
            threshold_rate=0.01,
        ),
        # Rajamanoharan et al. 2024b (arXiv 2407.14435) and Gemma Scope: JumpReLU on
        # x W_enc + b_enc (no b_dec subtraction), L0 penalty through a straight-through
        # estimator with a rectangle kernel of bandwidth 0.001, thresholds initialised to
        # 0.001, inputs scaled to mean squared norm 1, unit decoder rows, W_enc = W_dec^T at
        # the start, Adam with beta1 = 0, beta2 = 0.999, the coefficient warmed up linearly
        # (10k of their ~500k steps: 2%; we use 5%), no resampling. Their lr is 7e-5.
        Arch(
            name="jumprelu",
            paper="Rajamanoharan et al., Jumping Ahead: JumpReLU SAEs (2024)",
            activation="jumprelu",
            penalty="l0",
            aux_loss="none",
            default_lr=1e-3,
            default_l1=1e-3,
            lr_decay=0.0,
            l1_warmup=0.05,
            unit_decoder=True,
            input_norm="unit",
            subtract_b_dec=False,
            b_dec_init="zero",
            init="tied",
            init_decoder_norm=1.0,
            resample="none",
            clip_grad=None,
            saelens_architecture="jumprelu",
            adam_betas=(0.0, 0.999),
            threshold_init=0.001,
            bandwidth=0.001,
        ),
        # Rajamanoharan et al. 2024a (arXiv 2404.16014): a gate (x - b_dec) W_enc + b_gate > 0
        # times the magnitude relu((x - b_dec) (W_enc exp(r_mag)) + b_mag); L1 on the gate's
        # relu'd pre-activation, plus relu of it reconstructing x through a frozen copy of the
        # decoder; unit decoder rows; resampling as Anthropic's. Their lr is 3e-4. b_enc holds
        # the gate's bias (b_gate in cfg.json).
        Arch(
            name="gated",
            paper="Rajamanoharan et al., Improving Dictionary Learning with Gated SAEs (2024)",
            activation="gated",
            penalty="l1",
            aux_loss="gate_recon",
            default_lr=1e-3,
            default_l1=3.0,
            lr_decay=0.0,
            l1_warmup=0.0,
            unit_decoder=True,
            input_norm="none",
            subtract_b_dec=True,
            b_dec_init="geometric_median",
            init="kaiming_untied",
            init_decoder_norm=1.0,
            resample="anthropic",
            clip_grad=None,
            saelens_architecture="gated",
        ),
        # Bussmann et al. 2025 (arXiv 2503.17547; Nabeshima 2024): BatchTopK with nested
        # dictionaries of d_sae/16, /8, /4, /2 and all features (their group sizes 1/16, 1/16,
        # 1/8, 1/4, 1/2), the loss the mean of the prefixes' squared errors (dictionary_learning's
        # equal group weights), AuxK on the full residual (SAELens' default). Saved as jumprelu.
        Arch(
            name="matryoshka",
            paper="Bussmann et al., Learning Multi-Level Features with Matryoshka SAEs (2025)",
            activation="batchtopk",
            penalty="none",
            aux_loss="auxk",
            default_lr=1e-3,
            default_l1=None,
            lr_decay=0.0,
            l1_warmup=0.0,
            unit_decoder=True,
            input_norm="none",
            subtract_b_dec=True,
            b_dec_init="geometric_median",
            init="tied",
            init_decoder_norm=1.0,
            resample="none",
            clip_grad=None,
            saelens_architecture="jumprelu",
            threshold_rate=0.01,
            prefixes=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0),
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


def saved_arch(arch: str | None, architecture: str | None, apply_b_dec_to_input: bool) -> Arch:
    """The Arch of a saved cfg.json: its metadata.arch's row (None for SAEs not saved by saekit:
    the row named as the SAELens `architecture`, else the first saved as it, default standard). If the row's b_dec handling
    disagrees with apply_b_dec_to_input: a row of the same activation and SAELens class that
    agrees, else the row with subtract_b_dec set to it (the math reads the field). ValueError if
    no row is saved as that architecture or metadata.arch is saved as another one."""
    if arch is None:
        want = architecture or "standard"
        rows = [a.name for a in ARCHS.values() if a.saelens_architecture == want]
        if not rows:
            raise ValueError(f"no saekit arch is saved as SAELens architecture {want!r}")
        arch = want if want in rows else rows[0]  # jumprelu is JumpReLU, not BatchTopK
    a = ARCHS[arch]
    if architecture is not None and a.saelens_architecture != architecture:
        raise ValueError(
            f"arch {arch!r} is saved as SAELens architecture {a.saelens_architecture!r}, not {architecture!r}"
        )
    if a.subtract_b_dec == apply_b_dec_to_input:
        return a
    twins = [
        b
        for b in ARCHS.values()
        if (b.saelens_architecture, b.activation) == (a.saelens_architecture, a.activation)
        and b.subtract_b_dec == apply_b_dec_to_input
    ]
    return twins[0] if twins else replace(a, subtract_b_dec=apply_b_dec_to_input)
