"""The server's arithmetic on client updates, written once.

* :func:`mean_update`: the mean of several clients' updates, as the server forms it. One precision
  everywhere: the sum is accumulated in float64 and the result has the updates' own dtype. Weights
  (the clients' image counts) make it the sample-weighted mean of FedAvg; without weights every client
  counts the same (K clients under secure aggregation, or the attacker's simulation of them).
* :func:`mean_buffers`: the same mean for BatchNorm running statistics; integer counters are rounded.
* :func:`fedavg_gradient_scale` and :func:`fedavg_delta_scale`: a FedAvg weight delta after ``s`` SGD
  steps of learning rate ``lr`` is about ``-lr * s`` times the mean gradient, so
  ``delta * fedavg_gradient_scale(p)`` reads it as one mean gradient and ``gradient * fedavg_delta_scale(p)``
  as a delta. Both are 1 for FedSGD, whose update already is the gradient.

All functions only use differentiable tensor operations, so the attacker's simulation can call
:func:`mean_update` inside ``torch.func.vmap`` and autograd.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensors = dict[str, torch.Tensor]


def mean_update(updates: Sequence[Tensors], weights: Sequence[float] | None = None) -> Tensors:
    """``sum_k w_k u_k / sum_k w_k`` for every tensor name (``w_k = 1`` without ``weights``).

    Accumulated in float64; each result has the dtype of the first update's tensor of that name.
    """
    if not updates:
        raise ValueError("no updates to average")
    if weights is None:
        weights = [1.0] * len(updates)
    if len(weights) != len(updates):
        raise ValueError(f"{len(weights)} weights for {len(updates)} updates")
    total = float(sum(float(w) for w in weights))
    if not total > 0:
        raise ValueError("the weights of the updates must sum to a positive number")
    out = {}
    for name, first in updates[0].items():
        acc = sum(float(w) * u[name].to(torch.float64) for u, w in zip(updates, weights))
        out[name] = (acc / total).to(first.dtype)
    return out


def mean_buffers(buffers: Sequence[Tensors], weights: Sequence[float] | None = None) -> Tensors:
    """:func:`mean_update` of the clients' buffers; integer buffers (BatchNorm's step counter) are rounded."""
    avg = mean_update([{k: v.to(torch.float64) for k, v in b.items()} for b in buffers], weights)
    first = buffers[0]
    return {k: (v if first[k].is_floating_point() else v.round()).to(first[k].dtype) for k, v in avg.items()}


def fedavg_gradient_scale(protocol) -> float:
    """The factor that reads a FedAvg weight delta as one mean gradient: ``-1 / (local_lr * local_steps)``;
    1 for FedSGD. ``protocol`` is a :class:`~gradleak.federated.protocol.Protocol` (or an observed one)."""
    if protocol.algorithm != "fedavg":
        return 1.0
    return -1.0 / (float(protocol.local_lr) * int(protocol.local_steps))


def fedavg_delta_scale(protocol) -> float:
    """The inverse of :func:`fedavg_gradient_scale`: ``-local_lr * local_steps`` reads a mean gradient as the
    weight delta of FedAvg's local steps; 1 for FedSGD."""
    if protocol.algorithm != "fedavg":
        return 1.0
    return -float(protocol.local_lr) * int(protocol.local_steps)


__all__ = ["fedavg_delta_scale", "fedavg_gradient_scale", "mean_buffers", "mean_update"]
