"""The classical baselines as tiny torch modules: k nearest neighbours on downsampled pixels, and an SVM
on downsampled pixels or on a pretrained CNN's features.

Storing the training pixels (k-NN) or the SVM's coefficients and support vectors as buffers lets the
baselines go through the same checkpoint (safetensors, never a pickle), evaluation, export and even the
daemon's runtime as a CNN, so a user sees exactly what the CNN buys over them. The k-NN's output is log
vote fractions: softmax turns it back into the fraction of the k neighbours that voted for each class.

Distances and kernels are computed in fp32 even when the caller runs the model under fp16/bf16 autocast
(training and evaluation on CUDA do): in half precision, |x|^2 - 2 x.y + |y|^2 loses the small differences that
decide which neighbours are nearest, and the baseline's answer would change with the device.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

SVM_KERNELS = ("rbf", "linear")


def grid_for(image_size: int, largest: int = 16) -> int:
    """The largest pooling grid <= `largest` that divides the image side (exact pooling, ONNX-exportable)."""
    return max(d for d in range(1, largest + 1) if image_size % d == 0)


def fp32_region(x: torch.Tensor):
    """A context in which ops run in fp32 whatever autocast the caller set (a no-op when autocast is off,
    which keeps exports and TorchScript traces free of autocast nodes)."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 for rows of a (N x D) and b (M x D), always in fp32."""
    with fp32_region(a):
        a, b = a.float(), b.float()
        return (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)


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
        with fp32_region(x):
            dist = squared_distances(self.features(x), self.train_x)
            idx = torch.topk(dist, self.k, dim=1, largest=False).indices
            votes = self.train_y.float()[idx].sum(1) / self.k
            return torch.log(votes + 1e-6)


def without_head(net: nn.Module) -> nn.Module:
    """The network with its last Linear layer (the classifier head) replaced by Identity, in place:
    image -> penultimate features."""
    head = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = net.get_submodule(head.rsplit(".", 1)[0]) if "." in head else net
    setattr(parent, head.rsplit(".", 1)[-1], nn.Identity())
    return net


class FeatureSVM(nn.Module):
    """A multi-class SVM fitted by scikit-learn, evaluated in torch, on pooled pixels or a backbone's features.

    Features are centred and scaled by statistics of the training features (buffers `mean`, `inv_std`).
    kernel 'linear': one-vs-rest, decision = f @ coef.T + intercept (liblinear's LinearSVC).
    kernel 'rbf': libsvm's one-vs-one SVC, K = exp(-gamma |f - sv|^2) against the support vectors, one
    decision per class pair (`dual` holds each support vector's coefficient in every pair it takes part
    in), then scikit-learn's own vote-plus-confidence rule (SVC.decision_function, shape 'ovr'; its argmax
    is SVC.predict's answer except on tied votes, which it breaks by confidence). The output is `scale` x
    those scores, `scale` fitted on the validation split so that softmax gives calibrated-looking scores.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 64, kernel: str = "rbf",
                 backbone: str | None = None, grid: int | None = None, dim: int | None = None, n_sv: int = 1,
                 backbone_net: nn.Module | None = None):
        super().__init__()
        if kernel not in SVM_KERNELS:
            raise ValueError(f"kernel {kernel!r}: expected one of {', '.join(SVM_KERNELS)}")
        self.kernel, self.backbone_arch = kernel, backbone
        if backbone:
            if not dim or backbone_net is None:
                raise ValueError("an SVM on backbone features needs the network (backbone_net, built by "
                                 "visiond.models.arch) and dim (the feature width)")
            self.backbone = without_head(backbone_net)
            self.grid = 0
        else:
            self.grid = int(grid or grid_for(image_size, 32))
            self.pool = nn.AdaptiveAvgPool2d(self.grid)
            dim = in_channels * self.grid * self.grid
        c, pairs = num_classes, num_classes * (num_classes - 1) // 2
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))
        self.register_buffer("scale", torch.ones(()))
        if kernel == "linear":
            self.register_buffer("coef", torch.zeros(c, dim))
            self.register_buffer("intercept", torch.zeros(c))
        else:
            self.register_buffer("support", torch.zeros(n_sv, dim))
            self.register_buffer("dual", torch.zeros(n_sv, pairs))
            self.register_buffer("intercept", torch.zeros(pairs))
            self.register_buffer("gamma", torch.ones(()))
            first, second = torch.zeros(pairs, c), torch.zeros(pairs, c)
            p = 0
            for i in range(c):
                for j in range(i + 1, c):
                    first[p, i], second[p, j], p = 1.0, 1.0, p + 1
            self.register_buffer("pair_first", first)    # constant: which class wins a pair's positive decision
            self.register_buffer("pair_second", second)  # and which wins its negative one

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) features of normalised images."""
        if self.grid:
            return self.pool(x.float()).flatten(1)
        return self.backbone(x).flatten(1)

    def decision(self, f: torch.Tensor) -> torch.Tensor:
        """Per-class scores from raw features, in fp32 (SVC.decision_function 'ovr' for rbf)."""
        with fp32_region(f):
            f = (f.float() - self.mean) * self.inv_std
            if self.kernel == "linear":
                return f @ self.coef.T + self.intercept
            dec = torch.exp(-self.gamma * squared_distances(f, self.support).clamp_min(0)) @ self.dual + self.intercept
            votes = (dec >= 0).float() @ self.pair_first + (dec < 0).float() @ self.pair_second
            conf = dec @ (self.pair_first - self.pair_second)
            return votes + conf / (3 * (conf.abs() + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.decision(self.features(x))
