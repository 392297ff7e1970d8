"""``auto``: the strongest pipeline the observation's model allows.

Where the model has a linear layer followed by a ReLU (:func:`.linear_leak.leaky_layer`), the layer's
update is disaggregated into each image's input and each input is inverted to its image. Where the
separation leaves something open (some images only as mixtures) or the update is exact, all images
are then refined jointly by gradient matching (the engine, with the obfuscation-aware objective and the
labels the disaggregation found), starting from the inverted images; the refined batch is kept only
when it matches the update better than the inverted one (the server can check that; it never sees the
truth). Where every image separated from an obfuscated or multi-step update (a sparsified one
included: its unsent columns are left to the inversion's smoothness prior), the inverted batch is the
result: it matches the rank-N denoised inputs, and gradient matching on the whole update would only
fit its noise. Where the model has no
such layer, ``auto`` says so and runs the best optimisation attack for the batch size: Inverting
Gradients for one image, ROG for a batch. Where the layer has few rows per ReLU pattern of the batch
and nothing separated from a one-step update under noise or a quantizer, the images the leak refined on
the layer's update from a blank start compete with that optimisation attack, judged by the layer's
objective (:func:`.linear_leak.layer_fit`).

The mean of several clients' updates, each rounded to its own step as the records give it, is first
split into each client's update (:mod:`.demix`) and each client's batch attacked as above.

Budget: with a ``time_budget`` the disaggregation and inversion get at most ``leak_share`` of it and
the refinement the rest (all of it, less a margin, where nothing is left to refine); without one,
``invert_iterations`` and ``iterations`` bound the two stages.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..observation import Observation
from . import demix, engine
from .aware import _per_tensor, families, obfuscated, steps
from .base import Reconstruction, loss_converged
from .disaggregate import SAMPLE_MAX_RANK
from .linear_leak import layer_fit, leak, local_drift, settled as leak_settled
from ..models import build_from_header, has_batch_norm
from .simulate import Simulator

#: Settings of ``auto`` that are not the refinement engine's.
OWN = ("invert_iterations", "invert_tv", "invert_starts", "leak_share", "fallback_single", "fallback_batch",
       "split_clients", "client_steps")
#: An exact update (no obfuscation) is what its images give: ``auto``'s images, under the labels it read, are
#: judged by how near their simulated update comes to the received one, against a batch of uniform grey images (at
#: this share of the image value range) under the same labels: the update's blind guess, no patient's anatomy in
#: it. Images no nearer than that explain nothing of the update, whatever the stages reported, e.g. a separation of
#: FedAvg local steps that overshoot (real X-rays, 64 px, B = 4, 5 steps of learning rate 0.4, tune batches 0 / 1:
#: relative residual 5.30 / 10.63 at 19.60 / 21.95 dB, grey's 1.00, labels 3 of 4; at the learning rate 0.1 the same
#: batches 0.10 / 0.17 at 47.98 / 46.02 dB, grey's 0.97 / 0.96).
FIT_GREY = 0.5
#: Inverted images that reproduce the update they were read from (:func:`update_fit`'s residual) to this share of
#: its norm leave a refinement nothing to sharpen: it is skipped and the attack ends early (real X-rays, 64 px,
#: B = 4, FedSGD: ``mlp``'s images 100 dB after a 1.3 s leak, then, with a 60 s budget, 58 s of refinement that
#: did not improve the match; with a 30 s budget and the skip, residual 1.1e-6, 1.4 s in all).
FIT_EXACT = 1e-4
#: The engine's settings where it only scores a given batch (every restart would start from the same images and
#: labels, so one is enough; ``auto``'s own preset runs one restart anyway, this holds where ``--restarts`` asks
#: for more).
SCORE_ONLY = {"iterations": 1, "time_budget": None, "restarts": 1}
#: What follows the leak where nothing is left to refine (scoring its batch: one engine iteration, and the rest of
#: the pipeline) costs about this many simulated updates: 4.7 s and 1.0 s against one update's 0.82 s for
#: ``lenet5`` at 128 px, B = 4, FedAvg with 5 local steps (2 cores), and the leak's inversion may run 1 s past its
#: limit there; the leak leaves at least that.
SCORE_UPDATES = 8
#: The most of a time budget the clients' split may take (:func:`.demix.split`; 3.1 s for lenet5 at 64 px
#: under QSGD 16 with 4 clients, about 8 s with the steps read off the mean); past it nothing is split.
SPLIT_SHARE = 0.1


def _in_label_order(images: torch.Tensor, found: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Reorder the separated images so each sits where the known labels put an image of its class (the
    separation returns them in no particular order); unchanged when the class counts differ."""
    if sorted(found.tolist()) != sorted(known.tolist()):
        return images
    out = images.clone()
    for c in torch.unique(known).tolist():
        out[known == c] = images[found == c]
    return out


