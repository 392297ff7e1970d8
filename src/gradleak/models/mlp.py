"""A fully connected ReLU network on the pixels: the victim whose first layer leaks whole images."""

from __future__ import annotations

import torch
from torch import nn

from .base import VictimNet


class MLP(VictimNet):
    """Two fully connected layers on the image's pixels, as the fully connected victims of the
    gradient-leakage literature (the Cocktail Party Attack's FC networks, R-GAP's): flatten -> linear ->
    ``width`` (no bias), ReLU -> linear -> classes (no bias).

    ``fc1`` reads the pixels as stored, in [0, 1] (the normalisation every victim applies is undone for
    it; an affine change of the input would only change ``fc1``'s weights and add a bias), so each row
    of its update is a weighted sum of whole images: the leakiest first layer there is, and the case
    the linear-layer disaggregation was first written for.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 512, **norm):
        super().__init__(in_channels, **norm)
        self.fc1 = nn.Linear(in_channels * image_size * image_size, int(width), bias=False)
        self.classifier = nn.Linear(int(width), num_classes, bias=False)

    #: The linear layer whose output goes through a ReLU: its update leaks each image's input to it, here
    #: the image itself.
    leaky_linear = "fc1"
    #: ``fc1``'s ReLU output feeds the classifier directly (its rows are subset sums of the images').
    leaky_feeds_classifier = True
    #: ``fc1``'s inputs are the pixels: positive almost everywhere (0 to 8 % of a chest X-ray's pixels are 0 at 64
    #: and 128 px, against 33 to 45 % of ``lenet5``'s ``fc1`` inputs), so signSGD's supports show no image.
    leaky_input_is_image = True

    def leaky_preactivation(self, x):
        """``fc1``'s input for normalised images ``x``: the pixels in [0, 1], flattened (non-negative, so
        equal to :meth:`leaky_input`, as a ReLU's output is to its input where that is positive)."""
        return (x * self.input_std + self.input_mean).flatten(1)

    def leaky_input(self, x):
        """The input of ``fc1`` (the flattened pixels in [0, 1]) for normalised images ``x``."""
        return self.leaky_preactivation(x)

    def after_leaky(self, z):
        """The logits from ``fc1``'s pre-activation output ``z``."""
        return self.classifier(torch.relu(z))

    def features(self, x):
        return torch.relu(self.fc1(self.leaky_input(x)))
