#!/usr/bin/env bash
# IKL-AT with two views (basic + AutoAugment) on CIFAR-100, WRN-34-10 (paper: clean 65.93 / AutoAttack 32.52).
# Extra dotted.key=value arguments override the config, e.g. optim.epochs=1 out_dir=runs/try
exec bash "$(dirname "$0")/train.sh" configs/cifar100/ikl_at_autoaug.yaml "$@"
