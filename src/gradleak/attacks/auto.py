"""``auto``: the strongest pipeline the observation's model allows.

Where the model has a linear layer followed by a ReLU (:func:`.linear_leak.leaky_layer`), the layer's
update is disaggregated into each image's input, each input is inverted to its image, and all images
are then refined jointly by gradient matching (the engine, with the obfuscation-aware objective and the
labels the disaggregation found), starting from the inverted images. The refined batch is kept only
when it matches the update better than the inverted one (the server can check that; it never sees the
truth). Where the model has no such layer, ``auto`` says so and runs the best optimisation attack for
the batch size: Inverting Gradients for one image, ROG for a batch.

Budget: with a ``time_budget`` the disaggregation and inversion get at most ``leak_share`` of it and
the refinement the rest; without one, ``invert_iterations`` and ``iterations`` bound the two stages.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..observation import Observation
from . import engine
from .base import Reconstruction, loss_converged
from .linear_leak import leak
from .simulate import Simulator

DEFAULTS: dict[str, Any] = {
    **engine.COMMON,
    "restarts": 1,
    "objective": "l2",
    "optimizer": "adam",
    "schedule": "cosine",
    "lr": 0.01,
    "tv_weight": 0.0,
    "iterations": 500,
    "invert_iterations": 5000,
    "leak_share": 0.75,
    "fallback_single": "inverting_gradients",
    "fallback_batch": "rog",
}

#: Settings of ``auto`` that are not the refinement engine's.
OWN = ("invert_iterations", "leak_share", "fallback_single", "fallback_batch")


def run(obs: Observation, settings: dict[str, Any], *, device: str = "cpu",
        generator: torch.Generator | None = None, progress: bool = True,
        fallback_settings=None) -> Reconstruction:
    """``fallback_settings(name)`` -> the resolved settings of the optimisation attack ``name``."""
    s = {**DEFAULTS, **settings}
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    start = time.perf_counter()
    T = None if s.get("time_budget") is None else float(s["time_budget"])
    sim = Simulator(obs, device)
    why = None
    found = None
    if any(r.get("name") == "sign" for r in obs.obfuscation):
        why = "signSGD leaves no magnitudes, and the subset-sum structure of the layer needs them"
    else:
        found = leak(obs, sim, generator=g, time_limit=None if T is None else float(s["leak_share"]) * T,
                     invert_iterations=int(s["invert_iterations"]))
        if found is None:
            why = (f"{obs.model['arch']} has no linear layer followed by a ReLU feeding a two-class classifier, "
                   f"whose update would leak the batch")
        elif int(found.info.get("separated", 0)) == 0:
            why = f"the update of layer '{found.layer}' did not separate into images (too degraded)"
    budget = {"iterations": s["iterations"], "time_budget": s["time_budget"]}
    name = s["fallback_single"] if obs.num_images == 1 else s["fallback_batch"]

    def fallback(share: float = 1.0) -> Reconstruction:
        base = fallback_settings(name) if fallback_settings is not None else {}
        b = dict(budget)
        if T is not None:
            b["time_budget"] = max(1.0, share * (T - (time.perf_counter() - start)))
        return engine.run(obs, {**base, **b}, attack="auto", device=device, generator=g, progress=progress)

    if why is not None:
        rec = fallback()
        rec.extras["pipeline"] = {"leaky_layer": None if found is None else found.layer, "stages": [name],
                                  "separated": 0, "images": obs.num_images,
                                  "note": f"{why}; fell back to optimisation ({name})"}
        rec.threat_model["attack_pipeline"] = f"optimisation only ({name})"
        rec.seconds = time.perf_counter() - start
        return rec
    leak_seconds = time.perf_counter() - start
    partial = int(found.info.get("separated", 0)) < obs.num_images
    refine = {k: v for k, v in s.items() if k not in OWN}
    if T is not None:  # with some images left as mixtures, the optimisation attack gets half of what is left
        refine["time_budget"] = max(1.0, (0.5 if partial else 1.0) * (T - leak_seconds))
    labels = None
    if found.labels is not None:
        labels = (found.labels, "disaggregation (sign of each image's output gradient)")
    rec = engine.run(obs, refine, attack="auto", device=device, generator=g, progress=progress,
                     init_images=found.images, labels=labels)
    initial = rec.extras.get("initial_losses", [float("inf")])[rec.extras["best_restart"]]
    kept = "refined"
    if not rec.loss <= initial:  # refinement made the match worse: keep the inverted batch
        rec.images = found.images.clamp(0, 1).float()
        rec.loss = float(initial)
        kept = "inverted (refinement did not improve the match)"
    info = {k: v for k, v in found.info.items() if k != "inversion_history"}
    rec.extras["pipeline"] = {
        "leaky_layer": found.layer, "separated": int(info.get("separated", 0)), "images": obs.num_images,
        "separation": info, "scale_known": found.scale_known, "stages": ["disaggregation", "feature inversion",
                                                                        "gradient-matching refinement"],
        "kept": kept, "leak_seconds": round(leak_seconds, 3),
        "note": f"layer '{found.layer}' leaked {int(info.get('separated', 0))} of {obs.num_images} images "
                f"separately"}
    rec.extras["leak_images"] = found.images
    rec.threat_model["attack_pipeline"] = (f"linear-layer disaggregation ({found.layer}) + feature inversion "
                                           f"+ refinement")
    if partial:  # some inputs are mixtures: the optimisation attack competes, the better match wins
        alt = fallback()
        rec.extras["pipeline"]["competitor"] = {"attack": name, "loss": alt.loss, "leak_loss": rec.loss}
        if alt.loss < rec.loss:
            alt.extras["pipeline"] = {**rec.extras["pipeline"], "kept": f"{name} (matched the update better "
                                      f"than the partly separated batch)", "stages": rec.extras["pipeline"]["stages"]
                                      + [name]}
            alt.threat_model["attack_pipeline"] = rec.threat_model["attack_pipeline"] + f", then {name} (kept)"
            alt.extras["leak_images"] = found.images
            alt.seconds = time.perf_counter() - start
            alt.iterations += rec.iterations + int(found.info.get("inversion_iterations", 0))
            return alt
    rec.seconds = time.perf_counter() - start
    inv_hist = found.info.get("inversion_history") or []
    rec.converged = loss_converged(rec.history) if kept == "refined" else loss_converged(inv_hist)
    rec.iterations = rec.iterations + int(found.info.get("inversion_iterations", 0))
    return rec
