"""The classical baseline: k nearest neighbours on downsampled pixels, as a tiny torch module.

Storing the training pixels as buffers lets the baseline go through the same checkpoint,
evaluation, export and even the daemon's runtime as a CNN, so a user sees exactly what
the CNN buys over it. The output is log vote fractions: softmax turns it back into the
fraction of the k neighbours that voted for each class.
"""

from __future__ import annotations

import torch
from torch import nn


def grid_for(image_size: int, largest: int = 16) -> int:
    """The largest pooling grid <= `largest` that divides the image side (exact pooling, ONNX-exportable)."""
    return max(d for d in range(1, largest + 1) if image_size % d == 0)


class PixelKNN(nn.Module):
    """k-NN on an average-pooled grid of the normalised image (a 'tiny image' classifier)."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 64, k: int = 5,
                 grid: int | None = None, n_train: int = 1):
        super().__init__()
        self.k, self.grid = int(k), int(grid or grid_for(image_size))
        self.pool = nn.AdaptiveAvgPool2d(self.grid)
        dim = in_channels * self.grid * self.grid
        self.register_buffer("train_x", torch.zeros(n_train, dim))
        self.register_buffer("train_y", torch.zeros(n_train, num_classes))  # one-hot rows

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x.float()).flatten(1)

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> "PixelKNN":
        """Keep the training features; called once, there is nothing else to learn."""
        self.k = min(self.k, features.shape[0])
        self.train_x = features.detach().float().clone()
        self.train_y = nn.functional.one_hot(labels.long(), self.train_y.shape[1]).float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        dist = (f * f).sum(1, keepdim=True) - 2 * f @ self.train_x.T + (self.train_x * self.train_x).sum(1)
        idx = torch.topk(dist, self.k, dim=1, largest=False).indices
        votes = self.train_y[idx].sum(1) / self.k
        return torch.log(votes + 1e-6)
