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
        self.m = int(history_size)
        self.tolerance_grad = float(tolerance_grad)
        dev = self.params[0].device
        self.active = torch.ones(self.R, dtype=torch.bool, device=dev)
        # a ring buffer of curvature pairs per restart: restarts skip pairs with ys <= 1e-10 on their own
        self.S: torch.Tensor | None = None
        self.Y: torch.Tensor | None = None
        self.rho = torch.zeros(self.m, self.R, device=dev)
        self.pos = torch.zeros(self.R, dtype=torch.long, device=dev)
        self.count = torch.zeros(self.R, dtype=torch.long, device=dev)
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

    def _remember(self, s: torch.Tensor, y: torch.Tensor, ys: torch.Tensor, ok: torch.Tensor) -> None:
        if self.S is None:
            self.S = s.new_zeros(self.m, *s.shape)
            self.Y = y.new_zeros(self.m, *y.shape)
            self.rho = self.rho.to(s.dtype)
        r = torch.nonzero(ok).reshape(-1)
        if r.numel():
            at = self.pos[r]
            self.S[at, r] = s[r]
            self.Y[at, r] = y[r]
            self.rho[at, r] = 1.0 / ys[r]
            self.pos[r] = (at + 1) % self.m
            self.count[r] = (self.count[r] + 1).clamp(max=self.m)

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """Two-loop recursion, newest pair first, each restart over its own pairs."""
        q = -g
        rows = torch.arange(self.R, device=g.device)
        pairs = []
        for k in range(int(self.count.max()) if self.S is not None else 0):
            idx = (self.pos - 1 - k) % self.m
            valid = (k < self.count).to(g.dtype)
            s_k, y_k, rho_k = self.S[idx, rows], self.Y[idx, rows], self.rho[idx, rows] * valid
            a = rho_k * (s_k * q).sum(dim=1)
            q = q - a[:, None] * y_k
            pairs.append((s_k, y_k, rho_k, a))
        d = q * self.h_diag[:, None]
        for s_k, y_k, rho_k, a in reversed(pairs):
            b = rho_k * (y_k * d).sum(dim=1)
            d = d + s_k * (a - b)[:, None]
        return d

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
            self.h_diag = self.h_diag.to(g.dtype)
        else:
            y = g - self.prev_grad
            s = self.d * self.t[:, None]
            ys = (y * s).sum(dim=1)
            ok = (ys > 1e-10) & self.active
            self._remember(s, y, ys, ok)
            yy = (y * y).sum(dim=1)
            self.h_diag = torch.where(ok, ys / yy.clamp_min(1e-30), self.h_diag)
            d = self._direction(g)
            t = torch.full((self.R,), self.lr, device=g.device, dtype=g.dtype)
        self.prev_grad = g
        self.d = d
        self.t = t
        self._add(d * (t * self.active)[:, None])
        return losses
