"""The victim network's common frame: input normalisation lives here, not in the data."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class VictimNet(nn.Module):
    """A classifier that takes images in [0, 1] and normalises them itself.

    ``mean``/``std`` are non-persistent buffers, so they never appear in ``state_dict()`` or in an
    update: the Observation records them under ``data`` instead. Subclasses implement ``features``
    (everything up to the penultimate layer) and set ``self.classifier`` (the last layer).
    """

    def __init__(self, in_channels: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        mean = list(mean) if mean is not None else [0.5] * in_channels
        std = list(std) if std is not None else [0.5] * in_channels
        if len(mean) == 1 and in_channels > 1:
            mean = mean * in_channels
        if len(std) == 1 and in_channels > 1:
            std = std * in_channels
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std
        return self.classifier(self.features(x))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Features fed to the last layer (used by label inference and re-identification)."""
        return self.features((x - self.input_mean) / self.input_std)
