"""BatchNorm settings shared by the model builders."""
from __future__ import annotations

from torch import nn


def set_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Every BatchNorm's running-statistics momentum (model.bn_momentum); returns the model."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return model
