"""Patient re-identification: can a reconstruction be linked back to a patient in an identified gallery?

Threat model (:data:`THREAT_MODEL`): besides the update, the attacker holds a gallery of identified
images -- the attacked split, many patients, every image with its patient id -- as a hospital archive
would be. The archive threat is finding the patient's *other* images, so patient re-identification
searches a **leave-the-image-out** gallery: the attacked image itself (and any exact copy of it) is
taken out, leaving the patient's other images and the other patients. For each reconstruction the
gallery is ranked by a distance:

* ``mse``: pixel mean squared error;
* ``ssim``: 1 - SSIM (the standard Gaussian-window SSIM of :mod:`gradleak.metrics.image`);
* ``embedding``: 1 - cosine similarity of learned features -- the penultimate features of a pneumonia
  classifier (:class:`ClassifierEmbedder`, e.g. the model a utility run saved as ``model.pt``) or, when
  none is available, of a small convolutional autoencoder that gradleak trains on the gallery itself
  (:func:`train_autoencoder`; seeded, seconds on a CPU).

Reported per distance (ties are broken by gallery order):

* **top-1 / top-5 patient re-identification rate** (patient level, leave-the-image-out): patients are
  ranked by their nearest gallery image; a reconstruction is re-identified at k when its original's
  patient is among the first k distinct patients. At k = 1 this is "the nearest of the *other* gallery
  images belongs to the original's patient". Only reconstructions whose patient has another image in the
  gallery can be re-identified; the rates are over those (``n``; ``without_other_images`` counts the
  rest). ``chance_top1`` / ``chance_top5`` are what a random ranking of the same gallery would reach
  (exact for top-1: the patient's share of the other images; numerical integration for top-5).
* **rank of the true image** (image level, the whole gallery): 1 + the number of gallery images ranked
  before the original image.
* **IIP**, image identifiability precision (Yin et al., "See through Gradients: Image Batch Recovery via
  GradInversion", CVPR 2021, Sec. 5; image level, the whole gallery, the attacked image in it): the
  fraction of reconstructions whose nearest neighbour, searched among the gallery images carrying the
  original's label (as in the reference implementation, breaching's ``image_identifiability_precision``),
  is an exact match of the original -- the original itself or an image whose pixels differ from it by an
  L2 norm below 1e-3. It is kept separate from the patient rates: it asks "is this that exact image?",
  not "whose chest is this?".

Reconstructions must be paired with their originals first (Hungarian matching, as :func:`score` does).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_path, write_text
from .embedding import AutoencoderEmbedder, ClassifierEmbedder, Embedder, TinyAutoencoder, train_autoencoder
from .image import ssim

log = logging.getLogger(__name__)

DISTANCES = ("mse", "ssim", "embedding")

THREAT_MODEL = ("re-identification: the attacker also holds an identified gallery of the attacked split "
                "(every image with its patient id); patient re-identification searches it with the attacked "
                "image left out (the patient's other images plus other patients), image identifiability (IIP) "
                "with the attacked image in it")

GALLERY_PROTOCOL = ("leave-the-image-out: for patient re-identification the attacked image (and any exact copy "
                    "of it) is removed from the gallery, which keeps the patient's other images and the other "
                    "patients")

VARIANTS = {
    "top1": "top-1 patient re-identification rate (leave-the-image-out): the nearest gallery image, the attacked "
            "image left out, belongs to the original's patient",
    "top5": "top-5 patient re-identification rate (leave-the-image-out): the original's patient is among the 5 "
            "nearest distinct patients (patients ranked by their nearest image, the attacked image left out)",
    "true_image_rank": "rank of the original image in the gallery ranking (1 = nearest)",
    "iip": "IIP, image identifiability precision (Yin et al. 2021): nearest same-label gallery image is the "
           "original (image level, the attacked image in the gallery)",
    "mse": "pixel mean squared error",
    "ssim": "1 - standard SSIM (Gaussian window, sigma 1.5)",
    "embedding": "1 - cosine similarity of learned features",
}

IIP_TOLERANCE = 1e-3


@dataclass
class Gallery:
    """Identified images the attacker can search: float32 G x C x H x W in [0, 1]."""

    images: torch.Tensor
    patient_ids: list[str]
    labels: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # data set index of each gallery image
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.patient_ids) != len(self.images):
            raise ValueError(f"gallery has {len(self.images)} images but {len(self.patient_ids)} patient ids")

    def __len__(self) -> int:
        return len(self.images)

    def position(self, dataset_indices: Sequence[int]) -> list[int]:
        """Gallery positions of images given by data set index (each must be in the gallery)."""
        where = {int(i): k for k, i in enumerate(self.indices)}
        missing = [int(i) for i in dataset_indices if int(i) not in where]
        if missing:
            raise ValueError(f"data set image {missing[0]} is not in the gallery")
        return [where[int(i)] for i in dataset_indices]

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, images=self.images.numpy().astype(np.float32),
                                patient_ids=np.array(self.patient_ids, dtype=str),
                                labels=(self.labels.numpy() if self.labels is not None
                                        else np.zeros(0, dtype=np.int64)),
                                names=np.array(self.names, dtype=str),
                                indices=np.array(self.indices, dtype=np.int64))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Gallery":
        with np.load(path, allow_pickle=False) as z:
            labels = torch.from_numpy(z["labels"].astype(np.int64)) if len(z["labels"]) else None
            return cls(images=torch.from_numpy(z["images"]), patient_ids=[str(p) for p in z["patient_ids"]],
                       labels=labels, names=[str(n) for n in z["names"]],
                       indices=[int(i) for i in z["indices"]])

    def extend(self, images: torch.Tensor, patient_ids: Sequence[Any], labels: torch.Tensor | None,
               names: Sequence[str], indices: Sequence[int]) -> "Gallery":
        """A new gallery: these images appended to this one's (the description is not carried over)."""
        return Gallery(torch.cat([self.images, images]), self.patient_ids + [str(p) for p in patient_ids],
                       (torch.cat([self.labels, labels]) if self.labels is not None and labels is not None
                        else None),
                       self.names + [str(n) for n in names], self.indices + [int(i) for i in indices])