def run(obs: Observation, settings: dict[str, Any], *, device: str = "cpu",
        generator: torch.Generator | None = None, progress: bool = True,
        fallback_settings=None) -> Reconstruction:
    """``fallback_settings(name)`` -> the resolved settings of the optimisation attack ``name``.

    The mean of several clients' rounded updates is first split into each client's where the attacker
    knows the obfuscation and each client's step is in the records or read off the mean
    (:func:`.demix.split`, settings ``split_clients``, ``client_steps``); each
    client's batch is then attacked as one client's, in an equal share of what is left of the budget."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    why = None
    t0 = time.perf_counter()
    T = None if settings.get("time_budget") is None else float(settings["time_budget"])
    if obs.protocol.num_clients_averaged > 1:
        if not settings.get("split_clients", True):
            why = "split_clients is off"
        elif not settings.get("attacker_knows_obfuscation", True):  # the split reads the clients' records
            why = "the attacker is not told the obfuscation"
        else:  # draws nothing: a seed gives the same stages either way
            clients, what = demix.split(obs, time_limit=None if T is None else SPLIT_SHARE * T,
                                        source=str(settings.get("client_steps", "records")))
            if clients is not None:
                return _per_client(obs, clients, what, settings, device=device, generator=g, progress=progress,
                                   fallback_settings=fallback_settings)
            why = what
    spent = time.perf_counter() - t0  # a split that did not stand took its time from the budget
    rest = settings if T is None or why is None else {**settings, "time_budget": max(0.05 * T, T - spent)}
    rec = _one(obs, rest, device=device, generator=g, progress=progress, fallback_settings=fallback_settings,
               reserve_fit=fit_judged(obs))
    if why is not None:
        rec.extras.setdefault("pipeline", {})["clients_split"] = f"not split: {why}"
        rec.seconds += spent
    t_fit = time.perf_counter()
    fit = update_fit(obs, rec.images, rec.labels, device=device)
    if fit is not None:
        pipeline = rec.extras.setdefault("pipeline", {})
        pipeline["fit"] = fit
        pipeline["note"] = fit_note(pipeline.get("note"), fit)
        rec.seconds += time.perf_counter() - t_fit
    return rec


def fit_note(note: str | None, fit: dict[str, Any]) -> str | None:
    """The pipeline's note, with what :func:`update_fit` found where the images do not fit."""
    if fit["fits"]:
        return note
    what = "the exact update" if fit.get("entries", "all") == "all" else "the entries the client sent"
    return (f"{note or 'auto'}; but its images do not reproduce {what} (relative residual "
            f"{fit['relative_residual']:.3g}, a uniform grey batch's {fit['grey_residual']:.3g}): they show what the "
            f"attack reached, not what the update holds")


def only_sparsified(obs: Observation) -> bool:
    """Whether one client's update was only sparsified (top-k, random-k, pruning, and no other obfuscation): the
    entries it sent are its exact values (random-k's scaled by the factor its records give)."""
    return obs.protocol.num_clients_averaged == 1 and families(obs) == ["sparsify"]


