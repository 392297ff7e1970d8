"""What a federated client computes, written once as pure functions of explicit tensors.

The victim's client (:mod:`gradleak.federated.client`) and the attacker's simulation of that client
(:mod:`gradleak.attacks.simulate`) both call :func:`local_update`, so the attacker models exactly the
computation the protocol defines, and nothing ever mutates the weights the server sent.

Functions here take a module only as a *template* for :func:`torch.func.functional_call`; its own
parameters are never read or written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from ..errors import UserError

ALGORITHMS = ("fedsgd", "fedavg")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Protocol:
    """The federated protocol one client follows in one round.

    ``fedsgd``: the client sends the gradient of the mean cross-entropy on its batch.
    ``fedavg``: the client runs ``local_steps`` SGD steps with ``local_lr`` and sends the weight delta
    ``w_after - w_before``. Mini-batches of ``local_batch_size`` are taken in the batch's order and
    cycled (step t uses mini-batch t mod ceil(B / local_batch_size)); ``None`` means full batch.
    ``sends_buffers``: the client also returns its BatchNorm running statistics after training.
    """

    algorithm: str = "fedsgd"
    local_steps: int = 1
    local_lr: float = 0.0
    local_batch_size: int | None = None
    sends_buffers: bool = False

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"unknown protocol algorithm '{self.algorithm}' (use one of {', '.join(ALGORITHMS)})")
        if self.algorithm == "fedavg":
            if int(self.local_steps) < 1:
                raise UserError(f"fedavg needs local_steps >= 1, got {self.local_steps}")
            if not float(self.local_lr) > 0:
                raise UserError(f"fedavg needs local_lr > 0, got {self.local_lr}")
        if self.local_batch_size is not None and int(self.local_batch_size) < 1:
            raise UserError(f"local_batch_size must be >= 1, got {self.local_batch_size}")

    @property
    def update_is(self) -> str:
        return "gradient" if self.algorithm == "fedsgd" else "weight_delta"

    def header(self, num_images: int) -> dict[str, Any]:
        """The ``protocol`` entry of an Observation."""
        d = asdict(self)
        if self.algorithm == "fedsgd":
            d.update(local_steps=1, local_lr=0.0)
        d["local_batch_size"] = int(self.local_batch_size or num_images)
        d["update_is"] = self.update_is
        d["num_images"] = int(num_images)
        return d

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "Protocol":
        bs = header.get("local_batch_size")
        n = header.get("num_images")
        return cls(algorithm=header["algorithm"], local_steps=int(header.get("local_steps", 1)),
                   local_lr=float(header.get("local_lr", 0.0)),
                   local_batch_size=None if bs is None or bs == n else int(bs),
                   sends_buffers=bool(header.get("sends_buffers", False)))


def split_state(model: nn.Module, state: Tensors) -> tuple[Tensors, Tensors]:
    """Split a ``state_dict``-style mapping into (parameters, buffers) by the model's names."""
    pnames = [n for n, _ in model.named_parameters()]
    params = {n: state[n] for n in pnames}
    buffers = {n: v for n, v in state.items() if n not in params}
    return params, buffers


def mean_cross_entropy(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """The client's loss: mean cross-entropy of ``model`` with ``params``/``buffers`` on (x, y).

    ``y`` may be class indices (N) or soft labels (N x classes) as DLG optimises them.
    """
    logits = functional_call(model, {**params, **buffers}, (x,))
    if y.dtype.is_floating_point:
        return torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, y)


def gradient(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor,
             y: torch.Tensor) -> Tensors:
    """d(mean CE)/d(params). Differentiable with respect to ``x`` under outer transforms or autograd.

    Training-mode BatchNorm updates the running statistics in ``buffers`` in place, as a client's
    forward pass does; pass clones when that must not happen.
    """
    # buffers are an input of the transformed function (not captured), so BN may update them in place
    return grad(lambda p, b: mean_cross_entropy(model, p, b, x, y))(params, buffers)


def minibatches(n: int, batch_size: int | None, steps: int) -> list[slice]:
    """The slices of the client batch used at each local step (in order, cycled)."""
    bs = n if not batch_size else min(int(batch_size), n)
    per_epoch = -(-n // bs)
    return [slice((t % per_epoch) * bs, min(n, (t % per_epoch) * bs + bs)) for t in range(steps)]


def local_update(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor,
                 protocol: Protocol) -> tuple[Tensors, Tensors]:
    """One client's update under ``protocol``, starting from ``params``/``buffers``.

    Returns ``(update, buffers_after)``; ``update`` is keyed by parameter name in the model's order.
    ``params`` and ``buffers`` are never modified (buffers are cloned before the forward passes).
    """
    buffers = {k: v.clone() for k, v in buffers.items()}
    if protocol.algorithm == "fedsgd":
        g = gradient(model, params, buffers, x, y)
        return {n: g[n] for n in params}, buffers
    current = dict(params)
    for sl in minibatches(x.shape[0], protocol.local_batch_size, protocol.local_steps):
        g = gradient(model, current, buffers, x[sl], y[sl])
        current = {n: current[n] - protocol.local_lr * g[n] for n in current}
    return {n: current[n] - params[n] for n in params}, buffers
