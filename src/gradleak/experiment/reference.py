"""What the attacker holds besides the update: auxiliary images (for the blind baseline) and an identified
gallery (for patient re-identification), both drawn from a data set of the attacked kind.

The auxiliary images never include an attacked patient (the attacker's public data). The gallery is the
hospital archive of the re-identification threat: every image of the attacked patients (their *other*
images are what leave-the-image-out re-identification searches) plus a seeded sample of other patients.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from ..capture import Truth
from ..data import SOURCES, ImageDataset, load_dataset
from ..errors import UserError
from ..metrics.baseline import blind_guesses
from ..metrics.reid import Gallery, reidentify

log = logging.getLogger(__name__)

#: Auxiliary images the blind baseline averages (a seeded sample of the non-attacked patients' images).
AUX_IMAGES = 256
#: Images of the identified gallery (the attacked patients' images always among them).
GALLERY_IMAGES = 256
#: Rankings used by ``gradleak run`` and ``gradleak attack --truth`` (sweeps add a learned embedding).
DISTANCES = ("mse", "ssim")


def data_spec(description: dict[str, Any] | None) -> dict[str, Any] | None:
    """A data spec that reloads the data set an observation or truth file describes (``ds.describe()``),
    or None when the description does not say enough."""
    if not isinstance(description, dict) or description.get("source") not in SOURCES:
        return None
    src = str(description["source"])
    opts = SOURCES[src][1]
    spec = {"source": src, **{k: description[k] for k in opts if description.get(k) is not None}}
    if "path" in opts and not spec.get("path"):
        return None
    return spec


def _sample(candidates: Sequence[int], limit: int, seed: int) -> list[int]:
    cand = [int(i) for i in candidates]
    if len(cand) <= limit:
        return cand
    rng = np.random.default_rng(int(seed))
    return sorted(int(cand[i]) for i in rng.choice(len(cand), size=int(limit), replace=False))


def auxiliary_images(ds: ImageDataset, exclude_patients: Sequence[str], *, limit: int = AUX_IMAGES,
                     seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
    """A seeded sample of at most ``limit`` images of ``ds`` from patients not in ``exclude_patients``."""
    excluded = {str(p) for p in exclude_patients}
    cand = [i for i, p in enumerate(ds.patient_ids) if str(p) not in excluded]
    if not cand:
        raise UserError("the auxiliary data hold no image of a patient who was not attacked")
    idx = _sample(cand, limit, seed)
    images = ds.load(idx)
    desc = {"data": ds.describe().get("source"), "images": len(idx),
            "patients": len({ds.patient_ids[i] for i in idx}), "excluded_patients": len(excluded),
            "seed": int(seed)}
    return images, desc


def blind_baseline(ds: ImageDataset, truth: Truth, *, limit: int = AUX_IMAGES, seed: int = 0
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The blind guesses from ``ds`` with the attacked patients excluded, and where they came from."""
    aux, desc = auxiliary_images(ds, truth.patient_ids, limit=limit, seed=seed)
    if tuple(aux.shape[1:]) != tuple(truth.images.shape[1:]):
        raise UserError(f"the auxiliary images are {tuple(aux.shape[1:])} but the attacked images "
                        f"{tuple(truth.images.shape[1:])} (give the reference data the same size)")
    return blind_guesses(aux), desc


def _same_images(ds: ImageDataset, truth: Truth) -> bool:
    """Whether ``truth``'s indices point at its own images in ``ds`` (the attacked data set itself)."""
    if not truth.indices or len(truth.indices) != len(truth.images):
        return False
    if any(not 0 <= int(i) < len(ds) for i in truth.indices):
        return False
    if [str(ds.patient_ids[int(i)]) for i in truth.indices] != [str(p) for p in truth.patient_ids]:
        return False
    return bool(torch.allclose(ds.load(truth.indices), truth.images.float(), atol=1e-4))


