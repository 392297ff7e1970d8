"""The one optimisation loop every attack is made of, assembled from parts named in its settings.

Parts (each a small module):

- simulation of the client (:mod:`.simulate`; FedAvg unrolled or read as one gradient step, :mod:`.unroll`)
- label inference (:mod:`.labels`: known, iDLG, count-based) or labels optimised jointly (DLG)
- initialisation (:mod:`.initialization`) of the latent the attack optimises
- decoder (:mod:`.decoders`): the latent is the image, or a low-resolution image upsampled (ROG)
- objective (:mod:`.objectives`, obfuscation-aware forms chosen by :mod:`.aware`)
- regularisers (:mod:`.regularizers`: total variation; :mod:`.bn_prior`: BatchNorm statistics)
- optimiser and schedule (Adam, Adam on the gradient's sign, per-restart L-BFGS in :mod:`.optim`;
  step decay or cosine annealing from :mod:`.base`)
- box constraint to [0, 1] (projection after each step)

All restarts run as one batched problem: the latent has a leading restart axis, the client's update is
simulated for every restart in one ``vmap`` call, and the restart with the lowest matching loss is kept.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from ..federated.arithmetic import fedavg_delta_scale
from ..observation import Observation
from . import aware
from . import bn_prior as bn
from . import decoders
from . import labels as label_inference
from .base import Budget, Reconstruction, cosine_annealing, loss_converged, step_decay
from .initialization import INITS, initial
from .optim import BatchedLBFGS
from .regularizers import total_variation
from .simulate import Simulator
from .unroll import assume_fedsgd, in_delta_units

#: The values the settings that name a part may take (the types of all settings: ``gradleak.attacks.TYPES``).
CHOICES: dict[str, tuple[str, ...]] = {
    "labels": ("infer", "joint"),
    "init": INITS,
    "decoder": ("identity", "bicubic"),
    "objective": ("cosine", "l2"),
    "optimizer": ("adam", "signed_adam", "lbfgs"),
    "schedule": ("step", "cosine", "constant"),
    "box": ("clamp", "none"),
}

SCHEDULES = {"step": step_decay, "cosine": cosine_annealing, "constant": lambda f: 1.0}


def halving_rungs(restarts: int) -> list[float]:
    """Budget fractions at which successive halving drops the worse half of the restarts.

    With R restarts there are ceil(log2 R) rungs splitting the first half of the budget equally; the
    last restart has the second half to itself.
    Where an iteration costs in proportion to the live restarts (batched restarts on a CPU), the
    restart-iterations of all stages add up to what one restart would run in the whole budget, and the
    survivor runs at least half of that itself.
    """
    n = math.ceil(math.log2(restarts)) if restarts > 1 else 0
    return [0.5 * (k + 1) / n for k in range(n)]


def _keep_restarts(opt: torch.optim.Optimizer, z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Slice the restart axis of ``z`` and of its Adam state to ``keep``; the optimiser follows the new
    leaf tensor."""
    new = z.detach()[keep].clone().requires_grad_(True)
    state = opt.state.pop(z, {})
    opt.state[new] = {k: (v[keep].clone() if torch.is_tensor(v) and v.dim() and v.shape[0] == z.shape[0] else v)
                      for k, v in state.items()}
    for group in opt.param_groups:
        group["params"] = [new if p is z else p for p in group["params"]]
    return new


def threat_model(obs: Observation, label_method: str, sim: Simulator, obfuscation_known: bool = False,
                 uses_bn_statistics: bool = False, local_steps: str | None = None,
                 objective: str | None = None, matching_info: dict[str, Any] | None = None) -> dict[str, Any]:
    unknown = (matching_info or {}).get("treated_as_unknown")
    known: bool | str | None = bool(obfuscation_known) if obs.obfuscation else None
    if known and unknown:
        known = "partly"
    tm = {
        "server": "honest-but-curious; knows the architecture and the weights it sent",
        "protocol": obs.protocol.algorithm,
        "labels": label_method,
        "labels_known": label_method == "known",
        "obfuscation": [o["name"] for o in obs.obfuscation],
        "obfuscation_known": known,
        "bn_statistics": ("used" if uses_bn_statistics else "available, unused") if obs.buffers is not None
        else ("not sent" if sim.has_bn else "no BatchNorm"),
    }
    if int(obs.protocol.num_clients_averaged) > 1:  # secure aggregation: the server sees only the clients' mean
        tm["clients_averaged"] = int(obs.protocol.num_clients_averaged)
    if local_steps is not None:
        tm["local_steps"] = local_steps
    if objective is not None:
        tm["objective"] = objective
    if known == "partly":
        tm["obfuscation_treated_as_unknown"] = unknown
    return tm