def fit_judged(obs: Observation) -> bool:
    """Whether :func:`update_fit` judges images on ``obs``: an update without obfuscation, or one client's update
    only sparsified (on the entries it sent, :func:`only_sparsified`), whose simulation does not depend on the
    images' order, which the attack does not recover: one client, or several FedSGD clients of a model without
    BatchNorm (the mean of their gradients is the whole batch's, whichever images each held), and under FedAvg,
    local steps on the whole batch (mini-batches would take the images in an order)."""
    p = obs.protocol
    if obfuscated(obs) and not only_sparsified(obs):
        return False
    if p.algorithm == "fedavg" and p.local_batch_size is not None and p.local_batch_size < p.images_per_client:
        return False
    if p.num_clients_averaged == 1:
        return True
    return p.algorithm == "fedsgd" and not has_batch_norm(build_from_header(obs.model, obs.data))


def update_fit(obs: Observation, images: torch.Tensor, labels: torch.Tensor | None, *,
               device: str = "cpu") -> dict[str, Any] | None:
    """How well ``images`` (with ``labels``) explain an exact update: the relative residual
    ``|u(images) - received| / |received|`` over every tensor, ``u`` the client's update as the attacker
    simulates it (FedAvg's local steps unrolled), beside that of a batch of uniform grey images
    (:data:`FIT_GREY`) under the same labels; ``fits`` when below it. Of an update only sparsified, over the
    entries the client sent (exact values; random-k's rescale undone), ``entries`` "sent" (else "all").
    None where it says nothing (:func:`fit_judged`: an otherwise obfuscated update, whose residual holds the
    obfuscation's error, or one whose simulation depends on the images' order) or where there are no labels."""
    residual = _fit_residual(obs, labels if labels is not None else obs.labels, len(images), device=device)
    if residual is None:
        return None
    lo, hi = (float(v) for v in obs.data.get("value_range", (0.0, 1.0)))
    level = lo + FIT_GREY * (hi - lo)
    r, grey = residual(images), residual(torch.full_like(images, level))
    on = ", on the entries the client sent" if obfuscated(obs) else ""
    return {"relative_residual": round(r, 6), "grey_residual": round(grey, 6), "fits": bool(r < grey),
            "entries": "sent" if on else "all",
            "what": "|update of the images, local steps unrolled - update received| / |update received|" + on
                    + f", beside that of uniform grey images ({level:g}) under the same labels"}


def _fit_residual(obs: Observation, labels: torch.Tensor | None, n: int, *, device: str = "cpu",
                  sim: Simulator | None = None):
    """:func:`update_fit`'s relative residual of a batch of ``n`` images under ``labels``, as a function of the
    images (on ``sim``, the observation's simulator, where given); None where it is not judged, where there are
    no labels for ``n`` images, or where random-k's rescale is not known for every tensor."""
    if not fit_judged(obs) or labels is None or len(labels) != n:
        return None
    sim = sim or Simulator(obs, device)
    y = labels.detach().to(sim.device, torch.int64)
    target = {k: t.double() for k, t in sim.target.items()}
    sent = None
    if only_sparsified(obs):  # the sent entries, each tensor's random-k factor undone
        step = steps(obs, sim.target)[0]
        rescale = (step.values or {}).get("rescale")
        if step.ob.name == "randk" and (rescale is None or isinstance(rescale, dict)
                                         and any(k not in rescale for k in target)):
            return None
        sent = {k: t != 0 for k, t in target.items()}
        target = {k: t[sent[k]] / float(_per_tensor(rescale, k) or 1.0) for k, t in target.items()}
    den = sum(float(t.pow(2).sum()) for t in target.values())
    if not den > 0:
        return None

    def residual(x: torch.Tensor) -> float:
        u = sim.update(x.detach().to(sim.device, torch.float32), y)
        u = {k: u[k].detach().double() if sent is None else u[k].detach().double()[sent[k]] for k in target}
        return (sum(float((u[k] - t).pow(2).sum()) for k, t in target.items()) / den) ** 0.5
    return residual


