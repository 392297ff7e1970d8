"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019) and its iDLG variant (Zhao et al. 2020).

DLG: squared-L2 gradient matching, L-BFGS (no line search, step 1, as the reference code), images
and *soft labels* optimised jointly from random starts, no image prior and no box constraint (the
result is clipped to [0, 1] at the end). iDLG (preset ``idlg``): the same with the labels read off the
last layer's gradient instead of optimised. Restarts run as one batched problem with an independent
L-BFGS history per restart.
"""

from __future__ import annotations

from typing import Any

from . import engine

DEFAULTS: dict[str, Any] = {
    **engine.COMMON,
    "objective": "l2",
    "optimizer": "lbfgs",
    "schedule": "constant",
    "lr": 1.0,
    "tv_weight": 0.0,
    "init": "uniform",
    "labels": "joint",
    "box": "none",
}
