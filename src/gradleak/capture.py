"""Victim side, end to end: a batch of private images -> the client's (obfuscated) update -> an Observation.

This is the only place where images and the update meet. The ground truth is returned separately, to be
written to ``truth.npz``, which attacks never read.

:func:`capture_batch` is the one capture path of ``gradleak capture``, an experiment cell and the
calibration of a prior: data set, batch choice, victim model (a model file or a seeded one), client(s),
obfuscation, provenance. :func:`capture` is its core on images already in memory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .files import atomic_path
from . import obfuscation, observation
from .errors import UserError
from .federated import Protocol, check_finite, check_sent, client_update
from .federated.arithmetic import mean_buffers, mean_update
from .federated.protocol import client_slices
from .models import build
from .observation import Observation

#: Images per client when neither indices nor a batch size are given (CLI and experiment configs).
DEFAULT_BATCH_SIZE = 4


@dataclass
class Truth:
    """What only the victim knows: the images, their labels, who they belong to.

    ``observation_digest`` is :func:`gradleak.observation.digest` of the observation captured with
    them (None in truth files written before it was recorded)."""

    images: torch.Tensor
    labels: torch.Tensor
    patient_ids: list[str]
    names: list[str]
    indices: list[int]
    observation_digest: str | None = None


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
    obfuscated updates (:func:`gradleak.federated.arithmetic.mean_update`). Returns the Observation and
    the communication cost in bits of one client's update (the mean over clients).
    """
    if images.dim() != 4:
        raise UserError(f"expected images N x C x H x W, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if h != w:
        raise UserError(f"images must be square, got {h}x{w}")
    observed = protocol.observed(n)
    specs = list(obfuscations)
    obfuscation.resolve_all(specs)  # report a bad spec before any work
    model = build(arch, num_classes, c, h, seed=model_seed, mean=list(mean), std=list(std),
                  options=dict(options) if options else None)
    if global_state is not None:
        model.load_state_dict(global_state)
    sent = {name: v.detach().clone() for name, v in model.state_dict().items()}
    check_sent(sent)
    generator = torch.Generator().manual_seed(int(obfuscation_seed))
    context = obfuscation.Context.from_protocol(observed)
    updates, records, costs, buffers = [], [], [], []
    slices = client_slices(n, observed.num_clients_averaged)
    for i, sl in enumerate(slices):
        update, buffers_after = client_update(model, sent, images[sl], labels[sl], protocol)
        check_finite(update, protocol, "the client's" if len(slices) == 1 else f"client {i + 1} of {len(slices)}'s")
        update, recs, bits = obfuscation.apply(specs, update, generator, context)
        updates.append(update)
        records.append(recs)
        costs.append(bits)
        buffers.append(buffers_after)
    header = {"arch": arch, "num_classes": int(num_classes), "in_channels": int(c), "image_size": int(h)}
    if options:
        header["options"] = dict(options)
    obs = Observation(
        model=header, global_state=sent, update=mean_update(updates), protocol=observed,
        labels=labels.clone().to(torch.int64) if labels_known else None,
        obfuscation=obfuscation.merge_client_records(records),
        data={"value_range": [0, 1], "mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        buffers=mean_buffers(buffers) if (protocol.sends_buffers and buffers[0]) else None,
        meta=dict(meta or {}),
    )
    return obs, int(round(sum(costs) / len(costs)))


# ------------------------------------------------------------------------------------------ one capture path
def choose_indices(n_available: int, batch_size: int, indices: list[int] | None, seed: int) -> list[int]:
    """``indices`` checked against the data set, or ``batch_size`` distinct indices drawn with ``seed`` (sorted)."""
    if indices is not None:
        bad = [i for i in indices if not 0 <= int(i) < n_available]
        if bad:
            raise UserError(f"index {bad[0]} is outside the data set (0..{n_available - 1})")
        return [int(i) for i in indices]
    if batch_size > n_available:
        raise UserError(f"batch_size {batch_size} is larger than the data set ({n_available} images)")
    rng = np.random.default_rng(int(seed))
    return sorted(int(i) for i in rng.choice(n_available, size=batch_size, replace=False))


@dataclass
class Captured:
    """One capture: what the server received, what only the victim knows, the update's cost in bits and the
    data set the batch came from."""

    observation: Observation
    truth: Truth
    bits: int
    dataset: Any

    def save(self, observation_path: str | os.PathLike, truth_path: str | os.PathLike) -> None:
        """Write the observation file and its truth file (which carries the observation's digest); when the
        truth file cannot be written, an observation file this call created is removed again."""
        path = Path(observation_path)
        new = not path.exists()
        observation.save(self.observation, path)
        try:
            save_truth(self.truth, truth_path)
        except BaseException:
            if new:
                path.unlink(missing_ok=True)
            raise


def capture_batch(data: Any, *, protocol: Protocol, indices: list[int] | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, size: int | None = None,
                  arch: str | None = None, num_classes: int | None = None, options: dict[str, Any] | None = None,
                  model_state: str | os.PathLike | None = None, global_state: dict[str, torch.Tensor] | None = None,
                  model_seed: int = 0, labels_known: bool = False, obfuscations: Sequence[Any] = (),
                  mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                  where: str = "the command line and data") -> Captured:
    """Capture one batch of ``data`` (a data set spec, or a data set already loaded) as the victim's client(s).

    The batch is ``indices``, or ``batch_size`` images per client drawn with ``seed`` (which also seeds the
    obfuscations' noise); K = ``protocol.num_clients_averaged`` clients share it evenly. The victim is the
    model file ``model_state`` (``gradleak utility``'s ``model.pt``): its architecture, options, weights
    and normalisation are used, ``arch``/``num_classes``/``options`` and the images must agree with it
    (a one-line error naming ``where`` otherwise), and images are loaded at its size unless ``size`` is
    given. Without it the victim is ``arch`` (default lenet5) with ``num_classes`` (default 2), weights
    ``global_state`` or drawn from ``model_seed``. ``meta`` records the data set and indices (and the
    model file).
    """
    from .data import ImageDataset, load_dataset
    from .models.checkpoint import check_matches, load_model

    specs = list(obfuscations)
    obfuscation.resolve_all(specs)  # a bad spec fails before the data are read
    ckpt = load_model(model_state) if model_state else None
    if isinstance(data, ImageDataset):
        ds = data
    else:
        ds = load_dataset(data, size=size or (int(ckpt["model"]["image_size"]) if ckpt else None))
    k = protocol.num_clients_averaged
    idx = choose_indices(len(ds), batch_size * k, indices, seed)
    if len(idx) % k:
        raise UserError(f"the indices give {len(idx)} images, which {k} clients cannot share evenly")
    batch = ds.batch(idx)
    meta: dict[str, Any] = {"data": ds.describe(), "indices": idx}
    if ckpt is not None:
        check_matches(ckpt, where=where, arch=arch, num_classes=num_classes, image_size=int(batch.images.shape[-1]),
                      in_channels=int(batch.images.shape[1]), options=options)
        arch, num_classes, options = ckpt["model"]["arch"], ckpt["model"]["num_classes"], ckpt["model"].get("options")
        global_state, mean, std = ckpt["state_dict"], ckpt["data"]["mean"], ckpt["data"]["std"]
        meta.update(model_state=str(model_state), model_round=ckpt["round"])
    num_classes = num_classes or 2
    if len(batch.labels) and int(batch.labels.max()) >= num_classes:
        raise UserError(f"{ds.describe().get('source')} data: label {int(batch.labels.max())} is out of range for a "
                        f"model of {num_classes} classes (labels 0 to {num_classes - 1}); set the number of classes")
    obs, bits = capture(batch.images, batch.labels, arch=arch or "lenet5", protocol=protocol,
                        num_classes=num_classes, model_seed=model_seed, global_state=global_state,
                        labels_known=labels_known, obfuscations=specs, obfuscation_seed=seed, mean=mean, std=std,
                        options=options, meta=meta)
    truth = Truth(batch.images, batch.labels, batch.patient_ids, batch.names, idx,
                  observation_digest=observation.digest(obs))
    return Captured(obs, truth, bits, ds)


# ------------------------------------------------------------------------------------------ truth files
def save_truth(truth: Truth, path: str | os.PathLike) -> Path:
    arrays = {"images": truth.images.cpu().numpy().astype(np.float32),
              "labels": truth.labels.cpu().numpy().astype(np.int64),
              "patient_ids": np.array(truth.patient_ids, dtype=str), "names": np.array(truth.names, dtype=str),
              "indices": np.array(truth.indices, dtype=np.int64)}
    if truth.observation_digest is not None:
        arrays["observation_digest"] = np.array(truth.observation_digest, dtype=str)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return Path(path)


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def check_truth(truth: Truth, obs: Observation, *, truth_path: str | os.PathLike,
                observation_path: str | os.PathLike = "the observation",
                warn: Callable[[str], None] | None = _warn) -> None:
    """Refuse (one-line :class:`UserError`) a truth file whose images do not fit ``obs`` or whose digest is not
    ``obs``'s; a truth file without a digest (written by an older gradleak) is accepted with one warning line
    through ``warn``."""
    if tuple(truth.images.shape) != (obs.num_images, *obs.image_shape):
        raise UserError(f"{truth_path}: images have shape {tuple(truth.images.shape)} but {observation_path} "
                        f"holds {obs.num_images} images of {obs.image_shape}")
    if truth.observation_digest is None:
        if warn is not None:
            warn(f"gradleak: warning: {truth_path} records no digest of its observation (an older truth file), "
                 f"so it cannot be checked against {observation_path}")
        return
    if truth.observation_digest != observation.digest(obs):
        raise UserError(f"{truth_path} belongs to another capture than {observation_path} (the observation "
                        f"digest it records differs); pass the truth file written with that observation")


def load_truth(path: str | os.PathLike, obs: Observation | None = None, *,
               observation_path: str | os.PathLike = "the observation") -> Truth:
    """Read a truth file; with ``obs`` (read from ``observation_path``), check that it was written with that
    observation (:func:`check_truth`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"truth file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise UserError(f"{path}: a truth file needs 'images' and 'labels'")
            images = torch.from_numpy(np.asarray(z["images"], dtype=np.float32))
            raw_labels = np.asarray(z["labels"])
            whole = np.isfinite(raw_labels) & (raw_labels == np.round(raw_labels)) if raw_labels.dtype.kind == "f" else True
            if not np.all(whole):
                raise UserError(f"{path}: 'labels' must be whole class numbers")
            labels = torch.from_numpy(raw_labels.astype(np.int64))
            pids = [str(p) for p in z["patient_ids"]] if "patient_ids" in z else [""] * len(labels)
            names = [str(p) for p in z["names"]] if "names" in z else [""] * len(labels)
            idx = [int(i) for i in z["indices"]] if "indices" in z else list(range(len(labels)))
            dig = str(z["observation_digest"]) if "observation_digest" in z else None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable truth .npz file ({type(e).__name__})") from None
    if images.dim() != 4:
        raise UserError(f"{path}: 'images' must be N x C x H x W, got shape {tuple(images.shape)}")
    if labels.dim() != 1 or len(labels) != len(images):
        raise UserError(f"{path}: 'labels' must hold one class per image ({len(images)}), got shape "
                        f"{tuple(labels.shape)}")
    if not torch.isfinite(images).all():
        raise UserError(f"{path}: 'images' contain NaN or Inf")
    truth = Truth(images=images, labels=labels, patient_ids=pids, names=names, indices=idx, observation_digest=dig)
    if obs is not None:
        check_truth(truth, obs, truth_path=path, observation_path=observation_path)
    return truth
