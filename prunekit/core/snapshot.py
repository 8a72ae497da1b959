"""A copy of some layers' dense weights and biases, to try something on the model and put it back.

Used wherever a model is pruned tentatively and must return to dense: the ``auto`` parameter search, a
search's fitness, benchmarks that prune one model many times. A bias that did not exist when the snapshot
was taken (added by a bias-correcting metric) is removed again on restore.
"""
from __future__ import annotations

import torch
from torch import nn

from .families import weight_view


class WeightSnapshot:
    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = dict(layers)
        self.weights = {n: weight_view(m).detach().clone() for n, m in self.layers.items()}
        self.biases = {n: (None if m.bias is None else m.bias.detach().clone()) for n, m in self.layers.items()}

    @torch.no_grad()
    def restore(self, names=None) -> None:
        """Put the dense weights (and biases) back, for ``names`` or every layer."""
        for n in self.layers if names is None else names:
            m = self.layers[n]
            weight_view(m).copy_(self.weights[n])
            if self.biases[n] is None:
                m.bias = None
            else:
                m.bias.data.copy_(self.biases[n])
