"""Victim side, end to end: a batch of private images -> the client's (obfuscated) update -> an Observation.

This is the only place where images and the update meet. The ground truth is returned separately, to be
written to ``truth.npz``, which attacks never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .files import atomic_path
from . import obfuscation
from .errors import UserError
from .federated import Protocol, client_update
from .federated.protocol import client_slices
from .models import build
from .observation import Observation


@dataclass
class Truth:
    """What only the victim knows: the images, their labels, who they belong to."""

    images: torch.Tensor
    labels: torch.Tensor
    patient_ids: list[str]
    names: list[str]
    indices: list[int]


def capture(images: torch.Tensor, labels: torch.Tensor, *, arch: str, protocol: Protocol,
            num_classes: int = 2, model_seed: int = 0, global_state: dict[str, torch.Tensor] | None = None,
            labels_known: bool = False, obfuscations: Sequence[Any] = (),
            obfuscation_seed: int = 0, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
            meta: dict[str, Any] | None = None, options: dict[str, Any] | None = None
            ) -> tuple[Observation, int]:
    """Run the client(s) on ``images`` and package what the server receives.

    ``global_state`` is the model the server sent (a fresh model initialised from ``model_seed`` when
    None), e.g. a trained model read with :func:`gradleak.models.checkpoint.load_model`. ``options`` are
    the architecture's options (e.g. ``{"width": 8}`` for convnet). With ``protocol.num_clients_averaged``
    K > 1, ``images`` holds the K clients' batches one after the other (K*B images); each client computes
    its update on its B images and applies the ``obfuscations`` itself (noise drawn from one generator
    seeded with ``obfuscation_seed``, client after client), and the observation holds the mean of the K
    obfuscated updates. Returns the Observation and the communication cost in bits of one client's update
    (the mean over clients).
    """
    if images.dim() != 4:
        raise UserError(f"expected images N x C x H x W, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if h != w:
        raise UserError(f"images must be square, got {h}x{w}")
    k = int(protocol.num_clients_averaged)
    slices = client_slices(n, k)
    header_protocol = protocol.header(n)
    specs = list(obfuscations)
    obfuscation.resolve_all(specs)  # report a bad spec before any work
    model = build(arch, num_classes, c, h, seed=model_seed, mean=list(mean), std=list(std),
                  options=dict(options) if options else None)
    if global_state is not None:
        model.load_state_dict(global_state)
    sent = {name: v.detach().clone() for name, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(int(obfuscation_seed))
    context = obfuscation.Context.from_protocol(header_protocol)
    updates, records, costs, buffers = [], [], [], []
    for sl in slices:
        update, buffers_after = client_update(model, sent, images[sl], labels[sl], protocol)
        update, recs, bits = obfuscation.apply(specs, update, generator, context)
        updates.append(update)
        records.append(recs)
        costs.append(bits)
        buffers.append(buffers_after)
    update = updates[0] if k == 1 else {name: torch.stack([u[name] for u in updates]).mean(0) for name in updates[0]}
    buffers_after = buffers[0] if k == 1 else {
        name: (torch.stack([b[name] for b in buffers]).mean(0) if buffers[0][name].is_floating_point()
               else buffers[0][name]) for name in buffers[0]}
    header = {"arch": arch, "num_classes": int(num_classes), "in_channels": int(c), "image_size": int(h)}
    if options:
        header["options"] = dict(options)
    obs = Observation(
        model=header, global_state=sent, update=update, protocol=header_protocol,
        labels=labels.clone().to(torch.int64) if labels_known else None,
        obfuscation=obfuscation.merge_client_records(records),
        data={"value_range": [0, 1], "mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        buffers=buffers_after if (protocol.sends_buffers and buffers_after) else None,
        meta=dict(meta or {}),
    )
    return obs, int(round(sum(costs) / len(costs)))


def save_truth(truth: Truth, path: str | os.PathLike) -> Path:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, images=truth.images.cpu().numpy().astype(np.float32),
                            labels=truth.labels.cpu().numpy().astype(np.int64),
                            patient_ids=np.array(truth.patient_ids, dtype=str),
                            names=np.array(truth.names, dtype=str),
                            indices=np.array(truth.indices, dtype=np.int64))
    return Path(path)


def load_truth(path: str | os.PathLike) -> Truth:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"truth file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise UserError(f"{path}: a truth file needs 'images' and 'labels'")
            images = torch.from_numpy(np.asarray(z["images"], dtype=np.float32))
            labels = torch.from_numpy(np.asarray(z["labels"]).astype(np.int64))
            pids = [str(p) for p in z["patient_ids"]] if "patient_ids" in z else [""] * len(labels)
            names = [str(p) for p in z["names"]] if "names" in z else [""] * len(labels)
            idx = [int(i) for i in z["indices"]] if "indices" in z else list(range(len(labels)))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable truth .npz file ({type(e).__name__})") from None
    if images.dim() != 4:
        raise UserError(f"{path}: 'images' must be N x C x H x W, got shape {tuple(images.shape)}")
    return Truth(images=images, labels=labels, patient_ids=pids, names=names, indices=idx)
