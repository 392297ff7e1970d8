"""Label inference from the last layer's update (iDLG for one image, count-based for a batch)."""

from __future__ import annotations

import torch

from ..federated.arithmetic import fedavg_gradient_scale
from .simulate import Simulator


def last_layer_gradient(sim: Simulator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The observed last-layer weight (and bias) gradient, sign-corrected for FedAvg weight deltas.

    A FedAvg delta is ``-lr * sum of gradients`` over the local steps, so ``-delta / (lr * steps)``
    (:func:`gradleak.federated.arithmetic.fedavg_gradient_scale`) approximates the mean gradient the labels
    are read from.
    """
    w = sim.target["classifier.weight"]
    b = sim.target.get("classifier.bias")
    if sim.protocol.algorithm == "fedavg":
        scale = fedavg_gradient_scale(sim.protocol)
        w = w * scale
        b = None if b is None else b * scale
    return w, b


def idlg(sim: Simulator) -> torch.Tensor:
    """iDLG (Zhao et al. 2020) for one image.

    With cross-entropy, the last layer's bias gradient is ``p - onehot(y)``: negative only at the true
    label. Without a bias, the weight row of the true label is ``(p_y - 1) * h`` with non-negative
    features h (ReLU or sigmoid), so its sum is the only negative one.
    """
    w, b = last_layer_gradient(sim)
    score = b if b is not None else w.sum(dim=1)
    return score.argmin().view(1)


def count_based(sim: Simulator, generator: torch.Generator | None = None, dummy_images: int = 32
                ) -> torch.Tensor:
    """Batch label counts from the last layer's gradient (in the spirit of Geng et al. 2021).

    For mean cross-entropy the summed weight row of class c is ``(1/B) sum_i (p_ic - y_ic) s_i`` with
    ``s_i`` the sum of image i's penultimate features; with a bias, its gradient is
    ``(1/B) sum_i (p_ic - y_ic)`` exactly. Approximating p_ic and s_i by their means over dummy images
    (smooth random images in [0, 1] put through the sent model) gives
    ``n_c = B * (mean p_c - g_c / mean s)``, rounded to counts summing to B (largest remainders).
    Returns labels sorted by class (the order within a batch cannot be recovered from this layer).
    """
    B = sim.num_images
    w, b = last_layer_gradient(sim)
    C, H, W = sim.image_shape
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    low = torch.rand(dummy_images, C, max(2, H // 8), max(2, W // 8), generator=g)
    dummy = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    with torch.no_grad():
        dummy = dummy.to(sim.device)
        p = torch.softmax(sim.logits(dummy), dim=-1).mean(0)
        s = sim.penultimate(dummy).sum(dim=1).mean()
    if b is not None:
        est = B * (p - b)
    else:
        est = B * (p - w.sum(dim=1) / s.clamp_min(1e-12))
    est = est.clamp_min(0).double()
    if float(est.sum()) <= 0:
        est = torch.ones_like(est)
    est = est * (B / est.sum())
    counts = est.floor().long()
    remainder = est - counts.double()
    for c in torch.argsort(remainder, descending=True)[: B - int(counts.sum())]:
        counts[c] += 1
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def infer(sim: Simulator, known: torch.Tensor | None, generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, str]:
    """Labels for the attack and how they were obtained: ``known``, ``idlg`` or ``count``."""
    if known is not None:
        return known.to(torch.int64), "known"
    if sim.num_images == 1:
        return idlg(sim), "idlg"
    return count_based(sim, generator), "count"