def _per_client(obs: Observation, clients: list[Observation], what: dict[str, Any], settings: dict[str, Any], *,
                device: str, generator: torch.Generator, progress: bool, fallback_settings) -> Reconstruction:
    """Each client's observation attacked as one client's (:func:`_one`) and the batches put back together
    in the clients' order. With a time budget each client has an equal share of what is left; without one,
    each runs the iterations the settings give (K times one client's work). The loss is the mean of the
    clients' objectives."""
    start = time.perf_counter() - float(what["seconds"])
    T = None if settings.get("time_budget") is None else float(settings["time_budget"])
    seeds = torch.randint(0, 2**62, (len(clients),), generator=generator).tolist()
    recs = []
    for i, c in enumerate(clients):
        s = dict(settings)
        if T is not None:  # an equal share of what is left
            s["time_budget"] = max(0.01 * T / len(clients), (T - (time.perf_counter() - start)) / (len(clients) - i))
        recs.append(_one(c, s, device=device, generator=torch.Generator().manual_seed(int(seeds[i])),
                         progress=progress, fallback_settings=fallback_settings))
    first = recs[0]
    pipes = [r.extras.get("pipeline") or {} for r in recs]
    separated = [int(p.get("separated") or 0) for p in pipes]
    layer = pipes[0].get("leaky_layer")
    share = 100 * float(what["entries_read"])
    converged = [r.converged for r in recs]
    threat = dict(first.threat_model)
    told = what.get("steps_read_off") is None
    source = "the records' per-client scales" if told else what["steps"]
    threat["clients_split"] = (f"the mean of {len(clients)} clients' updates split into each client's by "
                               f"their rounding steps ({source}; {share:.2f} % of the entries read)")
    threat["per_client_scales_known"] = told
    threat["clients_averaged"] = len(clients)
    for key in ("labels", "objective", "attack_pipeline"):  # the clients' own, where they differ
        seen = list(dict.fromkeys(str(r.threat_model.get(key)) for r in recs if r.threat_model.get(key) is not None))
        if seen:
            threat[key] = seen[0] if len(seen) == 1 else "; ".join(f"client {i}: {r.threat_model.get(key)}"
                                                                    for i, r in enumerate(recs))
    each = threat.get("attack_pipeline", "auto")
    threat["attack_pipeline"] = f"split into {len(clients)} clients' updates, then per client: {each}"
    noise = [int((p.get("separation") or {}).get("like_noise") or 0) for p in pipes]
    each_client = [{**p, "budget": {"iterations": r.iterations, "seconds": round(r.seconds, 3),
                                    "converged": r.converged}} for p, r in zip(pipes, recs)]
    pipeline = {"leaky_layer": layer, "separated": sum(separated), "images": obs.num_images,
                "clients_split": what, "clients": each_client, "separation": {"like_noise": sum(noise)},
                "stages": ["client split"] + list(pipes[0].get("stages") or []),
                "kept": "; ".join(str(p.get("kept")) for p in pipes),
                "note": f"the mean of {len(clients)} clients' updates split into each client's by their rounding "
                        f"steps ({share:.2f} % of the entries read); per client: "
                        + "; ".join(str(p.get("note")) for p in pipes)}
    extras: dict[str, Any] = {"pipeline": pipeline}
    if all("leak_images" in r.extras for r in recs):
        extras["leak_images"] = torch.cat([r.extras["leak_images"] for r in recs])
    return Reconstruction(
        images=torch.cat([r.images for r in recs]), labels=torch.cat([r.labels for r in recs]), attack=first.attack,
        settings=dict(settings), threat_model=threat, loss=sum(r.loss for r in recs) / len(recs),
        iterations=sum(r.iterations for r in recs), seconds=time.perf_counter() - start, history=[],
        extras=extras,
        converged=(False if any(c is False for c in converged) else None if any(c is None for c in converged)
                   else True))


def _update_seconds(sim: Simulator, obs: Observation) -> float:
    """What one simulated update of the batch takes (uniform grey images, class 0), timed on ``sim``; on a GPU
    after one untimed call and synchronised (its first call also starts the device's libraries)."""
    x = torch.full((obs.num_images, *obs.image_shape), FIT_GREY, device=sim.device)
    y = torch.zeros(obs.num_images, dtype=torch.int64, device=sim.device)
    cuda = sim.device.type == "cuda"
    if cuda:
        sim.update(x, y)
        torch.cuda.synchronize(sim.device)
    t = time.perf_counter()
    sim.update(x, y)
    if cuda:
        torch.cuda.synchronize(sim.device)
    return time.perf_counter() - t


