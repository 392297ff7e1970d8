"""gradleak's client computation inside a Flower ClientApp.

:func:`train_reply` is the body of a ClientApp's train function: it takes the model the server sent,
computes the update with :func:`gradleak.federated.client.client_update` (the one client code path:
FedSGD gradient or FedAvg weight delta, per-example clipping when the protocol asks for it) and returns
the reply, saying in its ``"gradleak"`` entry what it computed::

    app = ClientApp(mods=[obfuscation_mod(["qsgd:levels=16"])])

    @app.train()
    def train(msg, context):
        images, labels = my_hospital_batch(context)
        return train_reply(msg, build("lenet5", 2, 1, 64), images, labels, Protocol("fedavg", 5, 0.05))
"""

from __future__ import annotations

import torch
from flwr.app import Message
from torch import nn

from ..errors import UserError
from ..federated.client import check_finite, check_sent, client_update
from ..federated.protocol import Protocol
from .records import array_key, reply, to_tensors

REPLIES = ("weights", "update")


def train_reply(msg: Message, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, *,
                send: str = "weights", reveal_labels: bool = False, examples: int | None = None,
                device: str = "cpu") -> Message:
    """The reply of a client that trains ``model`` (an architecture template; its own weights are not
    used) from the weights in ``msg`` on ``images``/``labels`` under ``protocol``.

    ``send="weights"`` (Flower's convention, what its strategies average): the reply holds the weights
    after training, buffers included. ``send="update"``: it holds the update itself (a gradient or a weight
    delta), and the buffers after training go in a second ArrayRecord when the protocol sends them.
    ``reveal_labels``: the protocol shares the batch's labels with the server (written into the
    Observation). ``examples``: the reply's ``num-examples`` (default: the number of images).
    """
    if send not in REPLIES:
        raise UserError(f"train_reply: send must be one of {', '.join(REPLIES)}, got '{send}'")
    if protocol.num_clients_averaged != 1:
        raise UserError("train_reply: a Flower client is one client; its protocol cannot average several "
                        f"(num_clients_averaged={protocol.num_clients_averaged})")
    state = to_tensors(msg.content[array_key(msg.content, "the server's train message")])
    expected = list(model.state_dict())
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}'"
        raise UserError(f"the model the server sent {what}, which does not fit the client's {type(model).__name__}")
    check_sent(state)
    dev = torch.device(device)
    update, buffers = client_update(model.to(dev), {k: v.to(dev) for k, v in state.items()}, images.to(dev),
                                    labels.to(dev), protocol)
    check_finite(update, protocol)  # a diverged client sends nothing: Flower answers the server with the error
    update = {k: v.cpu() for k, v in update.items()}
    buffers = {k: v.cpu() for k, v in buffers.items()}
    info = {"arrays": send, "protocol": protocol.observed(len(images)).header(), "parameters": list(update)}
    if reveal_labels:
        info["labels"] = [int(y) for y in labels]
    count = len(images) if examples is None else int(examples)
    if send == "update":
        return reply(msg, update, count, info, buffers if protocol.sends_buffers else None)
    # in the order the server sent them: Flower's clipping pairs sent and returned arrays by position
    after = {k: state[k] + update[k] if k in update else buffers.get(k, state[k]) for k in state}
    return reply(msg, after, count, info)


__all__ = ["REPLIES", "train_reply"]
