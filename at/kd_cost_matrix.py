"""Class-to-class cost matrix for WKD-L (algorithms.md §7), from a trained teacher run.

    python -m at.kd_cost_matrix runs/teacher --out cost.pt [--kind cka|fc] [--per-class 100]
                                [--weights best] [--batch-size 500]
    python -m at.kd_cost_matrix torchvision:resnet34 --data-root /datasets/imagenet --out cost.pt

A torchvision teacher reads ImageNet (--dataset imagenet | imagenet_lt, --data-root); a run
reads its own data.

cka: D_ij = 1 - CKA(F_i, F_j), the linear centred kernel alignment between the teacher's
penultimate features of the first `per-class` training images of class i and of class j (in
index order, paired by position): CKA = ||F_j^T F_i||_F^2 / (||F_i^T F_i||_F ||F_j^T F_j||_F)
with every F column-centred. fc: D_ij = 1 - cos(w_i, w_j) between the rows of the teacher's
classifier weights. The file holds the raw D (C x C, float64) and its provenance; training
sharpens it (`load_cost_matrix`). Deterministic: float64, eval mode, images in index order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

import data as datasets
import models

from . import checkpoint as ckpt
from .config import load_run_config

KINDS = ("cka", "fc")
FORMAT = 1


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the teacher has no linear classifier layer")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, batches) -> Tensor:
    """The inputs of the model's last linear layer for every image of `batches` ((x, y) pairs
    on the model's device), N x d float64."""
    captured: list[Tensor] = []
    hook = _last_linear(model).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach().double().cpu()))
    try:
        model.eval()
        for xb, _ in batches:
            model(xb)
    finally:
        hook.remove()
    return torch.cat(captured)


def cka_cost(features: list[Tensor]) -> Tensor:
    """1 - linear CKA between every pair of per-class feature matrices (each n x d)."""
    centred = [f - f.mean(dim=0, keepdim=True) for f in features]
    self_norm = torch.stack([(f.T @ f).norm() for f in centred])
    c = len(centred)
    cost = torch.zeros(c, c, dtype=torch.float64)
    for i in range(c):
        for j in range(i, c):
            cka = (centred[j].T @ centred[i]).norm().square() / (self_norm[i] * self_norm[j])
            cost[i, j] = cost[j, i] = 1 - cka
    return cost


def fc_cost(weight: Tensor) -> Tensor:
    w = torch.nn.functional.normalize(weight.double(), dim=1)
    return 1 - w @ w.T


def _teacher(target: str, weights: str, device: str | None, dataset: str, data_root: str | None
             ) -> tuple[nn.Module, str, str, str | None, dict]:
    """(model, dataset, data root, checkpoint sha256 or None, the run's data config)."""
    from eval.common import load_target
    if target.startswith(models.TORCHVISION_PREFIX):
        model = models.torchvision_model(target)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return model.to(dev).eval(), dataset, data_root or "data", None, {}
    t = load_target(target, weights, device=device, data_root=data_root)
    data_cfg = load_run_config(t.run_dir)["data"] if t.run_dir is not None else {}
    return t.model, t.dataset, t.data_root, t.checkpoint_sha256, data_cfg


def _class_batches(dataset: str, root: str, data_cfg: dict, per_class: int, batch_size: int,
                   device: torch.device, workers: int):
    """In-order batches of the first `per_class` training images of every class (the same
    number n for each: the smallest class decides), n and the number of classes."""
    classes = data_cfg.get("num_classes") or datasets.NUM_CLASSES[dataset]
    if dataset in datasets.FOLDER_DATASETS:
        files = datasets.load_folder_splits(dataset, root, data_cfg.get("lists"), 0, classes)
        y = files.train.labels
    else:
        x, y = datasets.DATASETS[dataset]("train", root, False)
    picks = [(y == c).nonzero().flatten()[:per_class] for c in range(classes)]
    n = min(len(p) for p in picks)
    if n < 2:
        raise ValueError(f"a class of {dataset} has fewer than 2 training images")
    rows = torch.cat([p[:n] for p in picks])
    if dataset in datasets.FOLDER_DATASETS:
        view = datasets.FolderEvalSet(files.train, data_cfg.get("image_size", 224),
                                      data_cfg.get("resize_size", 256), workers)
    else:
        view = datasets.TensorEvalSet(x, y)
    return view.batches(batch_size, device, rows), n, classes


def compute(target: str, kind: str = "cka", per_class: int = 100, weights: str = "best",
            batch_size: int = 500, device: str | None = None, dataset: str = "imagenet",
            data_root: str | None = None, workers: int = 8) -> dict:
    model, dataset, root, sha, data_cfg = _teacher(target, weights, device, dataset, data_root)
    if kind == "fc":
        cost = fc_cost(_last_linear(model).weight.detach().cpu())
    else:
        device_ = next(model.parameters()).device
        batches, n, classes = _class_batches(dataset, root, data_cfg, per_class, batch_size,
                                             device_, workers)
        feats = penultimate_features(model, batches)
        cost = cka_cost(list(feats.view(classes, n, -1)))
    return {"format": FORMAT, "kind": kind, "cost": cost, "teacher": str(target),
            "weights": weights, "checkpoint_sha256": sha,
            "per_class": per_class if kind == "cka" else None}


def load_cost_matrix(path: str, num_classes: int, sharpen: float = 1.0) -> Tensor:
    """The training cost: D <- 1 - exp(-sharpen * D), then relu(D) + 1e-8 (float32, C x C)."""
    saved = ckpt.load(Path(path))
    cost = saved.get("cost") if isinstance(saved, dict) else None
    if saved.get("format") != FORMAT or cost is None or cost.shape != (num_classes,
                                                                          num_classes):
        raise ValueError(f"{path} is not a {num_classes}-class cost matrix made by "
                         f"python -m at.kd_cost_matrix")
    return (1 - torch.exp(-sharpen * cost)).clamp_min(0.0).float() + 1e-8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m at.kd_cost_matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="teacher run directory, or torchvision:NAME (ImageNet)")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--kind", default="cka", choices=KINDS)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--weights", default="best", help="best | last | avg")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dataset", default="imagenet", choices=("imagenet", "imagenet_lt"),
                   help="the data of a torchvision:NAME teacher")
    p.add_argument("--data-root", help="dataset directory (default: the run's data.root)")
    p.add_argument("--workers", type=int, default=8, help="image-decoding processes (ImageNet)")
    args = p.parse_args(argv)
    from eval.common import EvalError
    try:
        result = compute(args.target, args.kind, args.per_class, args.weights,
                         args.batch_size, args.device, args.dataset, args.data_root,
                         args.workers)
    except (EvalError, ValueError, FileNotFoundError) as err:
        print(f"at.kd_cost_matrix: error: {err}", file=sys.stderr)
        return 1
    ckpt.atomic_save(result, Path(args.out))
    c = result["cost"]
    print(f"{args.out}: {result['kind']} cost, {len(c)} classes, off-diagonal mean "
          f"{(c.sum() - c.diag().sum()) / (len(c) ** 2 - len(c)):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
