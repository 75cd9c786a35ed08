#!/usr/bin/env bash
# TRADES-AWP on CIFAR-10, WRN-34-10 (paper: clean 85.36 / AutoAttack 56.17).
# Extra dotted.key=value arguments override the config, e.g. optim.epochs=1 out_dir=runs/try
exec bash "$(dirname "$0")/train.sh" configs/cifar10/trades_awp.yaml "$@"
