"""Errors the user can fix. Entry points print their one-line message and exit with code 1."""


class RunError(RuntimeError):
    """A problem with the run's setup or state; the message is one line."""


class NonFiniteLoss(RunError):
    """The training loss became NaN or infinite."""


# Exit status of a run stopped by SIGTERM / SIGUSR1 after saving a resumable checkpoint
# (EX_TEMPFAIL: "try again"); sh/slurm_train.sh requeues the job on it.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived; the run saved last.pt and stops (exit EXIT_PREEMPTED)."""
