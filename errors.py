"""Errors the user can fix, and how entry points report them.

Every such error derives from `UserError`. An entry point catches `USER_ERRORS` only and hands
them to `report`: one line on stderr, exit status 1. Anything else (a ValueError from a bug, say)
keeps its traceback. This module is the ground floor: it imports nothing of the project, and every
package (data/, models/, attacks/, at/, eval/, bench/) raises from it.
"""
from __future__ import annotations

import difflib
import sys


class UserError(Exception):
    """A problem the user can fix (a config value, a path, a damaged file); one-line message."""


class ConfigError(UserError, ValueError):
    """A configuration or argument value that cannot be used (a ValueError: constructors and
    registries raise it for bad arguments)."""


class RunError(UserError, RuntimeError):
    """A problem with the run's setup or state; the message is one line."""


class EvalError(UserError, RuntimeError):
    """A problem with what the user asked to evaluate or summarise (or load as a teacher)."""


class DataError(UserError, ValueError):
    """A dataset, image folder, split list or generated set on disk that cannot be used (missing
    pieces, damaged files, another number of classes)."""


# A missing file the user named (a dataset root, a checkpoint) is theirs to fix as well.
USER_ERRORS = (UserError, FileNotFoundError)


def report(prog: str, err: BaseException, rank: int | None = None) -> int:
    """Print `prog[ (rank N)]: error: <message>` on stderr; returns the exit status, 1."""
    where = f" (rank {rank})" if rank is not None else ""
    print(f"{prog}{where}: error: {err}", file=sys.stderr)
    return 1


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
    `name`; empty when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=n, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def unknown(kind: str, name, valid, *, listed: str | None = "valid", n: int = 1,
            source: str = "", match: str | None = None) -> ConfigError:
    """The one-line error for a name that is not among `valid`, with the closest match:
    "unknown <kind> 'name' (did you mean 'x'?); <listed>: a, b" (every valid name listed), or with
    listed=None "unknown <kind> 'name'; did you mean 'x' or 'y'?" (too many to list: config keys).
    `source`: where the name came from (a file, the command line); `match`: the spelling compared
    with `valid` when not `name` itself (a lower-cased one)."""
    where = f" (from {source})" if source else ""
    hint = did_you_mean(name if match is None else match, valid, n=n)
    if listed is None:
        return ConfigError(f"unknown {kind} {name!r}{where}{'; ' + hint if hint else ''}")
    return ConfigError(f"unknown {kind} {name!r}{where}{f' ({hint})' if hint else ''}; "
                       f"{listed}: {', '.join(str(v) for v in valid)}")
