"""Entry point: python -m at.train -c CONFIG [dotted.key=value ...] [--resume]"""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .errors import RunError
from .trainer import fit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m at.train", description=__doc__)
    parser.add_argument("-c", "--config",
                        help="experiment YAML (differences from configs/base.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, applied last")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    args = parser.parse_args(argv)
    try:
        fit(load_config(args.config, args.overrides), resume=args.resume)
    except (ConfigError, RunError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"at.train: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