# ------------------------------------------------------------------------------------------- distances
def distance_matrix(queries: torch.Tensor, gallery: torch.Tensor, distance: str,
                    embedder: Embedder | None = None, chunk: int = 512) -> torch.Tensor:
    """Q x G distances (lower is nearer) between queries and gallery images."""
    q = queries.detach().cpu().float()
    g = gallery.detach().cpu().float()
    if q.shape[1:] != g.shape[1:]:
        raise ValueError(f"queries are {tuple(q.shape[1:])} but gallery images {tuple(g.shape[1:])}")
    if distance == "mse":
        return torch.cdist(q.double().flatten(1), g.double().flatten(1)) ** 2 / q[0].numel()
    if distance == "ssim":
        out = torch.empty(len(q), len(g), dtype=torch.float64)
        for i in range(len(q)):
            for j in range(0, len(g), chunk):
                part = g[j:j + chunk]
                out[i, j:j + len(part)] = 1 - ssim(q[i:i + 1].expand_as(part), part).double()
        return out
    if distance == "embedding":
        if embedder is None:
            raise ValueError("the embedding distance needs an embedder")
        fq = F.normalize(embedder(q).double(), dim=1)
        fg = F.normalize(embedder(g).double(), dim=1)
        return 1 - fq @ fg.T
    raise ValueError(f"unknown distance {distance!r} (use one of {', '.join(DISTANCES)})")


def _stable_order(row: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.argsort(row.numpy(), kind="stable"))


def chance_top_k(own: int, others: Sequence[int], ks: Sequence[int] = (1, 5), grid: int = 2048
                 ) -> dict[int, float]:
    """Top-k patient re-identification rate of a random ranking.

    The searched gallery holds ``own`` images of the true patient and ``others[q]`` images of each other
    patient q. A random ranking orders the images uniformly at random and ranks patients by their first
    image. Top-1 is exact (``own / all images``); for larger k the rank of the true patient is integrated
    over the quantiles of its first position (midpoint rule on ``grid`` points).
    """
    others = [int(c) for c in others if int(c) > 0]
    if own <= 0:
        return {int(k): 0.0 for k in ks}
    total = own + sum(others)
    out: dict[int, float] = {}
    kmax = max(int(k) for k in ks)
    u = (np.arange(grid) + 0.5) / grid
    m = 1.0 - (1.0 - u) ** (1.0 / own)  # quantiles of the true patient's first position in [0, 1]
    dist = np.zeros((grid, kmax))
    dist[:, 0] = 1.0  # dist[:, j]: probability that j other patients come first (truncated at kmax - 1)
    for c in others:
        p = 1.0 - (1.0 - m) ** c
        new = dist * (1.0 - p)[:, None]
        new[:, 1:] += dist[:, :-1] * p[:, None]
        dist = new
    for k in ks:
        k = int(k)
        out[k] = own / total if k == 1 else float(dist[:, :k].sum(1).mean())
    return out



