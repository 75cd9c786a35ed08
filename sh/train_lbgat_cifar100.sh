#!/usr/bin/env bash
# LBGAT0 on CIFAR-100, WRN-34-10 with a PreAct ResNet-18 natural model (paper: clean 70.25 / AutoAttack 27.16).
# Extra dotted.key=value arguments override the config, e.g. optim.epochs=1 out_dir=runs/try
exec bash "$(dirname "$0")/train.sh" configs/cifar100/lbgat.yaml "$@"