def run(obs: Observation, settings: dict[str, Any], *, attack: str, device: str = "cpu",
        generator: torch.Generator | None = None, progress: bool = True,
        init_images: torch.Tensor | None = None,
        labels: tuple[torch.Tensor, str] | None = None) -> Reconstruction:
    """Optimise ``settings['restarts']`` candidate batches against ``obs``'s update.

    ``settings`` are an attack's complete settings, as :func:`gradleak.attacks.resolve_settings` gives
    them (its preset with the run's overrides, checked); their defaults live only in the presets.

    ``init_images`` (B x C x H x W in [0, 1]) start every restart from those images (e.g. the output of
    a disaggregation) instead of ``settings['init']``; ``labels`` (labels, how they were obtained)
    replace label inference when the observation does not carry labels.
    """
    s = settings
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    sim = Simulator(obs, device)
    observed = sim.target  # in the update's own units (a FedAvg weight delta), as the obfuscation records are
    knows = bool(s["attacker_knows_obfuscation"])
    matching = aware.for_observation(obs, observed, s["objective"], knows, s)
    local_steps = None
    if obs.protocol.algorithm == "fedavg":
        if s["unroll_local_steps"]:
            local_steps = "unrolled"
        else:
            assume_fedsgd(sim)  # simulate one gradient; compare it as the delta it stands for
            local_steps = "read as one gradient step"
            matching = in_delta_units(matching, fedavg_delta_scale(obs.protocol))
    R, B, K = int(s["restarts"]), sim.num_images, sim.num_classes
    decoder = decoders.build(s["decoder"], sim.image_shape, int(s["scale_factor"]))
    if init_images is not None:
        start = init_images.float().reshape(1, B, *sim.image_shape).expand(R, *([-1] * 4))
        if decoder.name != "identity":
            start = torch.nn.functional.interpolate(start.reshape(R * B, *sim.image_shape),
                                                    size=decoder.latent_shape[1:], mode="area")
        z = start.reshape(R, B, *decoder.latent_shape).clone().to(sim.device).requires_grad_(True)
    else:
        z = initial((R, B, *decoder.latent_shape), s["init"], g).to(sim.device).requires_grad_(True)
    params = [z]
    joint = s["labels"] == "joint"
    if joint:
        label_logits = torch.randn(R, B, K, generator=g).to(sim.device).requires_grad_(True)
        params.append(label_logits)
        label_method, y = "joint", None
    elif labels is not None and obs.labels is None:
        y, label_method = labels[0].to(torch.int64).to(sim.device), labels[1]
    else:
        y, label_method = label_inference.infer(sim, obs.labels, g)
        y = y.to(sim.device)
    tv_w = float(s["tv_weight"])
    bn_w = float(s["bn_prior_weight"])
    prior = bn.BNPrior(obs, sim) if bn_w > 0 and bn.available(obs, sim) else None

    def per_restart(update, x):
        m = matching(update)
        total = m
        if tv_w:
            total = total + tv_w * total_variation(x)
        if prior is not None:
            total = total + bn_w * prior(x)
        return total, m

    def evaluate(zz, logits=None):
        x = decoder(zz)
        if joint:
            return sim.batched(per_restart, x, torch.softmax(logits, dim=-1), per_restart_labels=True)
        return sim.batched(per_restart, x, y)

    box = s["box"] == "clamp"
    schedule = SCHEDULES[s["schedule"]]
    lr = float(s["lr"])
    if s["optimizer"] == "lbfgs":
        opt = BatchedLBFGS(params, lr=lr, history_size=int(s["lbfgs_history"]))
    else:
        opt = torch.optim.Adam(params, lr=lr)
    signed = s["optimizer"] == "signed_adam"

    budget = Budget(s["iterations"], s["time_budget"], desc=attack, progress=progress)
    history: list[tuple[int, float]] = []
    initial_losses = None
    # successive halving under a time budget: the worse half of the restarts is dropped at each rung,
    # so the survivor gets most of the budget (Adam-type optimisers; L-BFGS keeps every restart)
    rungs = halving_rungs(R) if s["time_budget"] is not None and s["optimizer"] != "lbfgs" and not joint else []
    dropped: list[float] = []
    for it in budget:
        if it > 0 and rungs and budget.fraction >= rungs[0] and z.shape[0] > 1:  # m: the last step's losses
            rungs.pop(0)
            md = m.detach()
            keep = torch.argsort(torch.where(torch.isfinite(md), md, torch.full_like(md, float("inf"))))
            keep = keep[: max(1, z.shape[0] // 2)]
            kept = set(keep.tolist())
            dropped += [float(v) for i, v in enumerate(md) if i not in kept]
            z = _keep_restarts(opt, z, keep)
            params = [z]
            if initial_losses is not None:
                initial_losses = initial_losses[keep]
        if it == 5 and progress and s["time_budget"] is not None:
            per = budget.elapsed / 5
            print(f"{attack}: {per:.3g} s/iteration with {z.shape[0]} restart(s); at this rate the "
                  f"{float(s['time_budget']):g} s budget buys about {int(float(s['time_budget']) / max(per, 1e-9))} "
                  f"iterations in all (more once restarts are dropped)", file=sys.stderr, flush=True)
        if s["optimizer"] == "lbfgs":
            def closure():
                for p in params:
                    p.grad = None
                total, m = evaluate(*params)
                total.sum().backward()
                closure.match = m.detach()
                return total
            opt.step(closure)
            m = closure.match
        else:
            for group in opt.param_groups:
                group["lr"] = lr * schedule(budget.fraction)
            opt.zero_grad(set_to_none=True)
            total, m = evaluate(*params)
            total.sum().backward()
            for p in params:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
                if signed:
                    p.grad.sign_()
            opt.step()
        if it == 0:  # the loss of the starting point (every step above evaluates before it moves)
            initial_losses = m.detach().clone()
        if box:
            with torch.no_grad():
                z.clamp_(0, 1)
        if it % 10 == 0:
            finite = m.detach()[torch.isfinite(m.detach())]
            loss = float(finite.min()) if finite.numel() else float("nan")
            budget.report(loss)
            history.append((it, loss))

    final = evaluate(z.detach(), label_logits.detach() if joint else None)[1].detach()
    final = torch.where(torch.isfinite(final), final, torch.full_like(final, float("inf")))
    best = int(final.argmin())
    with torch.no_grad():
        images = decoder(z.detach()[best]).clamp(0, 1).float().cpu()
        if joint:
            soft = torch.softmax(label_logits.detach()[best], dim=-1)
            y_out = soft.argmax(dim=-1).cpu()
        else:
            y_out = y.cpu()
    extras: dict[str, Any] = {"restart_losses": [float(v) for v in final], "best_restart": best,
                              "objective": matching.name}
    if initial_losses is not None:
        extras["initial_losses"] = [float(v) for v in initial_losses]
    if dropped:
        extras["halving"] = {"restarts": R, "dropped_losses": dropped}
    if joint:
        extras["soft_labels"] = soft.cpu()
    if decoder.name != "identity":
        extras["latent"] = z.detach()[best].clamp(0, 1).float().cpu()
    return Reconstruction(
        images=images,
        labels=y_out,
        attack=attack,
        settings=s,
        threat_model=threat_model(obs, label_method, sim, obfuscation_known=knows,
                                  uses_bn_statistics=prior is not None, local_steps=local_steps,
                                  objective=matching.name, matching_info=matching.info),
        loss=float(final[best]),
        iterations=budget.done,
        seconds=budget.elapsed,
        history=history,
        extras=extras,
        converged=loss_converged(history),
    )
