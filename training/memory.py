"""How much memory training needs, and whether the device has it (docs/scaling.md counts it;
scripts/bench/memory.py measures it)."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from ..sae.archs import ARCHS
from ..sae.errors import SaekitError
from .config import ResolvedConfig, TrainConfig

# Per-feature tensors each activation adds to W_enc, b_enc, W_dec (sae/model.py).
SAE_EXTRA = {"relu": (), "topk": (), "batchtopk": ("threshold",), "jumprelu": ("threshold",),
             "gated": ("r_mag", "b_mag")}  # fmt: skip

# [B, d_sae]-sized tensors alive at once in an autograd step (forward saved for backward, the
# backward's gradients), per activation: the peak RSS of a step over the parameters' measured
# at batch 4096, 8192 features (relu 4.1, topk 4.9, batchtopk 6.8 (matryoshka 7.6), jumprelu
# 7.0, gated 9.0), rounded up.
AUTOGRAD_DENSE = {"relu": 5, "topk": 6, "batchtopk": 9, "jumprelu": 8, "gated": 10}
# The same for resampling's per_input_loss, per row of its chunk: the peak RSS of one call over
# 4096-row chunks measured at 8192 features (relu 3.05, topk 4.0, batchtopk and jumprelu 4.25,
# gated 5.0), rounded up.
RESAMPLE_DENSE = {"relu": 3.1, "topk": 4.1, "batchtopk": 4.3, "jumprelu": 4.3, "gated": 5.1}


class MemoryEstimate(NamedTuple):
    """Peak memory of training on one rank, in bytes, as docs/scaling.md counts it."""

    per_feature: int  # what stays for the whole run (state, step buffers, history), per feature
    transient: int  # the largest of the brief peaks on top (mechanisms, resampling, saving)
    fixed: int  # what does not grow with the width (batches, resampling inputs)
    total: int  # (d_sae * (per_feature + transient) + fixed) * ALLOCATOR_SLACK


# What measured peaks hold beyond the tensors counted (scripts/bench/memory.py): the allocator's
# overhead (fragmentation, freed blocks kept), up to ~10% of the peak; and the process' own
# growth once training starts (thread pools, lazily made buffers), 70-120 MB.
ALLOCATOR_SLACK = 1.15
PROCESS_GROWTH = 128 * 2**20
# glibc's largest mmap threshold: freed blocks below it stay in the process' heap
MMAP_MAX = 32 * 2**20


def train_bytes(cfg: TrainConfig, res: ResolvedConfig, world_size: int = 1) -> int:
    """Peak memory of training on one rank (`estimate(...).total`)."""
    return estimate(cfg, res, world_size).total


def estimate(cfg: TrainConfig, res: ResolvedConfig, world_size: int = 1) -> MemoryEstimate:
    """Peak memory of training on one rank, as docs/scaling.md counts it: parameters, gradients,
    Adam's moments, the hand-written step's work buffers and density tracking all along; on top,
    the largest brief peak (autograd's dense tensors for archs without a hand-written step, a
    mechanism-check recording, a resampling chunk, the copies a save makes); the batches and the
    resampling inputs."""
    from ..sae.fast_step import has_fast_step
    from .mechanisms import GRAD_ROWS, KEYS

    arch = ARCHS[cfg.arch]
    item = 2 if cfg.dtype == "bfloat16" else 8 if cfg.dtype == "float64" else 4
    mm = 2 if cfg.matmul_dtype == "bfloat16" else item
    d, batch = res.d_in, max(1, cfg.batch_size // max(1, world_size))
    windows = math.ceil(cfg.steps / res.steps_per_window)
    step = 0  # autograd's dense tensors, freed after each step
    if not has_fast_step(arch) or (arch.activation == "jumprelu" and mm != item):
        work, step = 0, item * AUTOGRAD_DENSE[arch.activation] * batch
        if item * batch * res.d_sae < MMAP_MAX:  # glibc keeps them in its heap once freed
            work, step = step, 0
    elif arch.activation == "jumprelu":
        work = item * 3 * batch  # pre, f and the firing mask (FastStep._jumprelu_step)
    else:
        # [B, d_sae] buffers in the matmul dtype (relu: f and dL/dpre; topk: the
        # pre-activations and torch.topk's workspace, measured), the sparse steps' [d_sae, d_in]
        # one, and the matmul-dtype copies of W_enc and W_dec
        work = mm * 2 * batch + 4 * d
        if mm != item:
            work += mm * 2 * d
    # per-feature vectors besides b_enc (threshold, r_mag, b_mag): weight, grad, 2 moments
    extra = item * 4 * len(SAE_EXTRA[arch.activation])
    # density: open window, last firing, one int64 row per closed window; mechanism rows
    mech_rows = 4 * len(KEYS) * windows if cfg.mechanisms else 0
    history = 8 * (2 + windows) + mech_rows
    per_feature = item * 4 * (2 * d + 1) + extra + work + history
    transient = max(
        step,
        # a recording (training/mechanisms.py): the batch's pre-activations, three [rows, d_sae]
        # tensors on the gradient rows, the [2, d_in, d_sae] gradient parts and their halves
        item * (batch + 3 * min(GRAD_ROWS, batch) + 4 * d) if cfg.mechanisms else 0,
        # per_input_loss on a 4096-row chunk (pre-activations, features, the penalty's terms)
        int(item * RESAMPLE_DENSE[arch.activation] * min(4096, res.resample_inputs))
        if res.resample == "anthropic"
        else 0,
        # a save: the stacked history and mechanism rows, the saved SAE's scaled weights
        8 * windows + mech_rows + (item * 2 * d if res.input_scale != 1.0 else 0),
    )
    fixed = PROCESS_GROWTH + 4 * batch * d * item
    fixed += res.resample_inputs * d * 4 if res.resample == "anthropic" else 0
    total = int(ALLOCATOR_SLACK * (res.d_sae * (per_feature + transient) + fixed))
    return MemoryEstimate(per_feature, transient, fixed, total)


def device_bytes(device: str) -> int | None:
    """Total memory of a device (RAM, within a cgroup limit, for the CPU); None if unknown."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:  # a container's limit, if any
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def _proc_bytes(field: int) -> int | None:
    """A field of /proc/self/statm in bytes (0: virtual size, 1: resident); None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def free_for_training(device: str) -> tuple[int, str] | None:
    """Bytes training may still allocate on the device, and what bounds them: for the CPU, RAM
    (or a cgroup limit) less what this process already holds (torch, the model, the source),
    or an address-space limit (`ulimit -v`) less the process' virtual size if that is lower.
    None if unknown."""
    import resource

    total = device_bytes(device)
    if total is None:
        return None
    if device.startswith("cuda"):
        return total, f"--device {device} has {total / 1e9:,.1f} GB"
    held = _proc_bytes(1) or 0
    free = (
        total - held,
        f"--device {device} has {total / 1e9:,.1f} GB ({held / 1e9:,.1f} GB already in use by this process)",
    )
    try:
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (AttributeError, OSError, ValueError):
        limit = resource.RLIM_INFINITY
    size = _proc_bytes(0)
    if limit != resource.RLIM_INFINITY and size is not None and limit - size < free[0]:
        free = (
            limit - size,
            f"the address-space limit (ulimit -v) is {limit / 1e9:,.1f} GB ({size / 1e9:,.1f} GB already mapped)",
        )
    return free


def check_memory(cfg: TrainConfig, res: ResolvedConfig, world_size: int = 1) -> None:
    """SaekitError before anything is allocated (and before the run dir is made) if training
    cannot fit in what the device has left."""
    found = free_for_training(cfg.device)
    if found is None:
        return
    (have, what), need = found, train_bytes(cfg, res, world_size)
    if need > have:
        raise SaekitError(
            f"{res.d_sae:,} features at --batch-size {cfg.batch_size} need about {need / 1e9:,.1f} GB "
            f"to train but {what}; lower --features, --batch-size or --resample-inputs "
            "(docs/scaling.md)"
        )
