"""Errors the user can fix. Entry points print their one-line message and exit with code 1."""


class RunError(RuntimeError):
    """A problem with the run's setup or state; the message is one line."""


class NonFiniteLoss(RunError):
    """The training loss became NaN or infinite."""
