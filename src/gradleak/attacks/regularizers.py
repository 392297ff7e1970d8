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


def contrast_free_tv(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image total variation divided by the image's standard deviation, times ``reference`` (one
    number per image, e.g. its standard deviation where an optimiser's step starts): unchanged by a
    change of contrast about the image's mean, so it smooths without pulling the contrast down. Where an
    image's ``reference`` is below 1e-3 (a flat start) it is the plain total variation."""
    tv = total_variation(x, per_image=True)
    std = x.flatten(1).std(dim=1)
    flat = reference < 1e-3
    return torch.where(flat, tv, tv * reference / std.clamp_min(1e-6))
