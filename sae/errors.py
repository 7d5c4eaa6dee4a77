"""The one exception saekit raises for bad input (the CLI prints its message as one line and
exits 2), and the one for a stop asked by a signal."""

import contextlib
import signal
from collections.abc import Iterator


class SaekitError(Exception):
    """A problem the user can fix. The message names the problem and the fix, in one line."""


def check_device(device: str, flag: str = "--device") -> None:
    """SaekitError unless `device` names a torch device that exists here (before any work)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SaekitError(
            f"{flag} {device!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SaekitError(f"{flag} {device}: CUDA is not available here; use {flag} cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SaekitError(
            f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use a lower index"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SaekitError(f"{flag} {device}: MPS is not available here; use {flag} cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise SaekitError(f"{flag} {device}: saekit runs on cpu, cuda or mps, not {dev.type}")


# Seeds go to torch.Generator.manual_seed and numpy's default_rng, often combined with a step or
# batch index (seed * 1_000_003 + step): 32 bits leave those sums well inside 63.
SEED_MAX = 2**32 - 1


def check_seed(seed: object, flag: str = "--seed") -> None:
    """SaekitError unless `seed` is an integer from 0 to SEED_MAX."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise SaekitError(f"{flag} {seed} is out of range: give an integer from 0 to {SEED_MAX}")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every `finally` runs and
    the verb's lock is released; the CLI prints one line and exits 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals received and not yet acted on. Python ignores an exception raised where it cannot
# propagate (a weakref callback, a __del__: "Exception ignored in ..."), so one raised by the
# handler there is lost; the long loops look here once per step and raise it again.
_pending: list[int] = []
_raising = [True]  # False once the verb is over: a late signal is only recorded


def on_signal(signum: int, frame: object) -> None:
    """The CLI's handler for SIGINT and SIGTERM."""
    _pending.append(signum)
    if _raising[0]:
        raise Interrupted(signum)


def check_interrupt() -> None:
    """Raise Interrupted if a signal came that was not acted on (cheap: call it once a step)."""
    if _pending and _raising[0]:
        raise Interrupted(_pending[-1])


def pending_signal() -> int | None:
    """The last SIGINT/SIGTERM received during this verb, if any."""
    return _pending[-1] if _pending else None


def quiet_interrupts() -> None:
    """The verb is over (done, or reporting why not): a signal now must not raise in the middle
    of its last line or of the interpreter's exit."""
    _raising[0] = False


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM only recorded, not raised, inside: a second Ctrl-C must not cut short the
    removal of temporary files (the loops' next `check_interrupt`, or the exit, acts on it)."""
    was = _raising[0]
    _raising[0] = False
    try:
        yield
    finally:
        _raising[0] = was


def clear_interrupts() -> None:
    _pending.clear()
    _raising[0] = True