def _left_out(gallery: Gallery, true_positions: Sequence[int], leave_out: bool) -> list[set[int]]:
    """Per query, the gallery positions patient re-identification leaves out: the original and its exact
    copies (none when ``leave_out`` is False)."""
    if not leave_out:
        return [set() for _ in true_positions]
    flat = gallery.images.float().flatten(1)
    out = []
    for t in true_positions:
        d = torch.linalg.vector_norm(flat - flat[t], dim=1)
        out.append({int(j) for j in torch.nonzero(d < IIP_TOLERANCE).flatten().tolist()} | {int(t)})
    return out


def _chances(pids: list[str], true_positions: Sequence[int], left_out: list[set[int]], ks: Sequence[int]
             ) -> tuple[list[bool], dict[int, list[float]]]:
    """Which queries have another image of their patient left to find, and the chance rates of those."""
    counts: dict[str, int] = {}
    for p_ in pids:
        counts[p_] = counts.get(p_, 0) + 1
    eligible, chances = [], {int(k): [] for k in ks}
    for t, out_ in zip(true_positions, left_out):
        own = counts[pids[t]] - sum(1 for j in out_ if pids[j] == pids[t])
        eligible.append(own > 0)
        if own > 0:
            # exact copies of the original under another patient's id are left out as well
            removed: dict[str, int] = {}
            for j in out_:
                if pids[j] != pids[t]:
                    removed[pids[j]] = removed.get(pids[j], 0) + 1
            others = [counts[p_] - removed.get(p_, 0) for p_ in counts if p_ != pids[t]]
            for k, v in chance_top_k(own, others, ks).items():
                chances[k].append(v)
    return eligible, chances


def _patient_rank(order: list[int], t: int, pids: list[str], left_out: set[int]) -> int:
    """Rank of the original's patient among the distinct patients of ``order`` (the left-out images skipped)."""
    seen: list[str] = []
    for j in order:
        if j in left_out:
            continue
        if pids[j] not in seen:
            seen.append(pids[j])
            if pids[j] == pids[t]:
                break
    return len(seen)


def _rank(d: torch.Tensor, gallery: Gallery, true_positions: Sequence[int], left_out: list[set[int]],
          eligible: list[bool]) -> tuple[list[int], list[int | None], int]:
    """The true image's rank, the true patient's rank and the IIP hits of one distance matrix."""
    pids, labels, gimg = list(gallery.patient_ids), gallery.labels, gallery.images.float()
    img_rank, pat_rank, iip_hits = [], [], 0
    for i, t in enumerate(true_positions):
        order = _stable_order(d[i])
        img_rank.append(int((order == t).nonzero()[0, 0]) + 1)
        order_l = order.tolist()
        pat_rank.append(_patient_rank(order_l, t, pids, left_out[i]) if eligible[i] else None)
        # IIP: nearest neighbour among the original's label, the whole gallery
        nn_ = next(j for j in order_l if labels is None or int(labels[j]) == int(labels[t]))
        if nn_ == t or float(torch.linalg.vector_norm(gimg[nn_] - gimg[t])) < IIP_TOLERANCE:
            iip_hits += 1
    return img_rank, pat_rank, iip_hits


def _rates(img_rank: list[int], pat_rank: list[int | None], iip_hits: int, n_ok: int, ks: Sequence[int]
           ) -> dict[str, Any]:
    n = len(img_rank)
    res: dict[str, Any] = {"n": n_ok}
    for k in ks:
        hits = sum(r is not None and r <= k for r in pat_rank)
        res[f"top{k}"] = hits / n_ok if n_ok else None
        res[f"top{k}_hits"] = int(hits)
    res["iip"] = iip_hits / n if n else None
    res["iip_hits"] = int(iip_hits)
    res["iip_n"] = n
    res["true_image_rank"] = img_rank
    res["true_patient_rank"] = pat_rank
    res["median_true_image_rank"] = float(np.median(img_rank)) if n else None
    return res


