"""Architectures by name: visiond's own small CNN and torchvision families.

Lookup goes through an explicit table, never `models.__dict__[name]`; a bad
name fails loudly and lists the valid ones.
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision.models as tvm
from torch import nn


class SmallCNN(nn.Module):
    """The seed's network (version 1): Conv32-pool-Conv64-pool-Dense128-Dense(n).

    Kept so every checkpoint trained before version 2 loads and serves exactly as before;
    new training runs build `SmallCNNv2` (checkpoints without `version` in arch_args are version 1).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True), nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNNv2(nn.Module):
    """The default network since version 2, still small enough for an edge box's CPU:
    Conv32-pool-Conv64-Conv64-pool-Conv128-pool-Dense128-Dense(n), BatchNorm after every
    convolution, dropout before both dense layers.

    Against version 1: BatchNorm (trains faster and at a higher learning rate), one more
    stage (a larger receptive field at the same input size), ~0.8x its parameters.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 64, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, 32), nn.MaxPool2d(2),
            *_conv_bn(32, 64), *_conv_bn(64, 64), nn.MaxPool2d(2),
            *_conv_bn(64, 128), nn.MaxPool2d(2),
        )
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(128 * side * side, 128), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# What new training runs build; stored in the checkpoint's arch_args as `version`. Still the seed's network:
# v2 underfit the synthetic line's small sets (240 crops, 10 epochs: scratch 65/80 on its own training crops
# against 80/80) and costs ~2.2x per frame in the daemon; it builds from checkpoints that ask for it.
SMALLCNN_VERSION = 1


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the torchvision ImageNet head for one with `num_classes` outputs."""
    if isinstance(getattr(model, "fc", None), nn.Linear):  # resnet
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    cls = getattr(model, "classifier", None)
    if isinstance(cls, nn.Sequential):
        for i in range(len(cls) - 1, -1, -1):
            if isinstance(cls[i], nn.Linear):
                cls[i] = nn.Linear(cls[i].in_features, num_classes)
                return model
    raise ValueError(f"cannot find the classifier head of {type(model).__name__}")


def _adapt_input(model: nn.Module, in_channels: int) -> nn.Module:
    """Grey input for a torchvision network: a first conv with one input channel."""
    if in_channels == 3:
        return model
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return model
    raise ValueError(f"cannot find the first convolution of {type(model).__name__}")


_TORCHVISION: dict[str, Callable[..., nn.Module]] = {
    "vgg16": tvm.vgg16,
    "vgg19": tvm.vgg19,
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "mobilenet_v2": tvm.mobilenet_v2,
    "mobilenet_v3_small": tvm.mobilenet_v3_small,
    "mobilenet_v3_large": tvm.mobilenet_v3_large,
    "efficientnet_b0": tvm.efficientnet_b0,
    "efficientnet_b1": tvm.efficientnet_b1,
    "efficientnet_b2": tvm.efficientnet_b2,
    "efficientnet_b3": tvm.efficientnet_b3,
}

ARCHITECTURES = ("smallcnn", *_TORCHVISION, "knn", "svm")


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 64, **extra) -> nn.Module:
    """A freshly initialised network (no weights are ever downloaded)."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    if arch == "knn":  # the classical baseline, stored and served like a CNN
        from visiond.models.baseline import PixelKNN

        return PixelKNN(num_classes, in_channels, image_size, **extra)
    if arch == "svm":  # the other classical baseline (on pixels or a backbone's features), same path
        from visiond.models.baseline import FeatureSVM

        features = build_model(extra["backbone"], 2, in_channels, image_size) if extra.get("backbone") else None
        return FeatureSVM(num_classes, in_channels, image_size, backbone_net=features, **extra)
    if arch == "smallcnn":
        version = extra.pop("version", 1)  # checkpoints from before version 2 carry no version
        if extra:
            raise ValueError(f"architecture {arch!r} takes no arguments {sorted(extra)}")
        if version not in (1, 2):
            raise ValueError(f"smallcnn version {version!r}: expected 1 or 2")
        if image_size < 8:
            raise ValueError(f"image_size={image_size}: smallcnn needs at least 8 pixels")
        return (SmallCNN if version == 1 else SmallCNNv2)(num_classes, in_channels, image_size)
    if extra:
        raise ValueError(f"architecture {arch!r} takes no arguments {sorted(extra)}")
    if arch not in _TORCHVISION:
        raise ValueError(f"unknown architecture {arch!r}; expected one of: {', '.join(ARCHITECTURES)}")
    model = _TORCHVISION[arch](weights=None)
    return _adapt_input(_replace_head(model, num_classes), in_channels)


# The input size each family's torchvision ImageNet weights were trained (and are evaluated) at.
PRETRAINED_INPUT_SIZE: dict[str, int] = {name: 224 for name in _TORCHVISION} | {
    "efficientnet_b1": 240, "efficientnet_b2": 288, "efficientnet_b3": 300}


def imagenet_model(arch: str) -> nn.Module:
    """The unmodified torchvision network, to load an ImageNet state dict into."""
    if arch not in _TORCHVISION:
        raise ValueError(f"{arch!r} has no ImageNet weights format; expected one of: {', '.join(_TORCHVISION)}")
    return _TORCHVISION[arch](weights=None)
