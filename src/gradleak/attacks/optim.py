"""Optimisers over many independent restarts stacked on a leading axis.

Adam is element-wise, so stacking restarts keeps them independent. L-BFGS is not: one shared history
and step length would couple the restarts (and one diverging restart would poison the others), so
:class:`BatchedLBFGS` keeps a separate curvature history, step and stopping state per restart while
doing the arithmetic for all restarts at once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class BatchedLBFGS:
    """L-BFGS without line search (as ``torch.optim.LBFGS`` with ``line_search_fn=None``, which DLG uses),
    run independently for each restart.

    ``params`` are tensors whose first axis is the restart. Each :meth:`step` is one function evaluation
    and one update. A restart whose loss or gradient becomes non-finite stops where it is and is
    reported in :attr:`active`; one whose gradient vanishes stops too (it has converged).
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float = 1.0, history_size: int = 100,
                 tolerance_grad: float = 1e-10):
        self.params = list(params)
        self.R = int(self.params[0].shape[0])
        self.lr = float(lr)
        self.history_size = int(history_size)
        self.tolerance_grad = float(tolerance_grad)
        dev = self.params[0].device
        self.active = torch.ones(self.R, dtype=torch.bool, device=dev)
        self.steps: list[torch.Tensor] = []
        self.dirs: list[torch.Tensor] = []
        self.rhos: list[torch.Tensor] = []
        self.h_diag = torch.ones(self.R, device=dev)
        self.prev_grad: torch.Tensor | None = None
        self.d: torch.Tensor | None = None
        self.t: torch.Tensor | None = None

    def _flat_grad(self) -> torch.Tensor:
        gs = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(self.R, -1) for p in self.params]
        return torch.cat(gs, dim=1)

    def _add(self, flat: torch.Tensor) -> None:
        i = 0
        with torch.no_grad():
            for p in self.params:
                n = p[0].numel()
                p.add_(flat[:, i:i + n].view_as(p))
                i += n

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``closure()`` zeroes the gradients, computes the per-restart losses (R), calls backward on
        their sum and returns them."""
        losses = closure().detach()
        g = self._flat_grad().detach()
        finite = torch.isfinite(losses) & torch.isfinite(g).all(dim=1)
        self.active &= finite
        g = torch.where(finite[:, None], g, torch.zeros_like(g))
        self.active &= g.abs().amax(dim=1) > self.tolerance_grad
        if self.d is None:
            d = -g
            t = (1.0 / g.abs().sum(dim=1).clamp_min(1e-30)).clamp(max=1.0) * self.lr
        else:
            y = g - self.prev_grad
            s = self.d * self.t[:, None]
            ys = (y * s).sum(dim=1)
            ok = ys > 1e-10
            if len(self.dirs) == self.history_size:
                self.dirs.pop(0), self.steps.pop(0), self.rhos.pop(0)
            self.dirs.append(y)
            self.steps.append(s)
            self.rhos.append(torch.where(ok, 1.0 / torch.where(ok, ys, torch.ones_like(ys)), torch.zeros_like(ys)))
            yy = (y * y).sum(dim=1)
            self.h_diag = torch.where(ok, ys / yy.clamp_min(1e-30), self.h_diag)
            q = -g
            alphas = []
            for s_i, y_i, r_i in zip(reversed(self.steps), reversed(self.dirs), reversed(self.rhos)):
                a = r_i * (s_i * q).sum(dim=1)
                q = q - a[:, None] * y_i
                alphas.append(a)
            d = q * self.h_diag[:, None]
            for s_i, y_i, r_i, a in zip(self.steps, self.dirs, self.rhos, reversed(alphas)):
                b = r_i * (y_i * d).sum(dim=1)
                d = d + s_i * (a - b)[:, None]
            t = torch.full((self.R,), self.lr, device=g.device)
        self.prev_grad = g
        self.d = d
        self.t = t
        self._add(d * (t * self.active)[:, None])
        return losses