def _strongest(out: dict[str, Any], n: int, n_ok: int) -> None:
    """The distance that re-identified most (top-1, then top-5), or a note why none could."""
    scored = {k: v for k, v in out["by_distance"].items() if v.get("top1") is not None}
    if scored:
        best = max(scored, key=lambda k: (scored[k]["top1"], scored[k].get("top5") or 0))
        out["strongest"] = {"distance": best, "top1": scored[best]["top1"], "top1_hits": scored[best]["top1_hits"],
                            "top5": scored[best].get("top5"), "top5_hits": scored[best].get("top5_hits"),
                            "iip": scored[best]["iip"], "iip_hits": scored[best]["iip_hits"], "iip_n": n,
                            "n": n_ok}
    elif any("iip" in v for v in out["by_distance"].values()):
        out["note"] = ("no attacked patient has another image in the gallery: patient re-identification "
                       "cannot be measured")


def reidentify(reconstructions: torch.Tensor, true_positions: Sequence[int], gallery: Gallery, *,
               distances: Sequence[str] = DISTANCES, embedder: Embedder | None = None,
               ks: Sequence[int] = (1, 5), leave_out: bool = True) -> dict[str, Any]:
    """Rank ``gallery`` for each reconstruction and score patient re-identification and IIP.

    ``reconstructions[i]`` is the reconstruction paired with the original at gallery position
    ``true_positions[i]``. Patient rates search the gallery with that original (and exact copies of it)
    left out (``leave_out=False`` keeps it, the older exact-image protocol); the true image's rank and IIP
    search the whole gallery. Returns rates per distance (see module docstring) and per-image ranks.
    """
    recs = reconstructions.detach().cpu().float()
    if len(recs) != len(true_positions):
        raise ValueError(f"{len(recs)} reconstructions but {len(true_positions)} true positions")
    pids = list(gallery.patient_ids)
    n = len(recs)
    left_out = _left_out(gallery, true_positions, leave_out)
    eligible, chances = _chances(pids, true_positions, left_out, ks)
    n_ok = int(sum(eligible))
    out: dict[str, Any] = {
        "threat_model": THREAT_MODEL,
        "gallery_protocol": GALLERY_PROTOCOL if leave_out else "the attacked image stays in the gallery",
        "leave_the_image_out": bool(leave_out),
        "gallery": {"images": len(gallery), "patients": len(set(pids)), **gallery.description},
        "variants": {k: v for k, v in VARIANTS.items()},
        "num_reconstructions": n,
        "num_with_other_images": n_ok,
        "without_other_images": n - n_ok,
        **{f"chance_top{k}": (float(np.mean(v)) if v else None) for k, v in chances.items()},
        "by_distance": {},
    }
    for dist in distances:
        if dist == "embedding" and embedder is None:
            out["by_distance"][dist] = {"note": "not computed: no embedder"}
            continue
        d = distance_matrix(recs, gallery.images.float(), dist, embedder)
        variant = (VARIANTS[dist] if dist != "embedding" or embedder is None
                   else embedder.describe().get("variant", VARIANTS[dist]))
        out["by_distance"][dist] = {"variant": variant,
                                    **_rates(*_rank(d, gallery, true_positions, left_out, eligible), n_ok, ks)}
    _strongest(out, n, n_ok)
    if embedder is not None:
        out["embedding"] = embedder.describe()
    return out


# --------------------------------------------------------------------- a gallery kept on disk (sweeps)
@dataclass
class ReidContext:
    """A gallery saved in its own folder (``gallery.npz``, ``gallery.json``) and its learned embedding,
    shared by every cell that attacks the same data set."""

    key: str
    gallery_path: Path
    embedder_path: Path | None
    embedder_kind: str | None
    description: dict[str, Any] = field(default_factory=dict)


def _save_gallery(folder: Path, data: dict[str, Any], size: int, seed: int) -> None:
    """Draw ``size`` images of the data set (seeded) and save them as ``folder``'s gallery."""
    from ..data import load_dataset

    ds = load_dataset(data)
    n = len(ds)
    if n <= size:
        idx = list(range(n))
    else:
        idx = sorted(int(i) for i in np.random.default_rng(seed).choice(n, size, replace=False))
    log.info(f"re-identification gallery: {len(idx)} of {n} images of {ds.describe().get('source')}")
    b = ds.batch(idx)
    Gallery(b.images, b.patient_ids, b.labels, b.names, idx).save(folder / "gallery.npz")
    info = {"data": data, "data_description": ds.describe(), "images": len(idx),
            "patients": len(set(b.patient_ids)), "data_set_images": n}
    write_text(folder / "gallery.json", json.dumps(info, indent=2, default=str) + "\n")


