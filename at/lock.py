"""One writer per directory: an advisory lock held for as long as a process writes there.

A training run's directory, a sweep root and each AutoAttack chunk take one (`acquire`). The lock
is `flock(2)` on a small file that also names its holder (pid, host, command): the operating system
releases it when the holder's file is closed or the process dies, so a killed run never leaves a
stale lock behind, and a second writer is refused with a message naming the first. On NFS, Linux
implements flock with the server's byte-range locks, so two hosts see each other's locks; a file
system without lock support (some Lustre or FUSE mounts) is named in a warning and the run goes on
unprotected (docs/training.md#one-writer-per-run-directory).
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

from errors import RunError

LOCK_FILE = ".lock"  # in a run directory or a sweep root
# errno values of a file system that has no (or no working) flock.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class Busy(RunError):
    """Another process holds the lock; the message names it (pid and host)."""


class Lock:
    """A held lock; `release()` (or the process's end) gives it up."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):  # a holder dropped without release() (an exception in its constructor)
        self.release()

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: Path) -> str:
    """'pid N on host H (command)' from a lock file, as far as it can be read."""
    try:
        who = json.loads(Path(path).read_text())
        text = f"pid {who['pid']} on host {who['host']}"
        if who.get("since"):
            text += f", since {who['since']}"
        return text + (f" ({who['command']})" if who.get("command") else "")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


def acquire(path: str | Path, what: str, prog: str) -> Lock:
    """Take the lock file `path` (created if absent) for `what` (e.g. "out_dir runs/x"), or
    raise Busy naming the process that holds it. `prog` prefixes the warning printed where the
    file system cannot lock. Raises OSError where the file cannot be created (a read-only or
    missing directory): the caller says what that means for it."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise Busy(f"{what} is in use by {holder(path)}; wait for it to finish or stop it "
                       f"(lock file {path})") from None
        if err.errno in _UNSUPPORTED:
            print(f"{prog}: warning: the file system of {path.parent} does not support file "
                  f"locks ({err.strerror}); nothing stops a second process from writing to "
                  f"{what} at the same time", file=sys.stderr)
            return Lock(path, fd)
        os.close(fd)
        raise
    who = {"pid": os.getpid(), "host": socket.gethostname(),
           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": " ".join(sys.argv)[:100]}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(who) + "\n").encode(), 0)
    except OSError:  # a full disk: the lock holds all the same, it only names nobody
        pass
    return Lock(path, fd)
