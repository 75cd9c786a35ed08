"""Class-to-class cost matrix for WKD-L (Lv et al., NeurIPS 2024, arXiv 2412.08139), from a
trained teacher.

    python -m at.kd_cost_matrix runs/teacher --out cost.pt [--kind cka|fc] [--features map]
                                [--per-class 0] [--weights best] [--batch-size 500]
    python -m at.kd_cost_matrix torchvision:resnet34 --data-root /datasets/imagenet --out cost.pt

A torchvision teacher reads ImageNet (--dataset imagenet | imagenet_lt, --data-root); a run
reads its own data (the whole official training set, validation hold-out included).

cka: D_ij = 1 - CKA(F_i, F_j), the linear centred kernel alignment between the class prototypes
F_i (n x d, column-centred), CKA = ||F_j^T F_i||_F^2 / (||F_i^T F_i||_F ||F_j^T F_j||_F), rows of
F_i and F_j paired by position. The prototypes are those of WKD's generate_class_proto:

* ``map`` (the default on CIFAR): the teacher's last feature map (the output of its last stage,
  before the final pooling), one row per spatial position of every image: n = images x H x W;
* ``logits`` (the default on ImageNet): one row of logits per image;
* ``penultimate``: the pooled features entering the classifier, one row per image.

Images are the first `per-class` training images of each class in index order (0 = all of them;
a class with more images than the smallest one is cut to that count). fc: D_ij = 1 - cos(w_i, w_j)
between the rows of the teacher's classifier weights. The file holds the raw D (C x C, float64)
and its provenance; training sharpens it (`load_cost_matrix`). Deterministic: eval mode, images in
index order, the alignment computed in float64.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

import data as datasets
import models
from errors import USER_ERRORS, ConfigError, report

from . import checkpoint as ckpt
from .config import load_run_config
from .cost_matrix import FORMAT, nonfinite

KINDS = ("cka", "fc")
FEATURES = ("map", "logits", "penultimate")
_NOT_STAGES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.SiLU, nn.Identity, nn.Linear,
               nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Dropout)


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("the teacher has no linear classifier layer")
    return linears[-1]


def _stages(model: nn.Module) -> list[nn.Module]:
    """Candidate stages for the last feature map: modules two levels down at most (a torchvision
    network sits inside a wrapper) that are not a normalisation, activation, pooling or linear
    layer."""
    top = [m for m in model.children() if not isinstance(m, _NOT_STAGES)]
    inner = [m for t in top for m in t.children() if not isinstance(m, _NOT_STAGES)]
    return top + inner


@torch.no_grad()
def feature_rows(model: nn.Module, batches, features: str = "map") -> tuple[Tensor, int]:
    """Prototype rows of every image of `batches` ((x, y) pairs on the model's device), in
    order, as float32 on the CPU, and the number of rows per image.

    map: the output of the last stage that still has a spatial map (H x W > 1), in the order the
    forward runs (WKD's `feats["feats"][-1]`: the last block group of a ResNet / WRN), one row per
    position: image-major, positions in row-major order. logits: the outputs. penultimate: the
    input of the last linear layer."""
    if features not in FEATURES:
        raise ConfigError(f"unknown --features {features!r}; valid: {', '.join(FEATURES)}")
    captured: list[Tensor] = []
    last: dict[str, Tensor] = {}

    def keep_map(module, inputs, output):
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[2:].numel() > 1:
            last["map"] = output

    handles = []
    if features == "map":
        handles = [m.register_forward_hook(keep_map) for m in _stages(model)]
    elif features == "penultimate":
        handles = [_last_linear(model).register_forward_hook(
            lambda module, inputs, output: captured.append(inputs[0].float().cpu()))]
    rows_per_image = 1
    try:
        model.eval()
        for xb, _ in batches:
            last.clear()
            out = model(xb)
            if features == "logits":
                captured.append(out.float().cpu())
            elif features == "map":
                if "map" not in last:
                    raise ConfigError("the teacher has no stage with a spatial feature map; "
                                     "use --features logits or penultimate")
                fmap = last["map"].float()
                rows_per_image = fmap.shape[2] * fmap.shape[3]
                # (N, C, H, W) -> (N * H * W, C): every position of every image is a row
                captured.append(fmap.flatten(2).transpose(1, 2).reshape(-1, fmap.shape[1]).cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(captured), rows_per_image


def cka_cost(features: list[Tensor], device: torch.device | str = "cpu") -> Tensor:
    """1 - linear CKA between every pair of per-class prototype matrices (each n x d, the same
    n), computed in float64 on `device`.

    With n <= d it uses the sample-space form: ||F_j^T F_i||_F^2 = <F_i F_i^T, F_j F_j^T>, so
    CKA is the cosine between the flattened Gram matrices and all pairs are one matrix product
    (ImageNet logits: n ~ 700, d = 1000); otherwise the d x d cross products pair by pair (CIFAR
    feature maps: n = 32,000, d = 256)."""
    device = torch.device(device)
    n, d = features[0].shape
    if any(f.shape != (n, d) for f in features):
        raise ValueError("every class needs the same number of prototype rows")

    def centred(f: Tensor) -> Tensor:
        f = f.to(device, torch.float64)
        return f - f.mean(dim=0, keepdim=True)

    c = len(features)
    if n <= d:
        grams = torch.stack([(g @ g.T).flatten() for g in map(centred, features)])
        grams = grams / grams.norm(dim=1, keepdim=True)
        cost = 1 - grams @ grams.T
        cost.fill_diagonal_(0.0)
        return ((cost + cost.T) / 2).cpu()
    blocks = [centred(f) for f in features]  # float64 once (CIFAR-100 maps: ~6.5 GB)
    self_norm = torch.stack([(g.T @ g).norm() for g in blocks])
    cost = torch.zeros(c, c, dtype=torch.float64, device=device)
    for i in range(c):
        for j in range(i + 1, c):
            cka = (blocks[j].T @ blocks[i]).norm().square() / (self_norm[i] * self_norm[j])
            cost[i, j] = cost[j, i] = 1 - cka
    return cost.cpu()


def fc_cost(weight: Tensor) -> Tensor:
    w = torch.nn.functional.normalize(weight.double(), dim=1)
    return 1 - w @ w.T


def _teacher(target: str, weights: str, device: str | None, dataset: str, data_root: str | None
             ) -> tuple[nn.Module, str, str, str | None, dict]:
    """(model, dataset, data root, checkpoint sha256 or None, the run's data config)."""
    from .target import load_target
    if target.startswith(models.TORCHVISION_PREFIX):
        model = models.torchvision_model(target)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return model.to(dev).eval(), dataset, data_root or "data", None, {}
    t = load_target(target, weights, device=device, data_root=data_root)
    data_cfg = load_run_config(t.run_dir)["data"] if t.run_dir is not None else {}
    return t.model, t.dataset, t.data_root, t.checkpoint_sha256, data_cfg


def _class_batches(dataset: str, root: str, data_cfg: dict, per_class: int, batch_size: int,
                   device: torch.device, workers: int):
    """In-order batches of the first `per_class` (0 = all) training images of every class (the
    same number n for each: the smallest class decides), n and the number of classes."""
    classes = data_cfg.get("num_classes") or datasets.NUM_CLASSES[dataset]
    if dataset in datasets.FOLDER_DATASETS:
        files = datasets.load_folder_splits(dataset, root, data_cfg.get("lists"), 0, classes)
        y = files.train.labels
    else:
        x, y = datasets.DATASETS[dataset]("train", root, False)
    picks = [(y == c).nonzero().flatten() for c in range(classes)]
    n = min(len(p) for p in picks)
    if per_class > 0:
        n = min(n, per_class)
    if n < 2:
        raise ConfigError(f"a class of {dataset} has fewer than 2 training images")
    rows = torch.cat([p[:n] for p in picks])
    if dataset in datasets.FOLDER_DATASETS:
        view = datasets.FolderEvalSet(files.train, data_cfg.get("image_size", 224),
                                      data_cfg.get("resize_size", 256), workers)
    else:
        view = datasets.TensorEvalSet(x, y)
    return view.batches(batch_size, device, rows), n, classes


def compute(target: str, kind: str = "cka", per_class: int = 0, weights: str = "best",
            batch_size: int = 500, device: str | None = None, dataset: str = "imagenet",
            data_root: str | None = None, workers: int = 8, features: str | None = None
            ) -> dict:
    """`features` None: map for CIFAR-sized data, logits for image-file datasets (WKD's
    choices)."""
    if per_class < 0 or batch_size < 1:
        raise ConfigError(f"--per-class must be >= 0 (0 = every image of each class) and "
                          f"--batch-size >= 1, got {per_class} and {batch_size}")
    model, dataset, root, sha, data_cfg = _teacher(target, weights, device, dataset, data_root)
    if features is None:
        features = "logits" if dataset in datasets.FOLDER_DATASETS else "map"
    if kind == "fc":
        cost = fc_cost(_last_linear(model).weight.detach().cpu())
    else:
        device_ = next(model.parameters()).device
        batches, n, classes = _class_batches(dataset, root, data_cfg, per_class, batch_size,
                                             device_, workers)
        rows, per_image = feature_rows(model, batches, features)
        cost = cka_cost(list(rows.view(classes, n * per_image, -1)), device_)
    problem = nonfinite(cost)
    if problem:  # a class whose features are constant (CKA's 0/0), or a diverged teacher
        raise ConfigError(f"the {kind} cost matrix of {target} holds {problem}; nothing saved")
    return {"format": FORMAT, "kind": kind, "cost": cost, "teacher": str(target),
            "weights": weights, "checkpoint_sha256": sha,
            "features": features if kind == "cka" else None,
            "per_class": per_class if kind == "cka" else None}


def check_writable(out: Path) -> None:
    """Fail now, in one line, if `out` cannot be written: the computation before the save can
    take hours (ImageNet). The probe is a real file created next to `out` (permission bits alone
    do not tell: read-only mounts, root, ACLs) and removed again."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {out / 'cost.pt'}")
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise ConfigError(f"cannot write --out {out}: {out.parent} {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
    except OSError as err:
        raise ConfigError(f"cannot write --out {out} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m at.kd_cost_matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="teacher run directory, or torchvision:NAME (ImageNet)")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--kind", default="cka", choices=KINDS)
    p.add_argument("--per-class", type=int, default=0,
                   help="training images per class (0 = all, cut to the smallest class)")
    p.add_argument("--features", choices=FEATURES,
                   help="class prototypes (default: map on CIFAR, logits on ImageNet)")
    p.add_argument("--weights", default="best", help="best | last | avg")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dataset", default="imagenet", choices=("imagenet", "imagenet_lt"),
                   help="the data of a torchvision:NAME teacher")
    p.add_argument("--data-root", help="dataset directory (default: the run's data.root)")
    p.add_argument("--workers", type=int, default=8, help="image-decoding processes (ImageNet)")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        check_writable(out)
        result = compute(args.target, args.kind, args.per_class, args.weights,
                         args.batch_size, args.device, args.dataset, args.data_root,
                         args.workers, args.features)
        try:
            ckpt.atomic_save(result, out)  # the temporary file goes if this fails
        except OSError as err:  # a full disk, or the place went away during the computation
            raise ConfigError(f"cannot write --out {out} ({err.strerror or err})") from None
    except USER_ERRORS as err:
        return report("at.kd_cost_matrix", err)
    c = result["cost"]
    print(f"{args.out}: {result['kind']} cost, {len(c)} classes, off-diagonal mean "
          f"{(c.sum() - c.diag().sum()) / (len(c) ** 2 - len(c)):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
