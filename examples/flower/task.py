"""What the hospitals and the server of this example share: the settings, the data, the model.

Settings come from ``[tool.flwr.app.config]`` of pyproject.toml under ``flwr run``; ``run.py`` passes its
own to the apps it builds. Each hospital holds the chest X-rays of its own patients (the training
patients, split by patient among the hospitals); the server holds the held-out patients for evaluation.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch

from gradleak.data import load_dataset, split_by_patient
from gradleak.federated import Protocol
from gradleak.federated.partition import partition_by_patient
from gradleak.models import build

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "num-hospitals": 3,  # must equal the number of Flower nodes (num-supernodes)
    "data": "phantoms:n=96",  # or e.g. "kaggle:/data/chest_xray,split=train"
    "image-size": 32,
    "arch": "lenet5",
    "batch-size": 8,  # images a hospital trains on in a round
    "local-steps": 1,
    "local-lr": 0.1,
    "holdout": 0.2,  # fraction of the patients the server keeps for evaluation
    "dp-noise": 0.0,  # > 0: Flower's central DP (server-side clipping to dp-clip, noise on the aggregate)
    "dp-clip": 1.0,
    "capture-dir": "captured",
    "seed": 0,
}


def settings(run_config: Mapping[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults, under the app's run config (``context.run_config``), under ``overrides``."""
    return {**DEFAULTS, **dict(run_config), **(overrides or {})}


def protocol(cfg: dict[str, Any]) -> Protocol:
    """What each hospital computes in a round: local SGD steps on its batch, sent as new weights."""
    return Protocol("fedavg", local_steps=int(cfg["local-steps"]), local_lr=float(cfg["local-lr"]))


def model_header(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"arch": cfg["arch"], "num_classes": 2, "in_channels": 1, "image_size": int(cfg["image-size"])}


def new_model(cfg: dict[str, Any]) -> torch.nn.Module:
    h = model_header(cfg)
    return build(h["arch"], h["num_classes"], h["in_channels"], h["image_size"], seed=int(cfg["seed"]))


@lru_cache(maxsize=4)
def _cached_split(data: str, size: int, hospitals: int, holdout: float, seed: int):
    ds = load_dataset(data, size=size)
    held_out, train = split_by_patient(ds, holdout, seed=seed)
    train = np.asarray(train, dtype=np.int64)
    part = partition_by_patient(ds.labels[train], [ds.patient_ids[i] for i in train], hospitals, seed=seed)
    return ds, [train[c] for c in part.clients], np.asarray(held_out, dtype=np.int64)


def _split(cfg: dict[str, Any]):
    """(data set, each hospital's indices, the held-out indices), read once per process."""
    return _cached_split(str(cfg["data"]), int(cfg["image-size"]), int(cfg["num-hospitals"]), float(cfg["holdout"]),
                         int(cfg["seed"]))


def _images(cfg: dict[str, Any], indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    ds = _split(cfg)[0]
    return ds.load(indices.tolist()), torch.as_tensor(ds.labels[indices], dtype=torch.int64)


def hospital_indices(cfg: dict[str, Any], hospital: int) -> np.ndarray:
    """The data set indices of one hospital's images (its patients only)."""
    return _split(cfg)[1][hospital]


def round_batch(cfg: dict[str, Any], hospital: int, server_round: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images a hospital trains on in a round: ``batch-size`` of its own, drawn afresh each round."""
    idx = hospital_indices(cfg, hospital)
    rng = np.random.default_rng([int(cfg["seed"]), server_round, hospital])
    chosen = rng.choice(len(idx), size=min(int(cfg["batch-size"]), len(idx)), replace=False)
    return _images(cfg, idx[np.sort(chosen)])


def held_out(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's evaluation images (patients no hospital holds)."""
    return _images(cfg, _split(cfg)[2])
