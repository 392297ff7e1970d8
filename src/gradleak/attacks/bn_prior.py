"""BatchNorm-statistics prior (GradInversion, Yin et al. 2021; Hatamizadeh et al. 2023).

When a client sends its BatchNorm running statistics back with its update (``protocol.sends_buffers``),
the change of each running mean/variance reveals the mean and variance, over the private batch, of what
entered that BatchNorm layer. The attack then asks its candidate images to produce the same batch
statistics.

Recovery, with BatchNorm's momentum m (PyTorch's convention ``new = (1 - m) old + m batch``) and ``T``
training forward passes: ``batch = (new - (1 - m)^T old) / (1 - (1 - m)^T)``. For FedSGD (T = 1) this
is exact; for FedAvg it assumes the batch statistics changed little over the local steps (they are taken
at the weights the server sent). Running variances use the unbiased estimator, so the batch's biased
variance is ``var * (n - 1) / n`` with n the number of values per channel (batch x height x width).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..observation import Observation
from .simulate import Simulator


def _bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def available(obs: Observation, sim: Simulator) -> bool:
    """Whether the observation carries running statistics the prior can use."""
    return bool(sim.has_bn and obs.buffers)


def batch_statistics(sim: Simulator, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(mean, biased variance, values per channel) of the input of every BatchNorm layer when the sent
    model runs on ``x`` (differentiable in ``x``; works under ``vmap``)."""
    stats: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def hook(module, inputs):
        h = inputs[0]
        dims = [0] + list(range(2, h.dim()))
        n = 1
        for d in dims:
            n *= h.shape[d]
        mean = h.mean(dim=dims)
        stats.append((mean, (h - mean.view(1, -1, *[1] * (h.dim() - 2))).pow(2).mean(dim=dims), n))

    handles = [m.register_forward_pre_hook(hook) for _, m in _bn_modules(sim.model)]
    try:
        functional_call(sim.model, sim.params, (x,))
    finally:
        for h in handles:
            h.remove()
    return stats


class BNPrior:
    """Distance between the candidate batch's BatchNorm input statistics and the recovered ones."""

    def __init__(self, obs: Observation, sim: Simulator):
        if not available(obs, sim):
            raise ValueError("the observation carries no BatchNorm running statistics")
        proto = sim.protocol
        steps = proto.local_steps if proto.algorithm == "fedavg" else 1
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.names: list[str] = []
        for name, m in _bn_modules(sim.model):
            mom = m.momentum
            if mom is None:
                raise ValueError(f"BatchNorm {name} uses a cumulative average; the prior needs a momentum")
            keep = (1 - float(mom)) ** steps
            before_mean = obs.global_state[f"{name}.running_mean"].to(sim.device, torch.float32)
            before_var = obs.global_state[f"{name}.running_var"].to(sim.device, torch.float32)
            after_mean = obs.buffers[f"{name}.running_mean"].to(sim.device, torch.float32)
            after_var = obs.buffers[f"{name}.running_var"].to(sim.device, torch.float32)
            mean = (after_mean - keep * before_mean) / (1 - keep)
            var_unbiased = (after_var - keep * before_var) / (1 - keep)
            self.targets.append((mean, var_unbiased))
            self.names.append(name)
        self.sim = sim

    def recovered(self, n_per_channel: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch means and biased variances, given the number of values per channel of each layer."""
        return [(m, v * (n - 1) / n) for (m, v), n in zip(self.targets, n_per_channel)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        stats = batch_statistics(self.sim, x)
        loss = 0.0
        for (mean, var, _), (tm, tv) in zip(stats, self.recovered([n for _, _, n in stats])):
            loss = loss + (mean - tm).norm() + (var - tv).norm()
        return loss
