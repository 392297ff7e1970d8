"""The attacker's model of the client: given candidate images, what update would the client have sent?

Built from an Observation alone (model header, the weights the server sent, the protocol). It runs the
same :func:`gradleak.federated.protocol.local_update` as the victim's client, through
``torch.func.functional_call`` on explicit tensors, so FedAvg's local steps are unrolled from the weights
the server sent. Many candidate batches (restarts) are simulated as one vmapped problem.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

from ..federated.arithmetic import mean_update
from ..federated.protocol import ObservedProtocol, Tensors, client_slices, local_update, split_state
from ..models import build_from_header, has_batch_norm
from ..observation import Observation


class Simulator:
    """Simulates the client's update for candidate images, differentiably.

    BatchNorm layers use batch statistics as a training client does; running statistics are not tracked
    (they do not change a training-mode forward pass, and tracking them would break vmap).
    """

    def __init__(self, obs: Observation, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        template = build_from_header(obs.model, obs.data)
        params, buffers = split_state(template, obs.global_state)
        template.load_state_dict(obs.global_state)
        self.has_bn = has_batch_norm(template)
        self.model = copy.deepcopy(template).to(self.device).train()
        if self.has_bn:
            replace_all_batch_norm_modules_(self.model)
        if self.device.type == "cpu":  # the inversion's direct calls: channels-last convolutions are faster
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params: Tensors = {k: v.detach().to(self.device, torch.float32) for k, v in params.items()}
        self.global_buffers: Tensors = {k: v.detach().to(self.device) for k, v in buffers.items()}
        self.protocol: ObservedProtocol = obs.protocol
        self.target: Tensors = {k: v.detach().to(self.device, torch.float32) for k, v in obs.update.items()}
        self.param_names = list(self.params)
        self.num_images = obs.num_images
        self.image_shape = obs.image_shape
        self.num_classes = int(obs.model["num_classes"])

    def update(self, x: torch.Tensor, y: torch.Tensor) -> Tensors:
        """The update the client would send for one candidate batch ``x`` (B x C x H x W).

        With ``num_clients_averaged`` K > 1 the batch is split into K equal groups in order, each run
        as one client, and the updates are averaged (what the server sees,
        :func:`gradleak.federated.arithmetic.mean_update`).
        """
        k = self.protocol.num_clients_averaged
        if k == 1:
            upd, _ = local_update(self.model, self.params, {}, x, y, self.protocol)
            return upd
        parts = [local_update(self.model, self.params, {}, x[sl], y[sl], self.protocol)[0]
                 for sl in client_slices(x.shape[0], k)]
        return mean_update(parts)

    def batched(self, fn, xs: torch.Tensor, y: torch.Tensor, per_restart_labels: bool = False) -> torch.Tensor:
        """``fn(update, x)`` -> scalar for each restart in ``xs`` (R x B x C x H x W), as one vmapped call.

        ``y`` is shared by all restarts, or has a leading restart axis when ``per_restart_labels``.
        """
        if per_restart_labels:
            return vmap(lambda x, yy: fn(self.update(x, yy), x))(xs, y)
        return vmap(lambda x: fn(self.update(x, y), x))(xs)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.params, (x,))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Features entering the last layer (label inference uses their scale)."""
        return functional_call(_Penultimate(self.model), {f"net.{k}": v for k, v in self.params.items()}, (x,))


class _Penultimate(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.penultimate(x)