def gallery_for(ds: ImageDataset, truth: Truth, *, size: int = GALLERY_IMAGES, seed: int = 0) -> Gallery:
    """The identified gallery: every image of the attacked patients, filled up to ``size`` with a seeded
    sample of other images. When ``ds`` is not the data set the truth was drawn from, the attacked images
    join the gallery under their own patient ids."""
    attacked = {str(p) for p in truth.patient_ids}
    own = [i for i, p in enumerate(ds.patient_ids) if str(p) in attacked]
    same = _same_images(ds, truth)
    rest = [i for i, p in enumerate(ds.patient_ids) if str(p) not in attacked]
    idx = sorted(set(own) | set(_sample(rest, max(0, int(size) - len(own)), seed)))
    b = ds.batch(idx)
    gallery = Gallery(b.images, [str(p) for p in b.patient_ids], b.labels, list(b.names), list(idx))
    if not same:
        k = len(gallery)
        gallery = Gallery(torch.cat([gallery.images, truth.images.float()]),
                          gallery.patient_ids + [str(p) for p in truth.patient_ids],
                          (torch.cat([gallery.labels, truth.labels]) if gallery.labels is not None else None),
                          gallery.names + list(truth.names), gallery.indices + [-(j + 1) for j in range(len(truth.images))])
        gallery.description = {"attacked_images_added": len(truth.images), "first_added": k}
    gallery.description = {**gallery.description, "data": ds.describe().get("source")}
    return gallery


def true_positions(gallery: Gallery, ds: ImageDataset, truth: Truth) -> list[int]:
    """Gallery positions of the attacked images."""
    if "first_added" in gallery.description:
        k = int(gallery.description["first_added"])
        return list(range(k, k + len(truth.images)))
    return gallery.position(truth.indices)


def measure_reid(paired_reconstructions: torch.Tensor, truth: Truth, ds: ImageDataset, *,
                 size: int = GALLERY_IMAGES, seed: int = 0, distances: Sequence[str] = DISTANCES
                 ) -> dict[str, Any]:
    """Patient re-identification (leave-the-image-out) and IIP of reconstructions paired with ``truth``."""
    gallery = gallery_for(ds, truth, size=size, seed=seed)
    return reidentify(paired_reconstructions, true_positions(gallery, ds, truth), gallery,
                      distances=list(distances))


def load_reference(spec: str | dict[str, Any] | None, *, size: int | None = None,
                   where: str = "reference data") -> ImageDataset | None:
    """Load the reference data set, or None when there is no spec."""
    if spec is None:
        return None
    try:
        return load_dataset(spec, size=size)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def reference_summary(metrics: dict[str, Any]) -> None:
    """Log the baseline, the gain and the re-identification of ``metrics`` in two lines."""
    b, g = metrics.get("baseline"), metrics.get("gain_over_baseline")
    if b and g:
        log.info(f"blind baseline (no update): PSNR {b['psnr']:.2f} dB, SSIM {b['ssim']:.4f}; gain of the attack: "
             f"{g['psnr_db']:+.2f} dB, SSIM {g['ssim']:+.4f} ({g['ssim_skill']:+.2f} of the headroom)")
    r = (metrics.get("reid") or {}).get("strongest")
    if r:
        log.info(f"patient re-identification (leave-the-image-out, {r['distance']}): top-1 {r['top1_hits']}/{r['n']}, "
             f"top-5 {r.get('top5_hits')}/{r['n']} (chance {metrics['reid'].get('chance_top1') or 0:.3f} / "
             f"{metrics['reid'].get('chance_top5') or 0:.3f}); exact image (IIP) {r['iip_hits']}/{r['iip_n']}")


__all__ = ["AUX_IMAGES", "GALLERY_IMAGES", "DISTANCES", "data_spec", "auxiliary_images", "blind_baseline",
           "gallery_for", "true_positions", "measure_reid", "load_reference", "reference_summary"]
