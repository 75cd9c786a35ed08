#!/usr/bin/env bash
# TRADES baseline on CIFAR-100, WRN-34-10, with the DKL repository's recipe (beta 9, AWP); TRADES-AWP: sh/train_trades_awp_cifar10.sh.
# Extra dotted.key=value arguments override the config, e.g. optim.epochs=1 out_dir=runs/try
exec bash "$(dirname "$0")/train.sh" configs/cifar100/trades.yaml "$@"
