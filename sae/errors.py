"""The one exception saekit raises for bad input: the CLI prints its message as one line and exits 2."""


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
