"""Calibrating the prior's degradation to the conditions of one observation.

ROG's output looks very different from one defence to the next: without obfuscation or under fine
quantisation it is within a few per cent of the perfect bicubic decoding of its latent, under Gaussian
noise it keeps the structure but loses most of the contrast. A prior trained for one regime hurts in the
other (see docs/prior.md), and the attacker knows which regime it is in: the observation names its
architecture, protocol and obfuscation. So the attacker plays client on a few of its own auxiliary images
under exactly those conditions (the weights it sent, the same protocol and obfuscation), runs ROG on the
updates it made, and fits the degradation model to what came out (:func:`gradleak.prior.calibrate`).

Only auxiliary images are used: the patients given as excluded (the attacked ones) are never captured.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

from ..attacks import run_attack
from ..capture import capture_batch
from ..errors import UserError
from ..metrics.matching import pair_by_mse
from ..observation import Observation
from .. import obfuscation
from ..prior import calibrate, select_images

log = logging.getLogger(__name__)

#: ROG settings of the calibration attacks unless given: short runs, one restart
CALIBRATION_ATTACK: dict[str, Any] = {"iterations": 100, "restarts": 1}


def calibrate_like(obs: Observation, dataset, *, exclude_patients: Iterable[str] = (), images: int = 8,
                   attack_settings: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Degradation settings fitted to ROG outputs for ``images`` auxiliary images of ``dataset`` (one per
    patient, none of ``exclude_patients``), each captured as ``obs`` was: same architecture, weights sent,
    protocol, obfuscation and batch size. Returns ``{"degradation": ..., "calibration": provenance}``."""
    if images < 1:
        raise UserError("calibration needs at least one image")
    batch = obs.num_images
    shape = obs.image_shape
    specs = [obfuscation.spec_of_record(r) for r in obs.obfuscation]
    idx = select_images(list(dataset.patient_ids), exclude_patients, seed=seed)
    first: dict[str, int] = {}
    for i in idx:
        first.setdefault(str(dataset.patient_ids[i]), i)
    # one image per patient, in a seeded order: the data set's own order may put one label first
    firsts = list(first.values())
    perm = torch.randperm(len(firsts), generator=torch.Generator().manual_seed(int(seed))).tolist()
    chosen = [firsts[j] for j in perm][: images * batch]
    if len(chosen) < batch:
        raise UserError(f"calibration: only {len(chosen)} auxiliary patients left, the observation's batch "
                        f"needs {batch}")
    chosen = chosen[: len(chosen) // batch * batch]
    first_shape = tuple(dataset.batch(chosen[:1]).images.shape[1:])
    if first_shape != tuple(shape):
        raise UserError(f"calibration: the auxiliary images are {first_shape}, the observation's are "
                        f"{tuple(shape)}: load the data at the observation's size")
    settings = {**CALIBRATION_ATTACK, **(attack_settings or {})}
    clean, outputs = [], []
    for j in range(0, len(chosen), batch):
        try:
            aux = capture_batch(dataset, indices=chosen[j:j + batch], protocol=obs.protocol, seed=seed + j,
                                arch=obs.model["arch"], num_classes=int(obs.model["num_classes"]),
                                options=obs.model.get("options"), global_state=obs.global_state,
                                labels_known=obs.labels is not None, obfuscations=specs,
                                mean=obs.data.get("mean", (0.5,)), std=obs.data.get("std", (0.5,)))
        except UserError as e:  # e.g. an auxiliary batch on which the client's training diverges
            raise UserError(f"calibration: auxiliary batch {j // batch + 1}: {e}") from None
        images = aux.truth.images
        rec = run_attack("rog", aux.observation, settings, seed=seed + j, progress=False)
        order = pair_by_mse(images, rec.images) if batch > 1 else [0]
        clean.append(images)
        outputs.append(rec.images[order])
        log.info(f"calibration attack {j // batch + 1}/{len(chosen) // batch} done")
    scale = int(rec.settings.get("scale_factor", 4))
    degradation = calibrate(torch.cat(clean), torch.cat(outputs), scale_factor=scale)
    provenance = {"images": len(chosen), "patients": sorted({str(dataset.patient_ids[i]) for i in chosen}),
                  "attack": "rog", "attack_settings": settings, "obfuscation": specs,
                  "protocol": obs.protocol.header(), "arch": obs.model["arch"], "seed": int(seed)}
    return {"degradation": degradation, "calibration": provenance}