def prepare_reid(folder: Path, data: dict[str, Any], settings: dict[str, Any], classifier: Path | None
                 ) -> ReidContext:
    """Build (or reuse) in ``folder`` the gallery of one data set and its learned embedding.

    ``settings``: ``gallery_size``, ``seed``, ``distances``, ``embedding`` (``auto``, ``autoencoder``,
    ``none`` or ``classifier:PATH``) and ``autoencoder_steps``. ``classifier``: the model ``auto`` uses
    when there is one (else it trains an autoencoder on the gallery)."""
    folder = Path(folder)
    gpath = folder / "gallery.npz"
    if not gpath.is_file():
        _save_gallery(folder, data, int(settings["gallery_size"]), int(settings["seed"]))
    emb = str(settings["embedding"])
    kind, epath = None, None
    if "embedding" in settings["distances"] and emb != "none":
        if emb.startswith("classifier:"):
            kind, epath = "classifier", Path(emb.split(":", 1)[1])
        elif emb == "auto" and classifier is not None:
            kind, epath = "classifier", Path(classifier)
        else:
            kind, epath = "autoencoder", folder / "autoencoder.pt"
            if not epath.is_file():
                log.info("training the re-identification autoencoder on the gallery ...")
                train_autoencoder(Gallery.load(gpath).images, seed=settings["seed"],
                                  steps=settings["autoencoder_steps"]).save(epath)
    desc = json.loads((folder / "gallery.json").read_text())
    return ReidContext(folder.name, gpath, epath, kind, desc)


_EMBEDDERS: dict[str, Embedder] = {}
_DATASETS: dict[str, Any] = {}


def _embedder(ctx: ReidContext) -> Embedder | None:
    """The context's embedder, loaded once per process."""
    if ctx.embedder_path is None:
        return None
    k = str(ctx.embedder_path)
    if k not in _EMBEDDERS:
        _EMBEDDERS[k] = (ClassifierEmbedder.from_file(ctx.embedder_path) if ctx.embedder_kind == "classifier"
                         else AutoencoderEmbedder.load(ctx.embedder_path))
    return _EMBEDDERS[k]


def _with_attacked(gallery: Gallery, truth: Any, data: dict[str, Any] | None) -> Gallery:
    """``gallery`` with the attacked images and, when ``data`` names their data set, every other image of
    the attacked patients added where its seeded subset missed them."""
    have = set(gallery.indices)
    if data is None:  # only the attacked images themselves
        missing = [k for k, i in enumerate(truth.indices) if i not in have]
        if not missing:
            return gallery
        return gallery.extend(truth.images[missing], [truth.patient_ids[k] for k in missing],
                              truth.labels[missing], [truth.names[k] for k in missing],
                              [truth.indices[k] for k in missing])
    from ..data import load_dataset

    key = json.dumps(data, sort_keys=True, default=str)
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(data)
    ds = _DATASETS[key]
    attacked = {str(p) for p in truth.patient_ids}
    add = sorted({i for i in truth.indices if i not in have}
                 | {i for i, p in enumerate(ds.patient_ids) if str(p) in attacked and i not in have})
    if not add:
        return gallery
    b = ds.batch(add)
    return gallery.extend(b.images, list(b.patient_ids), b.labels, list(b.names), add)


def cell_reid(folder: Path, ctx: ReidContext, distances: Sequence[str], data: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Re-identification of a finished experiment's reconstructions (``folder``: ``truth.npz``,
    ``reconstruction.npz``, ``metrics.json``) against the gallery of ``ctx``.

    The attacked images and every other image of the attacked patients join the gallery when its seeded
    subset missed them: patient re-identification searches it with the attacked image left out, so the
    patients' other images must be there to be found."""
    from ..capture import load_truth

    folder = Path(folder)
    truth = load_truth(folder / "truth.npz")
    with np.load(folder / "reconstruction.npz") as z:
        rec = torch.from_numpy(z["images"])
    metrics = json.loads((folder / "metrics.json").read_text())
    perm = [p["paired_reconstruction"] for p in metrics["per_image"]]
    gallery = _with_attacked(Gallery.load(ctx.gallery_path), truth, data)
    gallery.description = {"data": ctx.description.get("data_description", {}).get("source")}
    return reidentify(rec[perm], gallery.position(truth.indices), gallery, distances=list(distances),
                      embedder=_embedder(ctx))


__all__ = ["DISTANCES", "THREAT_MODEL", "VARIANTS", "Gallery", "Embedder", "ClassifierEmbedder",
           "AutoencoderEmbedder", "TinyAutoencoder", "train_autoencoder", "distance_matrix", "reidentify",
           "chance_top_k", "GALLERY_PROTOCOL", "ReidContext", "prepare_reid", "cell_reid"]
