"""Building blocks several heads share: activations, the :class:`MLP`, Sentence-BERT pair features."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from .base import check_choice, check_int, check_prob

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "selu": nn.SELU,
}


def make_activation(name: str, where: str = "activation") -> nn.Module:
    check_choice(where, "activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """``num_layers`` hidden blocks ``Linear(·, width) → activation → dropout``, then ``Linear(·, out_dim)``.

    Dropout is also applied to the input. With SELU the dropouts are ``AlphaDropout`` (keeps the
    self-normalising mean and variance, Klambauer et al. 2017). ``num_layers=0`` is a linear layer.
    """

    def __init__(self, in_dim: int, out_dim: int, num_layers: int = 1, width: Optional[int] = None,
                 activation: str = "relu", dropout: float = 0.1, where: str = "MLP"):
        super().__init__()
        check_int(where, "num_layers", num_layers, 0)
        width = in_dim if width is None else check_int(where, "width", width, 1)
        check_prob(where, "dropout", dropout)
        make_activation(activation, where)
        drop = nn.AlphaDropout if activation == "selu" else nn.Dropout
        layers = [drop(dropout)]
        dim = in_dim
        for _ in range(num_layers):
            layers += [nn.Linear(dim, width), make_activation(activation), drop(dropout)]
            dim = width
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sbert_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sentence-BERT pair features ``[u; v; |u − v|; u * v]`` (B, 4H) (Reimers & Gurevych 2019)."""
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)

