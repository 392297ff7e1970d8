"""What every attack returns, and the iteration/time budget loop they share."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from tqdm import tqdm


@dataclass
class Reconstruction:
    """An attack's output. ``images`` are float32 B x C x H x W in [0, 1] in the original pixel space."""

    images: torch.Tensor
    labels: torch.Tensor
    attack: str
    settings: dict[str, Any]
    threat_model: dict[str, Any]
    loss: float
    iterations: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    #: Whether the matching loss had stopped falling when the budget ended (:func:`loss_converged`);
    #: None when there is too little history to tell.
    converged: bool | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-able description (no tensors): the attack, its threat model and its budget."""
        return {"attack": self.attack, "settings": self.settings, "threat_model": self.threat_model,
                "final_loss": self.loss, "iterations": self.iterations, "seconds": round(self.seconds, 3),
                "seconds_per_iteration": round(self.seconds / self.iterations, 6) if self.iterations else None,
                "converged": self.converged, "label_method": self.threat_model.get("labels"),
                "pipeline": self.extras.get("pipeline")}


def loss_converged(history: list[tuple[int, float]], tail: float = 0.2, rel_tol: float = 0.02,
                   exact: float = 1e-7) -> bool | None:
    """Was the loss still falling when the run ended? ``history`` is (iteration, loss) pairs.

    Converged means: the best loss of the last ``tail`` of the run improved on the best loss before it
    by less than ``rel_tol`` (relative), or the loss fell below ``exact`` times its first value (an
    essentially exact match, whose relative improvements no longer mean anything). None when fewer than
    five losses were recorded.
    """
    pts = [(i, v) for i, v in history if math.isfinite(v)]
    if len(pts) < 5:
        return None
    first, last_it = pts[0][1], pts[-1][0]
    cut = pts[0][0] + (1 - tail) * (last_it - pts[0][0])
    before = min(v for i, v in pts if i <= cut)
    after = min(v for i, v in pts if i > cut) if any(i > cut for i, _ in pts) else before
    if first > 0 and after <= exact * first:
        return True
    if before <= 0:
        return True
    return (before - after) / abs(before) < rel_tol


class Budget:
    """Iterates until ``iterations`` are done or ``time_budget`` seconds have passed, whichever is first.

    :attr:`fraction` is the progress in [0, 1] by whichever limit is nearer, so step schedules (learning
    rate decay) follow the budget that will actually end the run.
    """

    def __init__(self, iterations: int | None, time_budget: float | None, desc: str = "attack",
                 progress: bool = True):
        if iterations is None and time_budget is None:
            raise ValueError("give iterations, a time budget, or both")
        self.iterations = int(iterations) if iterations is not None else None
        self.time_budget = float(time_budget) if time_budget is not None else None
        self.start = time.perf_counter()
        self.done = 0
        self.bar = tqdm(total=self.iterations, desc=desc, unit="it", leave=False, file=sys.stderr,
                        disable=not progress, dynamic_ncols=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def fraction(self) -> float:
        f = 0.0
        if self.iterations:
            f = max(f, self.done / self.iterations)
        if self.time_budget:
            f = max(f, self.elapsed / self.time_budget)
        return min(1.0, f)

    def __iter__(self) -> Iterator[int]:
        while True:
            if self.iterations is not None and self.done >= self.iterations:
                break
            if self.time_budget is not None and self.done > 0 and self.elapsed >= self.time_budget:
                break
            yield self.done
            self.done += 1
            self.bar.update(1)
        self.bar.close()

    def report(self, loss: float) -> None:
        left = []
        if self.iterations and self.done:
            rate = self.done / max(self.elapsed, 1e-9)
            left.append((self.iterations - self.done) / max(rate, 1e-9))
        if self.time_budget:
            left.append(self.time_budget - self.elapsed)
        self.bar.set_postfix(loss=f"{loss:.4g}", left=f"{max(0.0, min(left)):.0f}s" if left else "?",
                             refresh=False)


def step_decay(fraction: float, milestones=(3 / 8, 5 / 8, 7 / 8), gamma: float = 0.1) -> float:
    """Multiplicative learning-rate factor of a multi-step schedule at ``fraction`` of the budget."""
    return gamma ** sum(fraction >= m for m in milestones)


def cosine_annealing(fraction: float, floor: float = 0.0) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))