def _one(obs: Observation, settings: dict[str, Any], *, device: str, generator: torch.Generator,
         progress: bool, fallback_settings, reserve_fit: bool = False) -> Reconstruction:
    """``auto`` on one observation as it stands. With a time budget, one simulated update is timed first: the
    leak leaves at least :data:`SCORE_UPDATES` of them for scoring its batch, and with ``reserve_fit`` two more
    come out of the budget for :func:`update_fit` after the attack."""
    s = settings
    g = generator
    # one generator per stage, drawn up front: how many numbers one stage draws (a time-limited search)
    # never changes what the next stage gets, so a seed gives the same stages whatever the timing
    g_leak, g_refine, g_fallback = (torch.Generator().manual_seed(int(x))
                                    for x in torch.randint(0, 2**62, (3,), generator=g))
    start = time.perf_counter()
    T = None if s.get("time_budget") is None else float(s["time_budget"])
    sim = Simulator(obs, device)
    update_seconds = 0.0
    if T is not None:  # what scoring a batch and checking its fit will cost, out of the budget
        update_seconds = _update_seconds(sim, obs)
        if reserve_fit:
            T = max(0.05 * T, T - 2 * update_seconds)
            s = {**s, "time_budget": T}
    why = None
    found = None
    found = leak(obs, sim, generator=g_leak, time_limit=None if T is None else float(s["leak_share"]) * T,
                 invert_iterations=int(s["invert_iterations"]), invert_tv=float(s["invert_tv"]),
                 invert_starts=int(s["invert_starts"]),
                 settled_time_limit=None if T is None else T - max(0.03 * T, SCORE_UPDATES * update_seconds))
    if found is None:
        why = (f"{obs.model['arch']} has no linear layer followed by a ReLU feeding a two-class classifier, "
               f"whose update would leak the batch")
    elif int(found.info.get("separated", 0)) == 0:
        exact = not obfuscated(obs) and not local_drift(obs.protocol)
        reason = found.info.get("note")
        if not reason:
            reason = ("no image read in the time" if exact else "no image fitted the noise" if obfuscated(obs)
                      else "no image fitted the delta: its local steps move the weights between the gradients "
                           "it sums")
            if not exact and obs.num_images > SAMPLE_MAX_RANK:  # a noisy update of a large batch fails for its size
                # as much as for its noise: random row sets rarely hold N - 1 rows where one image is inactive
                reason += (f"; past {SAMPLE_MAX_RANK} images the row sets drawn rarely hold {obs.num_images - 1} "
                           f"rows where one image is inactive")
        why = f"the update of layer '{found.layer}' did not separate into images ({reason})"
    name = s["fallback_single"] if obs.num_images == 1 else s["fallback_batch"]

    def fallback(until: float = 1.0) -> Reconstruction:
        """The optimisation attack, in what is left of ``until`` times the budget."""
        base = dict(fallback_settings(name)) if fallback_settings is not None else {}
        if T is not None:
            base["time_budget"] = max(0.5, until * T - (time.perf_counter() - start))
        return engine.run(obs, base, attack="auto", device=device, generator=g_fallback, progress=progress)

    refine = {k: v for k, v in s.items() if k not in OWN}  # the engine's settings
    blank = None if found is None else found.info.get("layer_refinement", {}).get("from_blank")
    if why is not None and blank is not None and found.labels is not None:
        # nothing separated, but the images refined on the layer's update from a blank start compete with the
        # optimisation attack, judged by that refinement's objective (the server computes both)
        alt = fallback(0.97)  # a margin for judging both
        alt_fit = layer_fit(obs, sim, found.layer, alt.images, alt.labels, noise_share=blank["noise_share"])
        won = blank["objective_after"] < alt_fit
        stages = ["refinement on the leaky layer from a blank start", name]
        pipeline = {"leaky_layer": found.layer, "stages": stages, "separated": 0, "images": obs.num_images,
                    "separation": {k: v for k, v in found.info.items() if k != "inversion_history"},
                    "competitor": {"attack": name, "layer_objective": round(alt_fit, 6),
                                   "blank_layer_objective": blank["objective_after"]}}
        if not won:
            alt.extras["pipeline"] = {**pipeline, "kept": f"{name} (matched the layer's update better)",
                                      "note": f"{why}; the optimisation attack ({name}) matched the layer's "
                                              f"update better than the images refined from a blank start"}
            alt.threat_model["attack_pipeline"] = f"refinement on {found.layer}'s update from a blank start, " \
                                                  f"then {name} (kept)"
            alt.seconds = time.perf_counter() - start
            return alt
        rec = engine.run(obs, {**refine, **SCORE_ONLY}, attack="auto", device=device,
                         generator=g_refine, progress=False, init_images=found.images,
                         labels=(found.labels, found.info["labels"]))  # scores the blank start's batch only
        rec.images = found.images.clamp(0, 1).float()
        rec.loss = float(rec.extras.get("initial_losses", [float("inf")])[rec.extras["best_restart"]])
        rec.iterations = _leak_iterations(found.info) + alt.iterations
        rec.converged = bool(blank.get("converged"))
        rec.extras["pipeline"] = {**pipeline, "kept": "refined from a blank start (matched the layer's update "
                                                      f"better than {name})",
                                  "note": f"{why}; refined on the layer's update from a blank start instead"}
        rec.extras["leak_images"] = found.images
        rec.threat_model["attack_pipeline"] = (f"refinement on {found.layer}'s update from a blank start "
                                               f"(kept over {name})")
        rec.seconds = time.perf_counter() - start
        return rec
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
    # Every image separated from an obfuscated or multi-step update: the inverted batch already matches
    # the rank-N denoised inputs, and gradient matching on the whole update only fits what it cannot
    # model (on real X-rays under QSGD 16, relative noise 0.1 and FedAvg with 5 local steps it cost
    # 2.5-4 dB while lowering the objective; under top-k 1 % 0.9-4.9 dB). The refinement is for what the
    # separation leaves open (images left as mixtures) and for an exact update, where it only sharpens
    # what the inversion found, unless the inverted batch reproduces it already (FIT_EXACT).
    settled = leak_settled(obs, found.info)
    reproduced = None  # every image separated from an exact update: how closely the inverted batch reproduces it
    if not settled and not partial and found.labels is not None:
        residual = _fit_residual(obs, found.labels, len(found.images), sim=sim)
        reproduced = None if residual is None else residual(found.images)
        settled = reproduced is not None and reproduced < FIT_EXACT
    if T is not None:  # with some images left as mixtures, the optimisation attack gets half of what is left
        refine["time_budget"] = max(0.5, (0.5 if partial else 1.0) * (T - (time.perf_counter() - start)))
    labels = None
    if found.labels is not None:
        labels = (found.labels, found.info.get("labels", "disaggregation (sign of each image's output gradient)"))
    start_images = found.images
    if obs.labels is not None and found.labels is not None:  # known labels are in the batch's order
        start_images = _in_label_order(found.images, found.labels, obs.labels)
    if settled:
        refine = {**refine, **SCORE_ONLY}  # scores the inverted batch only
    rec = engine.run(obs, refine, attack="auto", device=device, generator=g_refine,
                     progress=progress and not settled, init_images=start_images, labels=labels)
    initial = rec.extras.get("initial_losses", [float("inf")])[rec.extras["best_restart"]]
    kept = "refined"
    if settled or not rec.loss <= initial:  # keep the inverted batch
        rec.images = start_images.clamp(0, 1).float()
        rec.loss = float(initial)
        kept = "inverted (refinement did not improve the match)"
        if settled:  # the one engine iteration only scored the inverted batch
            rec.iterations = 0
            kept = (("pixels read and filled" if "fill_stop" in found.info else "inverted")
                    + " (every image separated: no refinement)" if reproduced is None else
                    f"inverted (its images reproduce the update to {reproduced:.1e} of it: nothing to refine)")
    info = {k: v for k, v in found.info.items() if k != "inversion_history"}
    on_layer = bool(info.get("layer_refinement", {}).get("kept"))
    from_blank = blank is not None and bool(blank.get("won"))  # the blank start's images, not the inverted ones
    on_layer_stage = ("refinement on the leaky layer from a blank start (kept over the inverted images)"
                      if from_blank else "refinement on the leaky layer")
    # a layer whose inputs are the pixels has nothing to invert: its unsent pixels are filled instead
    inverted_by = "pixel fill" if "fill_stop" in info else "feature inversion"
    rec.extras["pipeline"] = {
        "leaky_layer": found.layer, "separated": int(info.get("separated", 0)), "images": obs.num_images,
        "separation": info, "scale_known": found.scale_known,
        "stages": ["disaggregation", inverted_by] + ([on_layer_stage] if on_layer or from_blank else [])
        + ([] if settled else ["gradient-matching refinement"]),
        "kept": kept, "leak_seconds": round(leak_seconds, 3),
        "note": f"layer '{found.layer}' leaked {int(info.get('separated', 0))} of {obs.num_images} images "
                f"separately" + (f" ({info['like_noise']} of the inputs read as noise, not an image: half their "
                                 f"energy negative)" if info.get("like_noise") else "")
                + (f" ({info['stand_ins']} of them shown by no row of its own: a union with other images' "
                   f"supports stands in, its side left open on theirs)" if info.get("stand_ins") else "")
                + (f" (the supports read from the update's columns, each image's ReLU pattern shown by an input "
                   f"only it has; {100 * info['open']:.0f} % of their entries left open)"
                   if info.get("reading") == "columns" else "")
                + (f" (the supports chosen by a search, not proven best: {info['restarts_at_best']} of "
                   f"{info['restarts']} starts ended on that choice)" if info.get("search") == "swaps" else "")}
    rec.extras["leak_images"] = found.images
    what = {"sign supports": "sign-support disaggregation",
            "nonneg": "non-negative-input disaggregation"}.get(info.get("method"), "linear-layer disaggregation")
    rec.threat_model["attack_pipeline"] = (f"{what} ({found.layer}) + {inverted_by}"
                                           + (f" + refinement on {found.layer}'s update"
                                              + (" from a blank start (kept)" if from_blank else "")
                                              if on_layer or from_blank else "")
                                           + ("" if settled else " + refinement"))
    if partial:  # some inputs are mixtures: the optimisation attack competes, the better match wins
        alt = fallback()
        # both batches scored by the refinement's objective (the fallback's own loss may be another one)
        score = engine.run(obs, {**refine, **SCORE_ONLY}, attack="auto", device=device,
                           generator=g_refine, progress=False, init_images=alt.images,
                           labels=(alt.labels, alt.threat_model.get("labels", "inferred")))
        alt_loss = score.extras["initial_losses"][0]
        rec.extras["pipeline"]["competitor"] = {"attack": name, "loss": alt_loss, "leak_loss": rec.loss}
        if alt_loss < rec.loss:
            alt.extras["pipeline"] = {**rec.extras["pipeline"], "kept": f"{name} (matched the update better "
                                      f"than the partly separated batch)", "stages": rec.extras["pipeline"]["stages"]
                                      + [name]}
            alt.threat_model["attack_pipeline"] = rec.threat_model["attack_pipeline"] + f", then {name} (kept)"
            alt.extras["leak_images"] = found.images
            alt.seconds = time.perf_counter() - start
            alt.iterations += rec.iterations + _leak_iterations(found.info)
            return alt
    rec.seconds = time.perf_counter() - start
    rec.converged = (loss_converged(rec.history) if kept == "refined"
                     else True if reproduced is not None and reproduced < FIT_EXACT  # an essentially exact match
                     else bool(blank["converged"]) if from_blank
                     else found.info.get("inversion_stop") == "converged")
    rec.iterations = rec.iterations + _leak_iterations(found.info)
    return rec


def _leak_iterations(info: dict[str, Any]) -> int:
    """The leak's optimisation iterations: the feature inversion's and the refinements' on the layer."""
    refined = info.get("layer_refinement") or {}
    return (int(info.get("inversion_iterations", 0)) + int(refined.get("iterations", 0))
            + int((refined.get("from_blank") or {}).get("iterations", 0)))
