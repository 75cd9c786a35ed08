"""The preemption signals (SIGTERM, SIGUSR1) a process receives before the trainer's own handlers
are in place: at.train installs these on its first line, before its slow imports, so that a
signal in the first seconds stops the run at its first step (saved, exit 75) instead of killing
the process with nothing saved (docs/scale.md#preemption-and-slurm). Imports nothing heavy."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
received: int | None = None  # the first such signal, if any


def _note(signum, frame) -> None:
    global received
    if received is None:
        received = signum


def install() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _note)
