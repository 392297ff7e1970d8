"""The victim's client: turn a batch of private images into the update it sends to the server."""

from __future__ import annotations

import torch
from torch import nn

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
