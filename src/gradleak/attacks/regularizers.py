"""Image priors added to the matching objective."""

from __future__ import annotations

import torch


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of ... x H x W images: mean |horizontal| + mean |vertical| difference.

    Means (not sums) keep the value independent of batch size and resolution.
    """
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy
