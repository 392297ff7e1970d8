"""Learned embeddings for re-identification: images to feature vectors compared by cosine distance.

* :class:`ClassifierEmbedder`: the penultimate features of a pneumonia classifier (e.g. the ``model.pt`` a
  utility run saved);
* :class:`AutoencoderEmbedder`: the code of a small convolutional autoencoder that gradleak trains on the
  gallery itself (:func:`train_autoencoder`; seeded, seconds on a CPU), when no classifier is available.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_path


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


__all__ = ["Embedder", "ClassifierEmbedder", "AutoencoderEmbedder", "TinyAutoencoder", "train_autoencoder"]
