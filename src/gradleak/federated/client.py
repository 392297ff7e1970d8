"""The victim's client: turn a batch of private images into the update it sends to the server."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .protocol import Protocol, Tensors, local_update, split_state


def client_update(model: nn.Module, global_state: Tensors, images: torch.Tensor, labels: torch.Tensor,
                  protocol: Protocol) -> tuple[Tensors, Tensors]:
    """Compute the update an honest client sends for ``images``/``labels``.

    ``global_state`` is the ``state_dict()`` the server sent; it is not modified (tensors are detached
    and buffers cloned). ``model`` is only an architecture template (its own weights are ignored); it is
    run in training mode, as a client trains. Returns ``(update, buffers_after)``.
    """
    model.train()
    state = {k: v.detach() for k, v in global_state.items()}
    params, buffers = split_state(model, state)
    update, buffers_after = local_update(model, params, buffers, images, labels, protocol)
    return ({k: v.detach().clone() for k, v in update.items()},
            {k: v.detach().clone() for k, v in buffers_after.items()})


def nonfinite(tensors: Tensors) -> str | None:
    """The name of the first floating-point tensor with NaN or Inf entries, or None."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def check_sent(state: Tensors) -> None:
    """The model the server sent, refused where it has NaN or Inf entries (no client trains from it)."""
    bad = nonfinite(state)
    if bad is not None:
        raise UserError(f"the model the server sent has NaN or Inf entries in '{bad}'")


def check_finite(update: Tensors, protocol: Protocol, who: str = "the client's") -> None:
    """A client's update with NaN or Inf entries is no update a server receives: its training diverged (or,
    under FedSGD, its loss or gradient overflowed). A one-line :class:`UserError` that says so and what to
    change; ``who`` names the client ("client 2 of 4's")."""
    bad = nonfinite(update)
    if bad is None:
        return
    why = (f"its local training diverged ({protocol.local_steps} steps of learning rate {protocol.local_lr:g}: "
           f"lower the local learning rate)" if protocol.algorithm == "fedavg"
           else "its loss or gradient overflowed (the model's weights or the images too large)")
    raise UserError(f"{who} update of '{bad}' has NaN or Inf entries: {why}")
