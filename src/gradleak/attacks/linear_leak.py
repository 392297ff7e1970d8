"""Whole-batch leakage through a linear layer: disaggregate its update, then invert each image's input.

A victim network that declares ``leaky_linear`` (the name of a ``Linear`` layer whose output goes
through a ReLU), ``leaky_input(x)`` (normalised images -> that layer's input) and ``after_leaky(z)``
(that layer's pre-activation output -> logits) leaks every image of a batch:

1. the observed weight update of the layer is split into per-image inputs (:mod:`.disaggregate`); a
   FedAvg weight delta is read as ``-delta / (lr * steps)``, a sparsified update is completed to rank N
   on its sent entries first;
2. sign, scale and label of each image follow from what the server knows: for a layer feeding a
   two-class classifier (``leaky_feeds_classifier``) the subset-sum structure gives ``a_i h_i / N``
   exactly, the features are non-negative (post-ReLU) so the sign of ``a_i = p_i - y_i`` gives the
   label, and ``|a_i|`` solves ``a = softmax(head(h / a))_1 - y``;
3. each recovered input is inverted to its image through the layers before it (a batched problem:
   Adam on the pixels in [0, 1]).

Models without such a layer (global-pooling CNNs, ResNets), and classifiers of more than two classes,
are left to optimisation (:func:`leak` returns None).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..observation import Observation
from .disaggregate import Separation, complete, separate
from .simulate import Simulator

SPARSIFIERS = ("topk", "randk", "prune")


@dataclass
class Leak:
    """What the layer gave away: per-image inputs (``features``; None where not separated), labels,
    the images inverted from them, and how."""

    layer: str
    images: torch.Tensor
    labels: torch.Tensor | None
    features: torch.Tensor
    scale_known: bool
    info: dict[str, Any] = field(default_factory=dict)


def leaky_layer(sim: Simulator) -> str | None:
    """The name of the model's leaky linear layer, or None when the architecture has none."""
    name = getattr(sim.model, "leaky_linear", None)
    if not name or f"{name}.weight" not in sim.target:
        return None
    return name


