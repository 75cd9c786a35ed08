#!/usr/bin/env bash
# Knowledge distillation on CIFAR-100: train the teacher, then a student from it.
#   bash sh/train_kd_cifar100.sh teacher resnet32x4           # runs/cifar100_teacher_resnet32x4
#   bash sh/train_kd_cifar100.sh ikl_kd_res32x4_res8x4        # configs/cifar100/kd/<name>.yaml
# Extra dotted.key=value arguments override the config (e.g. optim.epochs=1 out_dir=runs/try).
# wkd_l configs need the teacher's cost matrix first: python -m at.kd_cost_matrix (see the config).
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:?usage: sh/train_kd_cifar100.sh teacher MODEL | CONFIG_NAME [key=value ...]}"
shift
if [ "$name" = teacher ]; then
  model="${1:?usage: sh/train_kd_cifar100.sh teacher MODEL (e.g. resnet32x4, wrn-40-2)}"
  shift
  exec bash sh/train.sh configs/cifar100/kd/teacher.yaml "model.name=$model" \
    "out_dir=runs/cifar100_teacher_$model" "$@"
fi
config="configs/cifar100/kd/$name.yaml"
if [ ! -f "$config" ]; then
  echo "sh/train_kd_cifar100.sh: no $config; choose one of: $(ls configs/cifar100/kd | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
  exit 1
fi
exec bash sh/train.sh "$config" "$@"
