"""Image priors added to the matching objective."""

from __future__ import annotations

import torch


def total_variation(x: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """Anisotropic total variation of ... x H x W images: mean |horizontal| + mean |vertical| difference.

    Means (not sums) keep the value independent of batch size and resolution. ``per_image``: one value
    per entry of the first dimension (N x C x H x W images), the mean over the rest.
    """
    dims = tuple(range(1, x.dim())) if per_image else tuple(range(x.dim()))
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=dims)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=dims)
    return dx + dy
