"""Inverting Gradients (Geiping et al., NeurIPS 2020).

Cosine gradient matching plus total variation, Adam on the *sign* of the image gradient, a box
constraint to [0, 1], multi-step learning-rate decay at 3/8, 5/8 and 7/8 of the budget, several
restarts optimised as one batched problem, and the restart with the lowest matching loss kept.
"""

from __future__ import annotations

from typing import Any

from . import engine

DEFAULTS: dict[str, Any] = {
    **engine.COMMON,
    "objective": "cosine",
    "optimizer": "signed_adam",
    "schedule": "step",
    "lr": 0.1,
    "tv_weight": 1e-4,
    "init": "uniform",
}
