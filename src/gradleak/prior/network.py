"""The post-processing network: a compact, size-agnostic U-Net, grey image in, grey image out.

Three resolution levels (full, 1/2, 1/4) of two 3x3 convolutions each, average-pool down, bilinear up,
skip connections, and a residual output: the network predicts a correction that is added to its input,
so an untrained network is close to the identity. Besides the image it sees the image standardised by
its own mean and standard deviation and a constant map of log(std): attack outputs often keep the
structure but lose most of the contrast (the gradient of a noised update), and these inputs let the
network tell how much to restore. Any input side works: the image is padded (replicate)
to a multiple of 4 and the output cropped back. Optionally conditioned on the (inferred) label by a
learned per-class vector added to the bottleneck features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCH = "unet3"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.1),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.1))


class PriorNet(nn.Module):
    """U-Net of ``width`` base channels; ``num_classes`` > 0 adds label conditioning."""

    def __init__(self, width: int = 16, num_classes: int = 0, channels: int = 1):
        super().__init__()
        self.width, self.num_classes, self.channels = int(width), int(num_classes), int(channels)
        w = self.width
        self.enc1 = _block(3 * channels, w)
        self.enc2 = _block(w, 2 * w)
        self.mid = _block(2 * w, 4 * w)
        self.dec2 = _block(4 * w + 2 * w, 2 * w)
        self.dec1 = _block(2 * w + w, w)
        self.out = nn.Conv2d(w, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.label_embedding = nn.Embedding(self.num_classes, 4 * w) if self.num_classes > 0 else None

    def config(self) -> dict:
        return {"width": self.width, "num_classes": self.num_classes, "channels": self.channels}

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
        mean = xp.mean(dim=(-2, -1), keepdim=True)
        std = xp.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3) if xp.shape[-1] * xp.shape[-2] > 1 \
            else torch.full_like(mean, 1e-3)
        e1 = self.enc1(torch.cat([xp, (xp - mean) / std, torch.log(std).expand_as(xp)], 1))
        e2 = self.enc2(F.avg_pool2d(e1, 2))
        m = self.mid(F.avg_pool2d(e2, 2))
        if self.label_embedding is not None and labels is not None:
            lab = labels.to(x.device).long().clamp(0, self.num_classes - 1)
            m = m + self.label_embedding(lab)[:, :, None, None]
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:], mode="bilinear", align_corners=False),
                                  e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False),
                                  e1], 1))
        y = xp + self.out(d1)
        return y[..., :h, :w]
