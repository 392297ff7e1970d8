"""Inverting Gradients (Geiping et al., NeurIPS 2020).

Cosine gradient matching plus total variation, Adam on the *sign* of the image gradient, a box
constraint to [0, 1], multi-step learning-rate decay at 3/8, 5/8 and 7/8 of the budget, several
restarts optimised as one vmapped problem, and the restart with the lowest matching loss kept.
"""

from __future__ import annotations

from typing import Any

import torch

from ..observation import Observation
from . import labels as label_inference
from .base import Budget, Reconstruction, step_decay
from .objectives import OBJECTIVES
from .regularizers import total_variation
from .simulate import Simulator

DEFAULTS: dict[str, Any] = {
    "iterations": 2000,
    "time_budget": None,
    "restarts": 4,
    "lr": 0.1,
    "tv_weight": 0.01,
    "objective": "cosine",
    "init": "uniform",  # uniform in [0, 1], or 'grey' (0.5 plus small noise)
    "signed_gradients": True,
}


def threat_model(obs: Observation, label_method: str, sim: Simulator, obfuscation_known: bool = False,
                 uses_bn_statistics: bool = False) -> dict[str, Any]:
    return {
        "server": "honest-but-curious; knows the architecture and the weights it sent",
        "protocol": obs.protocol["algorithm"],
        "labels": label_method if label_method != "known" else "known",
        "labels_known": label_method == "known",
        "obfuscation": [o["name"] for o in obs.obfuscation],
        "obfuscation_known": bool(obfuscation_known) if obs.obfuscation else None,
        "bn_statistics": ("used" if uses_bn_statistics else "available, unused") if obs.buffers is not None
        else ("not sent" if sim.has_bn else "no BatchNorm"),
    }


def initial_images(shape, init: str, generator: torch.Generator) -> torch.Tensor:
    if init == "uniform":
        return torch.rand(shape, generator=generator)
    if init == "grey":
        return (0.5 + 0.05 * torch.randn(shape, generator=generator)).clamp(0, 1)
    raise ValueError(f"unknown init {init!r}")


def run(obs: Observation, settings: dict[str, Any], *, device: str = "cpu",
        generator: torch.Generator | None = None, progress: bool = True) -> Reconstruction:
    s = {**DEFAULTS, **settings}
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    sim = Simulator(obs, device)
    y, label_method = label_inference.infer(sim, obs.labels, g)
    y = y.to(sim.device)
    objective = OBJECTIVES[s["objective"]]
    target = sim.target
    R, B = int(s["restarts"]), sim.num_images
    x = initial_images((R, B, *sim.image_shape), s["init"], g).to(sim.device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=float(s["lr"]))
    tv_w = float(s["tv_weight"])

    def per_restart(update, xr):
        return objective(update, target) + tv_w * total_variation(xr)

    budget = Budget(s["iterations"], s["time_budget"], desc="inverting_gradients", progress=progress)
    history: list[tuple[int, float]] = []
    for it in budget:
        for group in opt.param_groups:
            group["lr"] = float(s["lr"]) * step_decay(budget.fraction)
        opt.zero_grad(set_to_none=True)
        losses = sim.batched(per_restart, x, y)
        losses.sum().backward()
        if s["signed_gradients"]:
            x.grad.sign_()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        if it % 10 == 0:
            loss = float(losses.detach().min())
            budget.report(loss)
            history.append((it, loss))

    final = sim.batched(lambda u, xr: objective(u, target), x.detach(), y).detach()
    best = int(final.argmin())
    return Reconstruction(
        images=x.detach()[best].cpu().clamp(0, 1).float(),
        labels=y.cpu(),
        attack="inverting_gradients",
        settings=s,
        threat_model=threat_model(obs, label_method, sim),
        loss=float(final[best]),
        iterations=budget.done,
        seconds=budget.elapsed,
        history=history,
        extras={"restart_losses": [float(v) for v in final], "best_restart": best},
    )
