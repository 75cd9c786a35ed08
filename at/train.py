"""Entry point: python -m at.train -c CONFIG [dotted.key=value ...] [--resume]

Exit status: 0 done; 1 an error (one line on stderr; saved files intact); 75 stopped by SIGTERM or
SIGUSR1 after saving a resumable last.pt (requeue and run again with --resume); 130 stopped by
Ctrl-C (the first saves last.pt at the next step, a second aborts at once).
"""
from __future__ import annotations

if __name__ == "__main__":
    # First, before the slow imports: a preemption signal from now on is kept (at.stop_signal).
    from . import stop_signal

    stop_signal.install()

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, USER_ERRORS, Preempted, report  # noqa: E402

from . import distributed  # noqa: E402
from .config import load_config  # noqa: E402
from .trainer import fit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m at.train", description=__doc__)
    parser.add_argument("-c", "--config",
                        help="experiment YAML (differences from configs/base.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted.key=value overrides, applied last; before or after the "
                        "flags (-c CONFIG, --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    # Intermixed: `--resume optim.epochs=300` as well as `optim.epochs=300 --resume`.
    args = parser.parse_intermixed_args(argv)
    try:
        fit(load_config(args.config, args.overrides), resume=args.resume)
        # Every rank done before the group is torn down (a rank leaving while a peer still
        # talks to it aborts the process in gloo).
        distributed.barrier()
    except Preempted as err:
        if err.signum == signal.SIGINT:
            print(f"at.train: interrupted; {err}; continue with --resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"at.train: stopped by a signal; {err}; continue with --resume "
              f"(exit status {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print("at.train: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        return report("at.train", err, distributed.rank() if distributed.world_size() > 1 else None)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    status = main()
    # Done and saved: a preemption signal now (a job script passes one on until the process
    # ends) must not kill the interpreter while it shuts down, when Python's handlers are gone;
    # an ignored signal stays ignored then.
    for signum in stop_signal.STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(status)
