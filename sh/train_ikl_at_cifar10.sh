#!/usr/bin/env bash
# IKL-AT on CIFAR-10, WRN-34-10 (DKL a3 b20 T4; paper: clean 85.31 / AutoAttack 57.13).
# Extra dotted.key=value arguments override the config, e.g. optim.epochs=1 out_dir=runs/try
exec bash "$(dirname "$0")/train.sh" configs/cifar10/ikl_at.yaml "$@"
