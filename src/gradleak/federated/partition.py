"""How a data set is split among federated clients: by patient, IID or with Dirichlet label skew.

A patient's images are never split between clients, so a client's data set is a set of patients.

    part = partition_by_patient(labels, patient_ids, 10, scheme="dirichlet", alpha=0.5, seed=0)
    part.clients[k]  # the data set indices client k holds
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import UserError

PARTITIONS = ("iid", "dirichlet")


def patient_groups(patient_ids: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
    """Distinct patient ids in order of first appearance and the data set indices of each."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patient_ids):
        groups.setdefault(str(p), []).append(i)
    names = list(groups)
    return names, [np.asarray(groups[p], dtype=np.int64) for p in names]


def patient_labels(labels: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Each patient's label: the most frequent label among the patient's images (ties: the larger)."""
    out = np.empty(len(groups), dtype=np.int64)
    for j, g in enumerate(groups):
        counts = np.bincount(labels[g])
        out[j] = len(counts) - 1 - int(np.argmax(counts[::-1]))
    return out


@dataclass
class Partition:
    """Which data set indices each client holds. ``proportions[c, k]`` is the Dirichlet draw that sent
    client ``k`` its share of the patients of class ``c`` (``None`` for IID)."""

    clients: list[np.ndarray]
    scheme: str
    alpha: float | None = None
    proportions: np.ndarray | None = None
    attempts: int = 1

    def describe(self, labels: np.ndarray, patient_ids: Sequence[str]) -> list[dict[str, Any]]:
        out = []
        for k, idx in enumerate(self.clients):
            y = labels[idx]
            out.append({"client": k, "num_images": int(len(idx)),
                        "num_patients": int(len({patient_ids[i] for i in idx})),
                        "class_counts": [int((y == c).sum()) for c in range(int(labels.max()) + 1)]})
        return out


def partition_by_patient(labels, patient_ids: Sequence[str], num_clients: int, *, scheme: str = "iid",
                         alpha: float = 0.5, seed: int = 0, min_images: int = 1,
                         max_attempts: int = 1000) -> Partition:
    """Split a data set's indices among ``num_clients`` clients so that no patient is on two clients.

    ``iid``: patients are shuffled and dealt out in order so that every client holds about the same
    number of images (within one patient's images of N/K).

    ``dirichlet``: the usual label-skew partition (Hsu et al. 2019), by patient. Each patient carries
    its majority label; for each class c, the class's patients are shuffled and client k receives the
    share ``p_c[k]`` of them, ``p_c ~ Dirichlet(alpha * 1_K)`` drawn independently per class: client k
    gets the patients between positions ``round(n_c * cumsum(p_c)[k-1])`` and
    ``round(n_c * cumsum(p_c)[k])``. Small ``alpha`` gives clients few classes; large ``alpha`` gives
    every client the global label mix. The draw is repeated (from the same generator) until every client
    holds at least ``min_images`` images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    k = int(num_clients)
    if k < 1:
        raise UserError(f"num_clients must be >= 1, got {num_clients}")
    if scheme not in PARTITIONS:
        raise UserError(f"unknown partition '{scheme}' (use one of {', '.join(PARTITIONS)})")
    names, groups = patient_groups(patient_ids)
    if len(names) < k:
        raise UserError(f"cannot give {k} clients a patient each: the data holds {len(names)} patients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(groups))
        sizes = np.array([len(groups[j]) for j in order])
        n = sizes.sum()
        middle = np.cumsum(sizes) - sizes / 2.0  # each patient's centre in the dealt sequence
        owner = np.minimum((middle * k / n).astype(np.int64), k - 1)
        parts: list[list[int]] = [[] for _ in range(k)]
        for j, c in zip(order, owner):
            parts[int(c)].extend(groups[j].tolist())
        clients = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
        if min(len(c) for c in clients) < min_images:
            raise UserError(f"an IID partition of {len(names)} patients into {k} clients leaves a client "
                            f"with fewer than {min_images} images")
        return Partition(clients, "iid")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise UserError(f"partition alpha must be a positive number, got {alpha!r}")
    plabels = patient_labels(labels, groups)
    classes = np.unique(plabels)
    for attempt in range(1, max_attempts + 1):
        props = np.zeros((int(classes.max()) + 1, k))
        parts = [[] for _ in range(k)]
        for c in classes:
            members = np.flatnonzero(plabels == c)
            members = members[rng.permutation(len(members))]
            p = rng.dirichlet(np.full(k, float(alpha)))
            props[c] = p
            cuts = np.rint(np.cumsum(p) * len(members)).astype(np.int64)
            cuts[-1] = len(members)
            start = 0
            for client, end in enumerate(cuts):
                for j in members[start:end]:
                    parts[client].extend(groups[j].tolist())
                start = max(start, end)
        if min(len(p) for p in parts) >= min_images:
            clients = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
            return Partition(clients, "dirichlet", float(alpha), props, attempt)
    raise UserError(f"no Dirichlet(alpha={alpha}) partition of {len(names)} patients into {k} clients gave "
                    f"every client {min_images} images in {max_attempts} draws; raise alpha or use fewer clients")


__all__ = ["PARTITIONS", "Partition", "partition_by_patient", "patient_groups", "patient_labels"]
