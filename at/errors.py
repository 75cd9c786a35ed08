"""Errors the user can fix. Entry points print their one-line message and exit with code 1."""
import difflib


class RunError(RuntimeError):
    """A problem with the run's setup or state; the message is one line."""


class EvalError(RuntimeError):
    """A problem with what the user asked to evaluate (or load as a teacher); one line."""


class NonFiniteLoss(RunError):
    """The training loss became NaN or infinite."""


# Exit status of a run stopped by SIGTERM / SIGUSR1 after saving a resumable checkpoint
# (EX_TEMPFAIL: "try again"); sh/slurm_train.sh requeues the job on it.
EXIT_PREEMPTED = 75
# Exit status of a run stopped by Ctrl-C (SIGINT), the shell's 128 + 2; not requeued.
EXIT_INTERRUPTED = 130


class Preempted(Exception):
    """SIGTERM, SIGUSR1 or a first SIGINT arrived; the run saved last.pt and stops (exit
    EXIT_PREEMPTED, or EXIT_INTERRUPTED for SIGINT)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


def did_you_mean(name, valid, n: int = 1) -> str:
    """'did you mean 'x'?' (or 'x' or 'y' for n > 1) naming the closest of `valid` to an unknown
    `name`; empty when nothing is close. Every "unknown name" message builds its hint with this."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=n, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
