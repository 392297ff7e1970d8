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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_path
from .image import ssim

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


# ------------------------------------------------------------------------------------------ embeddings
class Embedder:
    """Maps images (N x C x H x W in [0, 1]) to feature vectors N x D."""

    kind = "embedder"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


class ClassifierEmbedder(Embedder):
    """Penultimate features of a classifier (a :class:`gradleak.models.VictimNet`)."""

    kind = "classifier"

    def __init__(self, model: nn.Module, image_size: int, source: str = ""):
        self.model = model.eval()
        self.image_size = int(image_size)
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ClassifierEmbedder":
        """Load a ``model.pt`` written by a utility run: ``{"model": header, "state_dict": ...}`` (and the
        input normalisation under ``data``, when present)."""
        from ..models import build_from_header
        from ..models.checkpoint import load_model

        ck = load_model(path)  # checks the header, names and shapes; one-line errors
        model = build_from_header(ck["model"], ck["data"])
        model.load_state_dict(ck["state_dict"])
        return cls(model, ck["model"]["image_size"], source=str(path))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize(images.float(), self.image_size)
        return torch.cat([self.model.penultimate(x[i:i + 256]).flatten(1) for i in range(0, len(x), 256)])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source,
                "variant": "penultimate features of a pneumonia classifier, cosine distance"}


class TinyAutoencoder(nn.Module):
    """A small convolutional autoencoder on 32 x 32 grey images; its code is the embedding."""

    def __init__(self, latent: int = 32, size: int = 32, channels: int = 1):
        super().__init__()
        self.size, self.latent, self.channels = int(size), int(latent), int(channels)
        s = self.size // 8
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * s * s, latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent, 32 * s * s), nn.ReLU(), nn.Unflatten(1, (32, s, s)),
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(8, channels, 4, 2, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AutoencoderEmbedder(Embedder):
    kind = "autoencoder"

    def __init__(self, model: TinyAutoencoder, info: dict[str, Any] | None = None):
        self.model = model.eval()
        self.info = dict(info or {})

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _resize(images.float(), self.model.size)
        return torch.cat([self.model.encoder(x[i:i + 256]) for i in range(0, len(x), 256)])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.info,
                "variant": f"code of a {self.model.latent}-d convolutional autoencoder trained on the gallery "
                           f"({self.model.size} px), cosine distance"}

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path) as tmp:
            torch.save({"kind": self.kind, "latent": self.model.latent, "size": self.model.size,
                        "channels": self.model.channels, "info": self.info,
                        "state_dict": self.model.state_dict()}, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AutoencoderEmbedder":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = TinyAutoencoder(blob["latent"], blob["size"], blob["channels"])
        model.load_state_dict(blob["state_dict"])
        return cls(model, blob.get("info"))


def train_autoencoder(images: torch.Tensor, *, seed: int = 0, steps: int = 200, batch_size: int = 32,
                      latent: int = 32, size: int = 32, lr: float = 2e-3, threads: int | None = 1,
                      progress: Callable[[int, float], None] | None = None) -> AutoencoderEmbedder:
    """Train :class:`TinyAutoencoder` on ``images`` (MSE, Adam). Same seed, same weights on CPU.

    The network is small enough that one CPU thread is fastest (more threads only contend, badly so on
    a busy machine); ``threads=None`` keeps torch's setting.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _train_autoencoder(images, seed, steps, batch_size, latent, size, lr, progress)
    finally:
        torch.set_num_threads(before)


def _train_autoencoder(images, seed, steps, batch_size, latent, size, lr, progress) -> AutoencoderEmbedder:
    x = _resize(images.detach().cpu().float(), size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = TinyAutoencoder(latent, size, x.shape[1])
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(int(steps)):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=g)
        loss = F.mse_loss(model(x[idx]), x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss = loss.detach()
        if progress:
            progress(step, float(loss))
    info = {"seed": int(seed), "steps": int(steps), "trained_on": f"{len(x)} gallery images",
            "final_loss": round(float(loss), 6)}
    return AutoencoderEmbedder(model.eval(), info)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    mode = "area" if x.shape[-1] > size else "bilinear"
    return F.interpolate(x, size=(size, size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


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
    gimg = gallery.images.float()
    labels = gallery.labels
    flat = gimg.flatten(1)
    # per query: the gallery positions left out (the original and its exact copies)
    left_out: list[set[int]] = []
    for t in true_positions:
        if leave_out:
            d = torch.linalg.vector_norm(flat - flat[t], dim=1)
            left_out.append({int(j) for j in torch.nonzero(d < IIP_TOLERANCE).flatten().tolist()} | {int(t)})
        else:
            left_out.append(set())
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
        d = distance_matrix(recs, gimg, dist, embedder)
        img_rank, pat_rank, iip_hits = [], [], 0
        for i, t in enumerate(true_positions):
            order = _stable_order(d[i])
            img_rank.append(int((order == t).nonzero()[0, 0]) + 1)
            if eligible[i]:
                seen: list[str] = []
                for j in order.tolist():
                    if j in left_out[i]:
                        continue
                    if pids[j] not in seen:
                        seen.append(pids[j])
                        if pids[j] == pids[t]:
                            break
                pat_rank.append(len(seen))
            else:
                pat_rank.append(None)
            # IIP: nearest neighbour among the original's label, the whole gallery
            same = [j for j in order.tolist() if labels is None or int(labels[j]) == int(labels[t])]
            nn_ = same[0]
            if nn_ == t or float(torch.linalg.vector_norm(gimg[nn_] - gimg[t])) < IIP_TOLERANCE:
                iip_hits += 1
        res: dict[str, Any] = {"variant": VARIANTS[dist] if dist != "embedding" or embedder is None
                               else embedder.describe().get("variant", VARIANTS[dist]), "n": n_ok}
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
        out["by_distance"][dist] = res
    scored = {k: v for k, v in out["by_distance"].items() if v.get("top1") is not None}
    if scored:
        best = max(scored, key=lambda k: (scored[k]["top1"], scored[k].get("top5") or 0))
        out["strongest"] = {"distance": best, "top1": scored[best]["top1"], "top1_hits": scored[best]["top1_hits"],
                            "top5": scored[best].get("top5"), "top5_hits": scored[best].get("top5_hits"),
                            "iip": scored[best]["iip"], "iip_hits": scored[best]["iip_hits"], "iip_n": n,
                            "n": n_ok}
    elif out["by_distance"]:
        any_ = next((v for v in out["by_distance"].values() if "iip" in v), None)
        if any_ is not None:
            out["note"] = ("no attacked patient has another image in the gallery: patient re-identification "
                           "cannot be measured")
    if embedder is not None:
        out["embedding"] = embedder.describe()
    return out


__all__ = ["DISTANCES", "THREAT_MODEL", "VARIANTS", "Gallery", "Embedder", "ClassifierEmbedder",
           "AutoencoderEmbedder", "TinyAutoencoder", "train_autoencoder", "distance_matrix", "reidentify",
           "chance_top_k", "GALLERY_PROTOCOL"]
