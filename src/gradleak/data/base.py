"""The shape every data source takes: an indexable set of grey images with labels and patient ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from gradleak.data.pseudonym import pseudonymise_names, pseudonymise_patients
from gradleak.errors import UserError


@dataclass
class Batch:
    """Images drawn from a data set, with everything the victim side knows about them."""

    images: torch.Tensor  # float32, N x C x H x W, values in [0, 1]
    labels: torch.Tensor  # int64, N
    patient_ids: list[str]  # pseudonyms (synthetic ids for the phantoms)
    names: list[str]  # pseudonymised file name (or synthetic id) of each image
    indices: list[int] = field(default_factory=list)  # positions in the data set


class ImageDataset:
    """Base class of every data source.

    Subclasses fill ``labels`` (int64 array), ``patient_ids``, ``names`` and ``classes`` when they are
    built, and implement :meth:`_load_one`. Sources that read files set the ids and names through
    :meth:`set_identities`, which keeps only pseudonyms (:mod:`gradleak.data.pseudonym`). Decoding is
    lazy, so listing a folder of 5 000 X-rays is cheap and only the images asked for are read.
    """

    source: str = "base"

    def __init__(self, *, size: int, channels: int = 1):
        self.size = int(size)
        self.channels = int(channels)
        self.labels: np.ndarray = np.zeros(0, dtype=np.int64)
        self.patient_ids: list[str] = []
        self.names: list[str] = []
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def set_identities(self, patient_ids: Sequence[str], names: Sequence[str] | None = None) -> None:
        """Keep keyed pseudonyms of the patients' identifiers (and of the images' names, when given): no
        identifier read from the data ever reaches anything written."""
        self.patient_ids = pseudonymise_patients(patient_ids)
        if names is not None:
            self.names = pseudonymise_names(names)

    def _load_one(self, index: int) -> np.ndarray:
        """Return image ``index`` as float32 H x W (or C x H x W) in [0, 1] at ``self.size``."""
        raise NotImplementedError

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        """Images at ``indices`` as float32 N x C x H x W in [0, 1]."""
        out = []
        for i in indices:
            a = np.asarray(self._load_one(int(i)), dtype=np.float32)
            if not np.isfinite(a).all():
                raise UserError(f"{self.source}: image {int(i)} ({self.names[int(i)]}) holds NaN or infinite values")
            if a.ndim == 2:
                a = a[None]
            out.append(a)
        if not out:
            return torch.zeros(0, self.channels, self.size, self.size)
        return torch.from_numpy(np.stack(out)).clamp_(0.0, 1.0)

    def batch(self, indices: Sequence[int]) -> Batch:
        idx = [int(i) for i in indices]
        return Batch(
            images=self.load(idx),
            labels=torch.as_tensor(self.labels[idx], dtype=torch.int64),
            patient_ids=[self.patient_ids[i] for i in idx],
            names=[self.names[i] for i in idx],
            indices=idx,
        )

    def describe(self) -> dict:
        """JSON-able description recorded in experiment folders and prior files."""
        return {"source": self.source, "size": self.size, "num_images": len(self),
                "classes": list(self.classes)}
