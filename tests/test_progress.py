"""Progress within an epoch without a terminal: a plain line every `every` seconds."""
import io

from at.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_few_minutes_without_a_terminal():
    out, clock = io.StringIO(), Clock()  # StringIO is no TTY, like a batch job's log file
    bar = Progress(total=100, initial=10, desc="epoch 3", every=300, stream=out, clock=clock)
    for step in range(11, 101):
        clock.now = (step - 10) * 7.0  # 7 s a step: a line at steps 53 (301 s) and 96 (602 s)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{2 - step / 100:.4f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "at.train: epoch 3: step 53/100 (53%), 5m01s, 0.14 steps/s, loss 1.5000",
        "at.train: epoch 3: step 96/100 (96%), 10m02s, 0.14 steps/s, loss 1.1000",
    ]


def test_no_lines_when_disabled_or_every_is_zero():
    for kw in ({"enabled": False}, {"every": 0}):
        out, clock = io.StringIO(), Clock()
        bar = Progress(total=10, stream=out, clock=clock, **kw)
        for step in range(10):
            clock.now = 1000.0 * step
            bar.update(1)
        bar.close()
        assert out.getvalue() == ""
