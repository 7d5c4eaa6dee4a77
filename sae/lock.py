"""One writer per output directory: `DirLock`, an exclusive lock every verb takes on the dirs it
writes (a cache dir or worker dir, a run dir, a report dir), and `holder`, the check readers make.

The lock is `fcntl.flock` on `DIR/.saekit.lock`, a file holding the writer's pid, host, verb and
start time (for the message a second writer gets). The kernel drops a flock when its process
dies, however it dies, so a lock file left by `kill -9` or a power loss is stale: the next writer
(`--resume`) takes it over. The holder deletes the file when it lets go (before unlocking), and a
writer that locked a file someone deleted meanwhile tries again, so two writers never hold locks
on two different files of one dir.

Filesystems without flock (some network and FUSE mounts: flock fails with ENOLCK, EOPNOTSUPP,
ENOSYS): the file is a pid file instead. A writer is refused if the file names a live process on
this host, or any process on another host (which cannot be checked: delete the file if that
process is gone); one warning line says the dir is locked by pid only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from .errors import SaekitError, pending_signal, signals_deferred

LOCK_FILE = ".saekit.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def entries(d: Path) -> list[Path]:
    """What a dir holds, its lock file left out (an empty dir with a stale lock is empty)."""
    return [p for p in d.iterdir() if p.name != LOCK_FILE] if d.is_dir() else []


def _read_info(path: Path, tries: int = 20) -> dict:
    """The holder's JSON; a writer that has just locked may not have written it yet: wait a bit."""
    for _ in range(tries):
        try:
            info = json.loads(path.read_text())
            if isinstance(info, dict):
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def describe(info: dict) -> str:
    """`saekit train` (pid 123 on host, started 2025-01-01 12:00:00)."""
    if not info:
        return "another saekit process (its lock file names none)"
    return (
        f"`saekit {info.get('verb', '?')}` (pid {info.get('pid', '?')} on "
        f"{info.get('host', '?')}, started {info.get('started', '?')})"
    )


def _alive(info: dict) -> bool:
    """Whether the pid a lock file names still runs (on another host: cannot tell, so yes)."""
    if info.get("host") != socket.gethostname():
        return bool(info)
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(d: str | Path) -> dict | None:
    """Who is writing dir `d` now ({pid, host, verb, started}), or None. For readers: it takes
    no lock and writes nothing."""
    path = Path(d) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file (or unreadable): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_info(path)
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        info = _read_info(path, tries=1)
        return info if _alive(info) else None
    finally:
        os.close(fd)
    return None


def check_not_written(d: str | Path, what: str, verbs: tuple[str, ...] | None = None) -> None:
    """For readers: SaekitError if a writer (one of `verbs`, None: any) holds dir `d`."""
    info = holder(d)
    if info is not None and (verbs is None or info.get("verb") in verbs):
        raise SaekitError(
            f"{what} {d} is still being written by {describe(info)}; wait for it to finish"
        )


class DirLock:
    """`with DirLock(out, "train"):` the exclusive right to write `out` (made if missing).

    A dir another process holds is refused in one line naming the holder (SaekitError, exit 2),
    or, with `wait`, after that many seconds. On any exit the lock file is deleted and the lock
    dropped; files this process left half-written in the dir (`*.tmp-PID`, an interrupted write)
    are removed, and a dir the lock made is removed again if a failure left it empty."""

    def __init__(self, d: str | Path, verb: str, wait: float = 0.0):
        self.dir, self.verb, self.wait = Path(d), verb, wait
        self.path = self.dir / LOCK_FILE
        self.fd: int | None = None
        self.made: list[Path] = []
        self.created = False

    def __enter__(self) -> DirLock:
        if self.dir.exists() and not self.dir.is_dir():
            raise SaekitError(f"{self.dir} is a file; pass a directory")
        # the dirs made for the lock, innermost first (removed again if a failure leaves them empty)
        self.made = [p for p in (self.dir, *self.dir.parents) if not p.exists()]
        self.created = bool(self.made)
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._acquire()
        except BaseException:
            self._remove_if_made_empty()
            raise
        return self

    def _acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                self._refuse(_read_info(self.path))
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_FLOCK:
                    raise
                self._acquire_pid_file()
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder deleted it as we locked it: lock the new file
                os.close(fd)
                continue
            self.fd = fd
            self._write_info(fd)
            return

    def _info(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "verb": self.verb,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }

    def _write_info(self, fd: int) -> None:
        data = json.dumps(self._info()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def _acquire_pid_file(self) -> None:
        """No flock on this filesystem: a pid file (see the module's docstring)."""
        info = _read_info(self.path, tries=1) if self.path.exists() else {}
        if _alive(info):
            self._refuse(info, hint=f"; if it is no longer running, delete {self.path}")
        print(
            f"saekit: warning: {self.dir}'s filesystem has no flock: it is locked by pid only "
            "(a writer on another machine is not seen)",
            file=sys.stderr,
        )
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._write_info(self.fd)

    def _refuse(self, info: dict, hint: str = "") -> None:
        how = (
            "wait for it to finish, or stop it and re-run with --resume"
            if info.get("verb") in ("cache", "train")
            else "wait for it to finish"
        )
        raise SaekitError(
            f"{self.dir} is being written by {describe(info)}; {how}, or choose another output dir{hint}"
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # an error after a signal is the signal's doing (scripts/cli.py `failure`): a stop
        failed = exc_type is not None and issubclass(exc_type, Exception)
        self.release(failed=failed and pending_signal() is None)

    def release(self, failed: bool = False) -> None:
        """Drop the lock (idempotent). `failed`: bad input or a failure (not an interrupt): a
        dir the lock made goes again if nothing else is in it."""
        if self.fd is None:
            return
        with signals_deferred():  # a second Ctrl-C here must not leave a temporary file
            suffix = f".tmp-{os.getpid()}"
            for root, _, files in os.walk(self.dir):  # writes this process did not finish
                for name in files:
                    if name.endswith(suffix):
                        Path(root, name).unlink(missing_ok=True)
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    self.path.unlink()  # before unlocking: see the module's docstring
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None
            if failed:
                self._remove_if_made_empty()

    def _remove_if_made_empty(self) -> None:
        for d in self.made:
            try:
                d.rmdir()  # fails, as it should, unless empty (a refused writer's dir still
            except OSError:  # holds its holder's lock file)
                return
