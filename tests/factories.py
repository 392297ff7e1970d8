"""Small real objects shared by tests (no mocks): tiny batches, observations and truth files."""

from __future__ import annotations

import torch

from gradleak.capture import Truth, capture
from gradleak.federated import Protocol


def tiny_batch(n: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blobs = []
    for _ in range(n):
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.5]) - torch.tensor([0.5, 0.5, -0.3]))
        blobs.append(torch.sigmoid((r - ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()) * 10))
    images = torch.stack(blobs)[:, None].clamp(0, 1)
    labels = torch.arange(n) % 2
    return images, labels


def tiny_observation(arch: str = "lenet_zhu", n: int = 2, size: int = 16, labels_known: bool = True,
                     protocol: Protocol | None = None, **kw):
    images, labels = tiny_batch(n, size)
    obs, _ = capture(images, labels, arch=arch, protocol=protocol or Protocol(), labels_known=labels_known,
                     **kw)
    return obs, Truth(images, labels, [f"p{i}" for i in range(n)], [f"img{i}" for i in range(n)], list(range(n)))
