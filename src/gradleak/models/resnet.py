"""ResNet-18 (He et al. 2016) for grey images, with and without BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from .base import VictimNet


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not batch_norm)
        self.bn1 = _norm(c_out, batch_norm)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not batch_norm)
        self.bn2 = _norm(c_out, batch_norm)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=not batch_norm),
                                          _norm(c_out, batch_norm))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(VictimNet):
    """BasicBlock [2, 2, 2, 2]. Inputs of 64 px or less get a 3x3 stride-1 stem without max-pool (as the
    CIFAR variant); larger inputs get the ImageNet 7x7 stride-2 stem with max-pool.
    ``batch_norm=False`` is ROG's BN-free variant (convolutions get biases instead)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, batch_norm: bool = True,
                 width: int = 64, **norm):
        super().__init__(in_channels, **norm)
        small = image_size <= 64
        if small:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=not batch_norm),
                                      _norm(width, batch_norm), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=not batch_norm),
                                      _norm(width, batch_norm), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers = []
        c_in = width
        for i, blocks in enumerate([2, 2, 2, 2]):
            c_out = width * 2 ** i
            for j in range(blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if (j == 0 and i > 0) else 1, batch_norm))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def features(self, x):
        return self.pool(self.layers(self.stem(x))).flatten(1)
