#!/usr/bin/env bash
# Knowledge distillation on ImageNet / ImageNet-LT, on every visible GPU (torchrun, sh/train_ddp.sh).
#   bash sh/train_kd_imagenet.sh imagenet ikl_kd_r34_r18 data.root=/datasets/imagenet
#   bash sh/train_kd_imagenet.sh imagenet_lt teacher_x101 data.root=/datasets/imagenet \
#       data.lists=/datasets/ImageNet_LT                   # then ikl_kd_x101_r50 likewise
# configs/<dataset>/kd/<name>.yaml; extra dotted.key=value arguments override it, --resume
# continues the run. GPUS=N uses N GPUs; optim.batch_size stays the global batch.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash sh/train_kd_imagenet.sh imagenet|imagenet_lt CONFIG_NAME [key=value ...] [--resume]"
dataset="${1:?$usage}"
name="${2:?$usage}"
shift 2
case "$dataset" in
  imagenet|imagenet_lt) ;;
  *) echo "sh/train_kd_imagenet.sh: unknown dataset '$dataset' (imagenet | imagenet_lt)" >&2; exit 1 ;;
esac
config="configs/$dataset/kd/$name.yaml"
if [ ! -f "$config" ]; then
  echo "sh/train_kd_imagenet.sh: no $config; choose one of: $(ls "configs/$dataset/kd" | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
  exit 1
fi
exec bash sh/train_ddp.sh "$config" "$@"
