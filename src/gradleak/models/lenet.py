"""LeNet variants used in the gradient-inversion literature."""

from __future__ import annotations

import torch
from torch import nn

from .base import VictimNet


class LeNet5(VictimNet):
    """ROG's LeNet-5 variant (Yue et al. 2023).

    conv5x5 -> 32, ReLU, maxpool 2; conv5x5 -> 64, ReLU, maxpool 2; linear -> 512 (no bias), ReLU;
    linear -> classes (no bias). Convolutions are 'same'-padded so any size divisible by 4 works.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, **norm):
        super().__init__(in_channels, **norm)
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        side = image_size // 4
        self.fc1 = nn.Linear(64 * side * side, 512, bias=False)
        self.classifier = nn.Linear(512, num_classes, bias=False)

    #: The linear layer whose output goes through a ReLU: its update leaks each image's input to it.
    leaky_linear = "fc1"
    #: ``fc1``'s ReLU output feeds the classifier directly (its rows are subset sums of the images').
    leaky_feeds_classifier = True

    def leaky_preactivation(self, x):
        """``fc1``'s input before its last ReLU: ``leaky_input(x) == relu(leaky_preactivation(x))`` (max
        pooling and ReLU commute). Where ``leaky_input`` is 0 this is how far below 0 it lies, which a
        support constraint (signSGD's leak) needs: the ReLU's output is flat there."""
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        return torch.max_pool2d(self.conv2(x), 2).flatten(1)

    def leaky_input(self, x):
        """The input of ``fc1`` (the flattened convolutional features) for normalised images ``x``."""
        return torch.relu(self.leaky_preactivation(x))

    def after_leaky(self, z):
        """The logits from ``fc1``'s pre-activation output ``z``."""
        return self.classifier(torch.relu(z))

    def features(self, x):
        return torch.relu(self.fc1(self.leaky_input(x)))


class LeNetZhu(VictimNet):
    """DLG's LeNet (Zhu et al. 2019): three 5x5 convs of 12 channels, strides 2, 2, 1, sigmoid, one linear."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, **norm):
        super().__init__(in_channels, **norm)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1), nn.Sigmoid(),
        )
        side = -(-(-(-image_size // 2)) // 2)  # ceil(ceil(size / 2) / 2)
        self.classifier = nn.Linear(12 * side * side, num_classes)

    def features(self, x):
        return self.body(x).flatten(1)
