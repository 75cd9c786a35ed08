"""Whether eval command lines would be accepted, without running them: each command's own parser
and argument checks, on a run directory that need not exist yet. No model, data or result is
touched. at.sweep runs it on a spec's `eval:` list before the first run trains (at/ sits below
eval/ and runs the evaluations as programs, so it checks them through one too):

    python -m eval.arguments '[["eval.pgd", ["--steps", "20"]], ["eval.audit", []]]'

Prints a JSON list with one entry per command line, null where it is accepted, else the problem
in one line; exits 0 when every one is accepted, 1 otherwise (2 for input that is no such list).
"""
from __future__ import annotations

import argparse
import json
import sys

from errors import EvalError

from . import audit, autoattack, pgd
from .common import command_parser

COMMANDS = {"eval.pgd": pgd, "eval.autoattack": autoattack, "eval.audit": audit}
# Flags that the run directory settles (its model, dataset and results folder, <run>/eval,
# where eval.summary reads them); given in a sweep, --out would also make each run's result
# replace the previous run's.
SET_BY_THE_RUN = ("arch", "dataset", "threat", "model_dir", "out")
BY_THE_RUN = "is what the run directory settles: a sweep passes each run's own directory"
# A sweep runs one whole evaluation per run: a shard would leave it unfinished, a merge finds
# no shards.
WHOLE = {"eval.autoattack": ("shard", "merge")}
ONE_WHOLE = "cannot be given here: a sweep runs one whole evaluation per run"


class _Refusing(argparse.ArgumentParser):
    """A parser that raises EvalError (one line) where argparse would print and exit."""

    def error(self, message: str):
        raise EvalError(message)

    def exit(self, status: int = 0, message: str | None = None):  # --help
        raise EvalError((message or "").strip() or "-h/--help prints the help; it evaluates "
                        "nothing")

    def print_help(self, file=None) -> None:
        pass

    def print_usage(self, file=None) -> None:
        pass


def problem(module: str, args: list[str], run: str = "RUN") -> str | None:
    """Why `python -m <module> <run> <args>` would be refused before it evaluates anything
    (None when it would be accepted), for a run directory `run` (an evaluation in a sweep)."""
    command = COMMANDS.get(module)
    if command is None:
        return f"unknown evaluation {module!r}; known: {', '.join(COMMANDS)}"
    parser = command_parser(module, command.__doc__, command.add_arguments,
                            parser_class=_Refusing)
    try:
        parsed = parser.parse_args([run, *args])
        for dest in (*SET_BY_THE_RUN, *WHOLE.get(module, ())):
            if getattr(parsed, dest) != parser.get_default(dest):
                flag = "--" + dest.replace("_", "-")
                raise EvalError(f"{flag} {BY_THE_RUN if dest in SET_BY_THE_RUN else ONE_WHOLE}")
        command.check_arguments(parsed)
    except EvalError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        commands = json.loads(argv[0]) if len(argv) == 1 else None
        ok = isinstance(commands, list) and all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[0], str)
            and isinstance(c[1], list) and all(isinstance(a, str) for a in c[1])
            for c in commands)
    except ValueError:
        ok = False
    if not ok:
        print("python -m eval.arguments: error: give one JSON list of [module, [arguments]] "
              "pairs", file=sys.stderr)
        return 2
    problems = [problem(module, args) for module, args in commands]
    print(json.dumps(problems))
    return 1 if any(problems) else 0


if __name__ == "__main__":
    sys.exit(main())
