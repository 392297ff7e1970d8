"""Initial values of the optimised variables (images or a decoder's latent), drawn from a generator."""

from __future__ import annotations

import torch

INITS = ("uniform", "grey", "gaussian")


def initial(shape, init: str, generator: torch.Generator) -> torch.Tensor:
    """``uniform``: U[0, 1]; ``grey``: 0.5 plus N(0, 0.05^2), clipped to [0, 1]; ``gaussian``: N(0, 1)
    (DLG's initialisation, unconstrained)."""
    if init == "uniform":
        return torch.rand(shape, generator=generator)
    if init == "grey":
        return (0.5 + 0.05 * torch.randn(shape, generator=generator)).clamp(0, 1)
    if init == "gaussian":
        return torch.randn(shape, generator=generator)
    raise ValueError(f"unknown init {init!r} (known: {', '.join(INITS)})")
