"""Decoders: from the variables an attack optimises (its latent) to candidate images.

``identity`` optimises the pixels themselves (DLG, Inverting Gradients). ``bicubic`` optimises a
low-resolution image of ``image size / scale_factor`` pixels a side and upsamples it bicubically (ROG,
Yue et al. 2023): a quarter of the resolution in each direction has a sixteenth of the unknowns, which
makes matching a degraded update far better posed, at the price of detail that a post-processing
network is meant to restore.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Identity:
    name = "identity"

    def __init__(self, image_shape: tuple[int, int, int]):
        self.image_shape = tuple(image_shape)
        self.latent_shape = tuple(image_shape)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return z


class Bicubic:
    """Bicubic upsampling (``align_corners=False``) of an ``H/scale x W/scale`` latent to ``H x W``."""

    name = "bicubic"

    def __init__(self, image_shape: tuple[int, int, int], scale_factor: int):
        c, h, w = image_shape
        s = int(scale_factor)
        if s < 1:
            raise ValueError(f"scale_factor must be >= 1, got {scale_factor}")
        self.image_shape = tuple(image_shape)
        self.latent_shape = (c, max(1, -(-h // s)), max(1, -(-w // s)))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-3]
        flat = z.reshape(-1, *self.latent_shape)
        up = F.interpolate(flat, size=self.image_shape[1:], mode="bicubic", align_corners=False)
        return up.reshape(*lead, *self.image_shape)


def build(name: str, image_shape: tuple[int, int, int], scale_factor: int = 1):
    if name == "identity" or (name == "bicubic" and int(scale_factor) == 1):
        return Identity(image_shape)
    if name == "bicubic":
        return Bicubic(image_shape, scale_factor)
    raise ValueError(f"unknown decoder {name!r} (known: identity, bicubic)")
