"""Class-to-class cost matrix for WKD-L (algorithms.md §7), from a trained teacher run.

    python -m at.kd_cost_matrix runs/teacher --out cost.pt [--kind cka|fc] [--per-class 100]
                                [--weights best] [--batch-size 500]

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

from . import checkpoint as ckpt

KINDS = ("cka", "fc")
FORMAT = 1


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the teacher has no linear classifier layer")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, x_uint8: Tensor, batch_size: int = 500) -> Tensor:
    """The inputs of the model's last linear layer for every image (N x d, float64)."""
    device = next(model.parameters()).device
    captured: list[Tensor] = []
    hook = _last_linear(model).register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach().double().cpu()))
    try:
        model.eval()
        for xb, _ in datasets.iterate_batches(x_uint8, torch.zeros(len(x_uint8)), batch_size,
                                              device):
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


def compute(target: str, kind: str = "cka", per_class: int = 100, weights: str = "best",
            batch_size: int = 500, device: str | None = None) -> dict:
    from eval.common import load_target
    t = load_target(target, weights, device=device)
    if kind == "fc":
        cost = fc_cost(_last_linear(t.model).weight.detach().cpu())
    else:
        x, y = datasets.DATASETS[t.dataset]("train", t.data_root, False)
        classes = datasets.NUM_CLASSES[t.dataset]
        picks = [(y == c).nonzero().flatten()[:per_class] for c in range(classes)]
        n = min(len(p) for p in picks)
        if n < 2:
            raise ValueError(f"a class of {t.dataset} has fewer than 2 training images")
        feats = penultimate_features(t.model, x[torch.cat([p[:n] for p in picks])], batch_size)
        cost = cka_cost(list(feats.view(classes, n, -1)))
    return {"format": FORMAT, "kind": kind, "cost": cost, "teacher": str(target),
            "weights": weights, "checkpoint_sha256": t.checkpoint_sha256,
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
    p.add_argument("target", help="teacher run directory")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--kind", default="cka", choices=KINDS)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--weights", default="best", help="best | last | avg")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    args = p.parse_args(argv)
    from eval.common import EvalError
    try:
        result = compute(args.target, args.kind, args.per_class, args.weights,
                         args.batch_size, args.device)
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
