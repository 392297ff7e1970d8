"""A small ReLU ConvNet with BatchNorm (the breaching / Inverting Gradients 'ConvNet' family, scaled down)."""

from __future__ import annotations

from torch import nn

from .base import VictimNet


class ConvNet(VictimNet):
    """``depth`` blocks of conv3x3 -> BN -> ReLU, a 2x2 max-pool after each block but the first,
    global average pooling and a linear classifier. Channels double every block from ``width``.

    ``pool_first=True`` also pools after the first block, so the later blocks run at half the
    resolution (about 4x cheaper at 64 px; the choice for multi-round training on a CPU)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 32,
                 depth: int = 3, batch_norm: bool = True, pool_first: bool = False, **norm):
        super().__init__(in_channels, **norm)
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(depth):
            c_out = width * 2 ** i
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            if i > 0 or pool_first:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def features(self, x):
        return self.body(x)