def observed_matrix(obs: Observation, sim: Simulator, layer: str, rank: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
    """The layer's weight update as a mean gradient (m x n), completed where it was sparsified."""
    G = sim.target[f"{layer}.weight"].double().cpu()
    info: dict[str, Any] = {}
    p = sim.protocol
    if p.algorithm == "fedavg":
        G = G * (-1.0 / (float(p.local_lr) * int(p.local_steps)))
        info["fedavg"] = "delta read as -delta / (lr * steps)"
    names = [r.get("name") for r in obs.obfuscation]
    if any(n in SPARSIFIERS for n in names):
        observed = G != 0
        bound = None
        sent = G.abs()[observed]
        if "randk" in names:
            rec = next(r for r in obs.obfuscation if r.get("name") == "randk")
            res = rec.get("rescale")
            res = res.get(f"{layer}.weight") if isinstance(res, dict) else res
            if res:
                G = G / float(res)
        elif sent.numel():
            bound = float(G.abs()[observed].min())
        G = complete(G, observed, rank, bound=bound, generator=generator)
        info["completed"] = f"rank-{rank} completion from {float(observed.double().mean()):.1%} sent entries"
    return G, info


def _fix_subset(sim: Simulator, layer: str, sep: Separation, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels from subset-sum rows ``a_i h_i / n`` (two classes, non-negative inputs)."""
    lin = getattr(sim.model, layer)
    W = lin.weight.detach().double().cpu()
    b = None if lin.bias is None else lin.bias.detach().double().cpu()
    feats, labels = [], []
    grid = torch.logspace(-6, 0, 3000, dtype=torch.float64)
    for x in sep.X:
        g = x * n  # = a h
        a_sign = 1.0 if float(g.sum()) >= 0 else -1.0
        y = 0 if a_sign > 0 else 1
        Wg = W @ g

        def residual(a: torch.Tensor) -> torch.Tensor:
            z = Wg[None, :] / a[:, None]
            if b is not None:
                z = z + b
            with torch.no_grad():
                logits = sim.model.after_leaky(z.float().to(sim.device)).double().cpu()
            p1 = torch.softmax(logits, dim=-1)[:, 1]
            return (1 - (p1 - y) / a).abs()  # relative: a -> 0 with p1 -> y is no solution

        a = a_sign * grid  # candidate a in (0, 1] or [-1, 0): a coarse grid, then a fine one around the best
        k = int(residual(a).argmin())
        fine = torch.linspace(float(a[max(k - 1, 0)]), float(a[min(k + 1, len(a) - 1)]), 2001, dtype=torch.float64)
        best = float(fine[int(residual(fine).argmin())])
        feats.append(g / best)
        labels.append(y)
    return torch.stack(feats), torch.tensor(labels, dtype=torch.int64)


def invert_features(sim: Simulator, targets: torch.Tensor, *, scale_known: bool, iterations: int,
                    time_limit: float | None = None, chunk: int = 20
                    ) -> tuple[torch.Tensor, list[tuple[int, float]]]:
    """Images in [0, 1] whose inputs to the leaky layer match ``targets`` (N x n): relative squared
    error when the scale is known, else one minus cosine. One batched L-BFGS problem (strong Wolfe line
    search) for all images, projected on [0, 1] every ``chunk`` iterations; stops after ``iterations``
    or ``time_limit`` seconds. Returns the images and (iteration, mean loss per image) pairs."""
    model = sim.model
    C, H, W = sim.image_shape
    t = targets.float().to(sim.device)
    tn = t.pow(2).sum(dim=1).clamp_min(1e-30)
    x = torch.full((t.shape[0], C, H, W), 0.5, device=sim.device, requires_grad=True)
    start = time.perf_counter()
    history: list[tuple[int, float]] = []
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # the weights are the server's, fixed: no weight gradients
        p.requires_grad_(False)

    def objective() -> torch.Tensor:
        h = model.leaky_input((x - model.input_mean) / model.input_std)
        if scale_known:
            return ((h - t).pow(2).sum(dim=1) / tn).sum()
        return (1 - F.cosine_similarity(h, t, dim=1)).sum()

    try:
        done = 0
        while done < int(iterations):
            if time_limit is not None and done > 0 and time.perf_counter() - start > time_limit:
                break
            steps = min(chunk, int(iterations) - done)
            opt = torch.optim.LBFGS([x], lr=1, max_iter=steps, history_size=50, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-12, tolerance_change=1e-15)

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = objective()
                loss.backward()
                return loss

            opt.step(closure)
            done += steps
            with torch.no_grad():
                x.clamp_(0, 1)
                history.append((done, float(objective()) / t.shape[0]))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return x.detach().cpu(), history


def leak(obs: Observation, sim: Simulator, *, generator: torch.Generator, time_limit: float | None = None,
         invert_iterations: int = 400) -> Leak | None:
    """Disaggregate and invert; None when the model has no leaky linear layer."""
    layer = leaky_layer(sim)
    if layer is None or not (sim.num_classes == 2 and bool(getattr(sim.model, "leaky_feeds_classifier", False))):
        return None
    start = time.perf_counter()
    n = sim.num_images
    G, info = observed_matrix(obs, sim, layer, n, generator)
    w2 = sim.model.classifier.weight.detach().double().cpu()
    v = w2[1] - w2[0]
    share = None if time_limit is None else 0.35 * time_limit
    sep = separate(G, n, row_scale=v, generator=generator, time_limit=share)
    info.update(sep.info)
    info["separation_seconds"] = info.pop("seconds")
    feats, labels = _fix_subset(sim, layer, sep, n)
    scale_known = True
    left = None if time_limit is None else max(1.0, time_limit - (time.perf_counter() - start))
    images, history = invert_features(sim, feats, scale_known=scale_known, iterations=invert_iterations,
                                      time_limit=left)
    info["inversion_iterations"] = history[-1][0] if history else 0
    info["seconds"] = round(time.perf_counter() - start, 3)
    return Leak(layer=layer, images=images, labels=labels, features=feats, scale_known=scale_known,
                info={**info, "inversion_history": history})
