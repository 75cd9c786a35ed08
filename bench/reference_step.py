"""The baseline of bench.at_step: a training step written the way the reference code writes it.

It follows the structure of the public reference implementations (DKL's IKL-AT script, TRADES,
Madry PGD-AT; docs/performance.md#the-baseline-and-the-floor), not their text:

* data: a torch DataLoader over PIL images with torchvision's RandomCrop(32, 4) + flip + ToTensor;
* the attack recomputes the natural logits at every step (TRADES / IKL-AT) in eval mode;
* IKL's wMSE built from B×C×C logit-difference tensors (docs/reference.md#wmse-in-obc);
* TRADES' outer step runs the natural forward twice (for CE and as the KL target);
* AWP through a proxy copy of the model: load_state_dict + one SGD step on -loss + weight diffs;
* a host synchronisation per step (loss and accuracy read with .item() for the progress meter);
* float32, NCHW, torch's default (non-fused) SGD, and on CUDA cuDNN in deterministic mode.

Same model architecture, initial weights, batch, data and attack settings as ours.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

METHODS = ("standard", "pgd_at", "trades", "ikl_at")


class PILImages(Dataset):
    """uint8 N×3×32×32 images served one by one as PIL images through torchvision transforms."""

    def __init__(self, x_uint8: Tensor, y: Tensor):
        from torchvision import transforms
        self.images = x_uint8.permute(0, 2, 3, 1).numpy()  # N×H×W×C, as CIFAR's .data
        self.labels = y.tolist()
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                             transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(np.ascontiguousarray(self.images[i]))), \
            self.labels[i]


def loader(x_uint8: Tensor, y: Tensor, batch_size: int, workers: int, device: torch.device,
           seed: int = 0) -> DataLoader:
    return DataLoader(PILImages(x_uint8, y), batch_size=batch_size, shuffle=True,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed),
                      persistent_workers=workers > 0)


def naive_ikl(z_adv: Tensor, z_nat: Tensor, w: Tensor, alpha: float, beta: float,
              version: str = "v1", gamma: float = 1.0) -> Tensor:
    """beta * wMSE + alpha * SCE with the pairwise B×C×C tensors."""
    d_nat = z_nat[:, :, None] - z_nat[:, None, :]
    d_adv = z_adv[:, :, None] - z_adv[:, None, :]
    w = w.pow(gamma) if version == "v2" else w
    pair = w[:, :, None] * w[:, None, :]
    total = 0.25 * (pair * (d_nat - d_adv).pow(2)).sum()
    wmse = total / (pair.sum() if version == "v2" else z_adv.shape[0])
    sce = -(F.softmax(z_nat.detach(), 1) * F.log_softmax(z_adv, 1)).sum(1).mean()
    return beta * wmse + alpha * sce


def kl_div(z_adv: Tensor, z_nat: Tensor) -> Tensor:
    return F.kl_div(F.log_softmax(z_adv, 1), F.softmax(z_nat, 1), reduction="batchmean")


class ReferenceStep:
    """One reference-style training step of `method` on a (model, optimizer) of its own."""

    def __init__(self, model: nn.Module, cfg: dict, num_classes: int, awp: bool):
        name = cfg["method"]["name"]
        if name not in METHODS:
            raise ValueError(f"no reference-style baseline for method {name!r}; "
                             f"valid: {', '.join(METHODS)}")
        self.model, self.cfg, self.name = model, cfg, name
        self.params = cfg["method"].get(name, {})
        o = cfg["optim"]
        self.optimizer = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"],
                                         weight_decay=o["weight_decay"], foreach=False)
        device = next(model.parameters()).device
        self.prior = torch.full((num_classes, num_classes), 1.0 / num_classes, device=device)
        self.prior_sum = torch.zeros_like(self.prior)
        self.awp_gamma = cfg["awp"]["gamma"] if awp else 0.0
        if awp:
            self.proxy = copy.deepcopy(model)
            self.proxy_optimizer = torch.optim.SGD(self.proxy.parameters(), lr=0.01)

    # ---- attack ---------------------------------------------------------------------------
    def attack_loss(self, x_adv: Tensor, x: Tensor, y: Tensor) -> Tensor:
        p = self.params
        if self.name == "pgd_at":
            return F.cross_entropy(self.model(x_adv), y)
        if self.name == "trades":
            return kl_div(self.model(x_adv), self.model(x))
        return naive_ikl(self.model(x_adv), self.model(x), self.prior[y], p["attack_alpha"],
                         p["attack_beta"], p["version"], p["gamma"])

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        a = self.cfg["attack"]
        eps, step, steps = a["eps"], a["step_size"], a["steps"]
        self.model.eval()
        if a["init"] == "uniform":
            x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
        else:
            x_adv = x + 0.001 * torch.randn_like(x)
        for _ in range(steps):
            x_adv.requires_grad_()
            grad = torch.autograd.grad(self.attack_loss(x_adv, x, y), [x_adv])[0]
            x_adv = x_adv.detach() + step * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
        return x_adv.detach()

    # ---- outer loss -----------------------------------------------------------------------
    def outer_loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor):
        p = self.params
        if self.name == "standard":
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        if self.name == "pgd_at":
            logits = model(x_adv)
            return F.cross_entropy(logits, y), logits
        if self.name == "trades":
            logits = model(x)
            robust = kl_div(model(x_adv), model(x))  # the natural forward again, as TRADES
            return F.cross_entropy(logits, y) + p["beta"] * robust, logits
        logits_adv, logits = model(x_adv), model(x)
        robust = naive_ikl(logits_adv, logits, self.prior[y], p["alpha"], p["beta"],
                           p["version"], p["gamma"])
        return F.cross_entropy(logits, y) + robust, logits

    def awp_perturb(self, x: Tensor, y: Tensor, x_adv: Tensor) -> list[Tensor]:
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss, _ = self.outer_loss(self.proxy, x, y, x_adv)
        self.proxy_optimizer.zero_grad()
        (-loss).backward()
        self.proxy_optimizer.step()
        diffs = []
        state, proxy_state = self.model.state_dict(), self.proxy.state_dict()
        for key, w in state.items():
            if w.dim() > 1 and "weight" in key:
                diff = proxy_state[key] - w
                diffs.append(w.norm() / (diff.norm() + 1e-20) * diff)
        self._add(diffs, self.awp_gamma)
        return diffs

    def _add(self, diffs: list[Tensor], coefficient: float) -> None:
        names = [n for n, p in self.model.named_parameters() if p.dim() > 1 and "weight" in n]
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, diff in zip(names, diffs):
                params[name].add_(coefficient * diff)

    def step(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """One step on a host batch; returns (loss, accuracy) read back to the host."""
        device = next(self.model.parameters()).device
        x, y = x.to(device), y.to(device)
        x_adv = self.perturb(x, y) if self.name != "standard" else x
        self.model.train()
        diffs = self.awp_perturb(x, y, x_adv) if self.awp_gamma else None
        loss, logits = self.outer_loss(self.model, x, y, x_adv)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if diffs is not None:
            self._add(diffs, -self.awp_gamma)
        if self.name == "ikl_at":
            temperature = self.params["temperature"]
            probs = F.softmax(logits.detach() / temperature, 1)
            self.prior_sum.index_add_(0, y, probs)
        return loss.item(), (logits.argmax(1) == y).float().mean().item()
