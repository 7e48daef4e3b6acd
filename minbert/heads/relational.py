"""``relational``: a task head on a relation module that several pair tasks can share."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .base import Features, Head, check_int, check_prob
from .layers import make_activation, sbert_features


class RelationalLayer(nn.Module):
    """A relation module shared by several pair tasks: ``r(u, v) = MLP([u; v; |u − v|; u * v])`` (B, width).

    ``num_layers`` blocks ``Linear → activation → dropout`` (input dropout first). One instance can
    serve Quora and STS at once, so both tasks train the same relation parameters::

        rel = RelationalLayer(hidden_size=384, width=256)
        quora_head = build_head("relational", 384, "binary_classification", relational=rel)
        sts_head = build_head("relational", 384, "regression", relational=rel)
        assert quora_head.relational is sts_head.relational

    From config dicts, pass one ``shared`` dict to every :func:`build_head` call: heads with the same
    ``share_as`` key (default ``"relational"``) get the same layer::

        shared = {}
        heads = {t: build_head("relational", 384, kind, shared=shared) for t, kind in
                 (("quora", "binary_classification"), ("sts", "regression"))}

    (``model.parameters()`` lists a shared parameter once; build optimizer groups from it.)
    """

    OPTIONS = ("width", "num_layers", "activation", "dropout")

    def __init__(self, hidden_size: int, width: Optional[int] = None, num_layers: int = 1,
                 activation: str = "relu", dropout: float = 0.1):
        super().__init__()
        where = "RelationalLayer"
        self.hidden_size = check_int(where, "hidden_size", hidden_size, 1)
        width = hidden_size if width is None else check_int(where, "width", width, 1)
        check_int(where, "num_layers", num_layers, 1)
        check_prob(where, "dropout", dropout)
        make_activation(activation, where)
        drop = nn.AlphaDropout if activation == "selu" else nn.Dropout
        layers = [drop(dropout)]
        dim = 4 * hidden_size
        for _ in range(num_layers):
            layers += [nn.Linear(dim, width), make_activation(activation), drop(dropout)]
            dim = width
        self.net = nn.Sequential(*layers)
        self.out_dim = width
        self.options = {"width": width, "num_layers": num_layers, "activation": activation, "dropout": float(dropout)}

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.net(sbert_features(u, v))  # (B, width)


class RelationalHead(Head):
    """Task head on a (possibly shared) :class:`RelationalLayer`: ``Linear(r(u, v))`` → task output.

    ``relational``: a layer to use (shared by passing the same instance to several heads); otherwise
    one is built from ``width``, ``num_layers``, ``activation``, ``dropout``. Through
    :func:`build_head`, ``share_as`` (default ``"relational"``, ``None`` = private) names the entry of
    the ``shared`` dict the layer is stored under.
    """

    name = "relational"
    input_kind = "pair"

    def __init__(self, hidden_size, task_kind, num_classes=None, relational: Optional[RelationalLayer] = None,
                 width: Optional[int] = None, num_layers: int = 1, activation: str = "relu", dropout: float = 0.1,
                 output_transform: str = "identity", score_max: float = 5.0):
        super().__init__(hidden_size, task_kind, num_classes, output_transform, score_max)
        if relational is None:
            relational = RelationalLayer(hidden_size, width, num_layers, activation, dropout)
        elif not isinstance(relational, RelationalLayer):
            raise TypeError(f"{self.name}: relational must be a RelationalLayer, got {type(relational).__name__}")
        elif relational.hidden_size != hidden_size:
            raise ValueError(f"{self.name}: the shared RelationalLayer was built for hidden size "
                             f"{relational.hidden_size}, this head for {hidden_size}")
        self.relational = relational
        self.proj = nn.Linear(relational.out_dim, self.output.output_dim)

    def forward(self, features: Features) -> torch.Tensor:
        p = self._pair(features)
        return self.output(self.proj(self.relational(p.a.pooled, p.b.pooled)))

    @classmethod
    def option_names(cls, name: str) -> Tuple[str, ...]:
        return super().option_names(name) + ("share_as",)

    @classmethod
    def from_options(cls, name, hidden_size, task_kind, num_classes, shared, share_as: Optional[str] = "relational",
                     relational: Optional[RelationalLayer] = None, **options) -> "RelationalHead":
        layer_opts = {k: options.pop(k) for k in RelationalLayer.OPTIONS if k in options}
        if relational is not None:
            if layer_opts:
                raise ValueError(f"head 'relational': got a RelationalLayer instance and layer options "
                                 f"{sorted(layer_opts)}; give one or the other")
            return cls(hidden_size, task_kind, num_classes, relational=relational, **options)
        if shared is None or share_as is None:
            return cls(hidden_size, task_kind, num_classes, **layer_opts, **options)
        if share_as in shared:
            layer = shared[share_as]
            if not isinstance(layer, RelationalLayer):
                raise TypeError(f"head 'relational': shared[{share_as!r}] is a {type(layer).__name__}, "
                                f"not a RelationalLayer")
            wanted = dict(layer_opts)
            if wanted.get("width", 0) is None:
                wanted["width"] = hidden_size
            if "dropout" in wanted and isinstance(wanted["dropout"], (int, float)):
                wanted["dropout"] = float(wanted["dropout"])
            if any(layer.options[k] != wanted[k] for k in wanted):
                raise ValueError(f"head 'relational': share_as={share_as!r} already holds a layer with options "
                                 f"{layer.options}, which conflict with {layer_opts}")
        else:
            layer = shared[share_as] = RelationalLayer(hidden_size, **layer_opts)
        return cls(hidden_size, task_kind, num_classes, relational=layer, **options)

