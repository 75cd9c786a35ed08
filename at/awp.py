"""Adversarial weight perturbation (Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust
Generalization", NeurIPS 2020, arXiv 2004.05884), as used by the DKL/IKL-AT reference
(docs/reference.md#awp).

At each step, after the attack has produced x_adv, the weights are moved uphill on the outer loss
L (evaluated at the fixed x_adv), the optimizer step is taken at the moved weights, and the move
is taken back:

    v_l  = ||w_l|| / ||g_l|| * g_l,   g_l = dL/dw_l       (layer-wise, Frobenius norms)
    w_l <- w_l + gamma * v_l                             perturb
    ... outer forward / backward / optimizer.step() ...
    w_l <- w_l - gamma * v_l                             restore (after the step)

for every parameter with ndim > 1 and 'weight' in its name (conv and linear weights; BatchNorm
parameters and biases are not perturbed). The net update is therefore the optimizer's update
evaluated at w + gamma v (weight decay included), applied to w.

The reference computes v with a proxy model: it copies the model, takes one plain-SGD step on
-L, and uses dw = w_proxy - w = lr * g in v = ||w|| / (||dw|| + 1e-20) * dw. The learning rate
cancels, so here g is taken directly with `torch.autograd.grad` on the main model; the proxy's
other effect, leaving the model's BatchNorm running statistics alone, is obtained by saving and
restoring the buffers around that extra (train-mode) forward. No second model is kept.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import distributed

# The reference's epsilon in ||w|| / (||dw|| + eps). It only matters for a zero gradient, where
# it turns 0/0 into 0 (the layer is left where it is, as the proxy step would leave it).
_EPS = 1e-20


class AWP:
    """Perturbs `model`'s conv/linear weights in place; `restore` takes the perturbation back.

    Usage per training step (epochs 1-based; the reference perturbs from epoch 10 on):

        if awp.active(epoch):
            awp.perturb(lambda: method.awp_loss(model, x, y, x_adv))
        loss = method.loss(model, x, y, x_adv).total(); loss.backward(); optimizer.step()
        if awp.active(epoch):
            awp.restore()
    """

    def __init__(self, model: nn.Module, gamma: float = 5e-3, warmup: int = 10,
                 protect: Sequence[nn.Module] = ()):
        """`protect`: other modules the loss runs (e.g. LBGAT's natural model inside the method);
        their buffers and modes are left alone by `perturb` like the model's. Not perturbed."""
        if gamma < 0:
            raise ValueError(f"awp.gamma must be >= 0, got {gamma}")
        if warmup < 0:
            raise ValueError(f"awp.warmup must be >= 0, got {warmup}")
        self.model, self.gamma, self.warmup = model, gamma, warmup
        self._modules = [model, *protect]
        # Frozen weights are skipped: the proxy's SGD step would not move them, so their v is 0.
        self.weights = [p for name, p in model.named_parameters()
                        if p.ndim > 1 and "weight" in name and p.requires_grad]
        if not self.weights:
            raise ValueError("AWP: the model has no conv/linear weights to perturb")
        self._added: list[Tensor] | None = None  # gamma * v while the weights are perturbed

    def active(self, epoch: int) -> bool:
        """Whether to perturb in this (1-based) epoch: from epoch `warmup` on, if gamma > 0."""
        return self.gamma > 0 and epoch >= self.warmup

    def perturb(self, loss_fn: Callable[[], Tensor]) -> None:
        """w += gamma * v at the current weights; `loss_fn()` is the outer loss (a scalar).

        Leaves everything else as it was: `.grad` fields, the buffers (BatchNorm running
        statistics, num_batches_tracked) and train/eval modes of the model and `protect`.
        """
        if self._added is not None:
            raise RuntimeError("AWP.perturb called twice without restore")
        # The extra forward runs in train mode (the loss sets it) and would update the BatchNorm
        # running statistics a second time per step; the reference ran it on a proxy copy.
        buffers = [b for m in self._modules for b in m.buffers()]
        saved = [b.clone() for b in buffers]
        modules = [sub for m in self._modules for sub in m.modules()]
        modes = [sub.training for sub in modules]
        try:
            # autograd.grad returns the gradients instead of accumulating them into .grad, so the
            # optimizer's gradients of the outer pass are not polluted.
            grads = torch.autograd.grad(loss_fn(), self.weights, allow_unused=True)
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
            for sub, mode in zip(modules, modes):
                sub.training = mode
        with torch.no_grad():
            # A weight the loss does not reach gets no proxy update, hence v = 0.
            grads = [torch.zeros_like(w) if g is None else g for w, g in zip(self.weights, grads)]
            # Under torchrun: the gradient of the global batch, so every rank moves alike.
            distributed.all_reduce_mean_(grads)
            w_norms = torch._foreach_norm(self.weights)
            g_norms = torch._foreach_add(torch._foreach_norm(grads), _EPS)
            scales = torch._foreach_mul(torch._foreach_div(w_norms, g_norms), self.gamma)
            added = torch._foreach_mul(grads, scales)  # gamma * ||w_l|| / ||g_l|| * g_l
            torch._foreach_add_(self.weights, added)
        self._added = added

    def restore(self) -> None:
        """w -= gamma * v: subtracts exactly the tensors `perturb` added (call after the step)."""
        if self._added is None:
            raise RuntimeError("AWP.restore called without a preceding perturb")
        with torch.no_grad():
            torch._foreach_sub_(self.weights, self._added)
        self._added = None
