"""Progress within an epoch: tqdm's bar on a terminal; without one (batch jobs, `nohup`, logs
piped to a file) a plain line every few minutes, so a long epoch still shows signs of life."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """The subset of tqdm the trainer uses (update, set_postfix, close).

    every: seconds between plain lines (0 = none); enabled=False (ranks other than 0) shows
    nothing. The plain line: `at.train: epoch 3: step 120/391 (31%), 4m10s, 0.48 steps/s,
    loss 1.2345` (the postfix last set), on `stream`."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 every: float = 300.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.n, self.desc = total, initial, desc
        self.enabled, self.every, self.clock = enabled, every, clock
        self.tty = enabled and self.stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, file=self.stream,
                        disable=not self.tty)
        self.start = self.last = clock()
        self.first = initial
        self.postfix: dict[str, str] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.tty:
            self.bar.update(n)
        elif self.enabled and self.every > 0:
            now = self.clock()
            if now - self.last >= self.every:
                self.last = now
                self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}
        if self.tty:
            self.bar.set_postfix(**values)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        rate = (self.n - self.first) / elapsed if elapsed > 0 else 0.0
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"at.train: {self.desc}: step {self.n}/{self.total} "
              f"({100 * self.n / max(self.total, 1):.0f}%), {_clock(elapsed)}, "
              f"{rate:.2f} steps/s{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()
