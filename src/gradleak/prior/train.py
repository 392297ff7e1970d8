"""Training the prior on the attacker's auxiliary images: deterministic by seed, resumable.

Step ``t`` draws its batch and its degradations from a generator seeded by ``(seed, t)`` alone and the
learning rate follows a fixed cosine schedule, so a run resumed from its checkpoint (``OUT.ckpt``, the
network and Adam's state in safetensors, written every ``checkpoint_every`` steps and removed when the
prior file is written) ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import UserError
from .degrade import check_degradation, degrade
from .fileformat import _atomic_save, read_safetensors, save_prior
from .network import PriorNet

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "gradleak_prior_checkpoint"
#: training losses: L1 (robust, sharper edges) or L2 (what PSNR measures)
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l1": F.l1_loss, "l2": F.mse_loss}


def select_images(patient_ids: list[str], exclude_patients: Iterable[str] = (), limit: int | None = None,
                  seed: int = 0) -> list[int]:
    """Indices of the images whose patient is not excluded; at most ``limit`` of them, whole patients
    first in a seeded order (so a limit never splits a patient's images by chance)."""
    excluded = {str(p) for p in exclude_patients}
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patient_ids):
        if str(p) not in excluded:
            groups.setdefault(str(p), []).append(i)
    order = sorted(groups)
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(int(seed))).tolist()
    chosen: list[int] = []
    for j in perm:
        members = groups[order[j]]
        if limit is not None and len(chosen) + len(members) > limit:
            if len(chosen) >= limit:
                break
            continue
        chosen.extend(members)
    return sorted(chosen)


def check_disjoint(prior_patients: Iterable[str], attacked_patients: Iterable[str], where: str = "prior") -> None:
    """UserError when any attacked patient's images trained the prior (the threat model forbids it)."""
    overlap = sorted({str(p) for p in prior_patients} & {str(p) for p in attacked_patients})
    if overlap:
        more = f" and {len(overlap) - 5} more" if len(overlap) > 5 else ""
        raise UserError(f"{where} was trained on images of attacked patient(s) {', '.join(overlap[:5])}{more}: "
                        f"train it with these patients excluded")


def _lr(step: int, steps: int, lr: float) -> float:
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


def _batch(clean: torch.Tensor, labels: torch.Tensor, step: int, seed: int, batch_size: int,
           degradation: dict[str, Any], crop: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Degraded and clean images of step ``step``: whole images are degraded, then (with ``crop``) one
    random ``crop`` x ``crop`` window per image is kept, which makes a step cheaper at the same variety."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    idx = torch.randint(len(clean), (batch_size,), generator=g)
    x = clean[idx]
    y = degrade(x, degradation, g)
    h, w = x.shape[-2:]
    if crop is not None and crop < min(h, w):
        top = torch.randint(h - crop + 1, (batch_size,), generator=g).tolist()
        left = torch.randint(w - crop + 1, (batch_size,), generator=g).tolist()
        x = torch.stack([x[i, :, t:t + crop, l:l + crop] for i, (t, l) in enumerate(zip(top, left))])
        y = torch.stack([y[i, :, t:t + crop, l:l + crop] for i, (t, l) in enumerate(zip(top, left))])
    return y, x, labels[idx]


def _save_checkpoint(path: Path, net: PriorNet, opt: torch.optim.Optimizer, step: int, key: str,
                     losses: list[float]) -> None:
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    for i, p in enumerate(net.parameters()):
        st = opt.state.get(p)
        if st:
            tensors[f"adam.{i}.exp_avg"] = st["exp_avg"]
            tensors[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"]
            tensors[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    _atomic_save(tensors, {CHECKPOINT_KEY: json.dumps({"step": step, "key": key, "losses": losses})}, path)


def _load_checkpoint(path: Path, net: PriorNet, opt: torch.optim.Optimizer, key: str) -> tuple[int, list[float]]:
    tensors, meta = read_safetensors(path, "prior checkpoint")
    try:
        info = json.loads(meta[CHECKPOINT_KEY])
        step, losses = int(info["step"]), [float(v) for v in info["losses"]]
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path}: not a gradleak prior checkpoint; delete it to start afresh") from None
    if info.get("key") != key:
        raise UserError(f"{path}: checkpoint of a run with other data or settings; delete it or rerun with "
                        f"the same ones")
    net.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(net.parameters()):
        if f"adam.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"adam.{i}.step"].reshape(()).clone(),
                            "exp_avg": tensors[f"adam.{i}.exp_avg"].clone(),
                            "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].clone()}
    return step, losses


def train_prior(dataset, out: str | Path, *, size: int | None = None, exclude_patients: Iterable[str] = (),
                limit: int | None = None, degradation: dict[str, Any] | None = None, steps: int = 1500,
                batch_size: int = 32, crop: int | None = 32, lr: float = 2e-3, seed: int = 0, width: int = 16,
                num_classes: int = 0, loss: str = "l1", calibration: dict[str, Any] | None = None,
                checkpoint_every: int = 100, stop_after: int | None = None, progress: bool = True
                ) -> dict[str, Any] | None:
    """Train a prior on ``dataset``'s images (patients in ``exclude_patients`` left out) and write it to
    ``out``. ``dataset`` is any gradleak data set (``patient_ids``, ``labels``, ``load``, ``describe``).
    ``calibration`` (how the degradation settings were fitted, e.g. by
    :func:`gradleak.experiment.calibrate.calibrate_like`) is recorded in the header's ``training`` entry.
    Returns the prior's header; with ``stop_after``, a call that reaches that many steps without
    finishing writes a checkpoint and returns None (the next call resumes: training in slices)."""
    out = Path(out)
    if steps < 1 or batch_size < 1 or not lr > 0 or width < 1 or checkpoint_every < 1:
        raise UserError("prior training: steps, batch size, width and checkpoint interval must be >= 1 and lr > 0")
    if loss not in LOSSES:
        raise UserError(f"prior training: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    loss_fn = LOSSES[loss]
    try:
        degradation = check_degradation(degradation or {})
    except ValueError as e:
        raise UserError(f"prior training: {e}") from None
    excluded = sorted({str(p) for p in exclude_patients})
    idx = select_images(list(dataset.patient_ids), excluded, limit, seed)
    if not idx:
        raise UserError("prior training: no images left after excluding patients")
    clean = dataset.load(idx)
    if clean.shape[1] != 1:
        raise UserError(f"prior training: the prior is for grey images, the data have {clean.shape[1]} channels")
    size = int(size or clean.shape[-1])
    if tuple(clean.shape[-2:]) != (size, size):
        clean = F.interpolate(clean, size=(size, size), mode="area")
    labels = torch.as_tensor(dataset.labels[idx], dtype=torch.int64)
    if num_classes and int(labels.max()) >= num_classes:
        raise UserError(f"prior training: labels go up to {int(labels.max())} but num_classes is {num_classes}")
    patients = sorted({str(dataset.patient_ids[i]) for i in idx})
    leaked = sorted(set(patients) & set(excluded))
    assert not leaked, leaked  # select_images never keeps an excluded patient
    if crop is not None and int(crop) < 4:
        raise UserError(f"prior training: crop must be >= 4 px, got {crop}")
    crop = None if crop is None or int(crop) >= size else int(crop)
    settings = {"steps": int(steps), "batch_size": int(batch_size), "crop": crop, "lr": float(lr),
                "seed": int(seed), "limit": limit, "loss": loss}
    key = hashlib.sha1(json.dumps({"s": settings, "w": width, "c": num_classes, "d": degradation, "idx": idx,
                                   "size": size, "data": dataset.describe()}, sort_keys=True,
                                  default=str).encode()).hexdigest()

    torch.manual_seed(int(seed))  # the network's initial weights
    net = PriorNet(width=width, num_classes=num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ckpt = out.with_name(out.name + ".ckpt")
    start, losses = 0, []
    if ckpt.exists():
        start, losses = _load_checkpoint(ckpt, net, opt, key)
        log.info(f"resuming from {ckpt} at step {start}")

    # a fixed evaluation batch: the loss before and after training, on the same degraded images
    ev_in, ev_clean, ev_lab = _batch(clean, labels, -1, seed, min(64, 4 * batch_size), degradation)

    def eval_loss() -> float:
        net.eval()
        with torch.no_grad():
            loss = float(loss_fn(net(ev_in, ev_lab if num_classes else None), ev_clean))
        net.train()
        return loss

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, disable=not progress, desc="prior", unit="step", dynamic_ncols=True)
    net.train()
    ema = None
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x_in, x, lab = _batch(clean, labels, step, seed, batch_size, degradation, crop)
        batch_loss = loss_fn(net(x_in, lab if num_classes else None), x)
        opt.zero_grad(set_to_none=True)
        batch_loss.backward()
        opt.step()
        v = float(batch_loss.detach())
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        if (step + 1) % max(1, steps // 50) == 0:
            losses.append(round(ema, 6))
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}")
        if step + 1 < steps and ((step + 1) % checkpoint_every == 0 or step + 1 == stop_after):
            _save_checkpoint(ckpt, net, opt, step + 1, key, losses)
        if stop_after is not None and step + 1 == stop_after and step + 1 < steps:
            bar.close()
            return None
    bar.close()
    net.eval()
    with torch.no_grad():
        identity = float(loss_fn(ev_in, ev_clean))
    header = {
        "size": size,
        "training": {"data": dataset.describe(), "num_images": len(idx), "num_patients": len(patients),
                     "patients": patients, "excluded_patients": excluded, **settings,
                     "eval_loss_identity": round(identity, 6), "eval_loss": round(eval_loss(), 6),
                     "loss_curve": losses, **({"calibration": calibration} if calibration else {})},
        "degradation": degradation,
    }
    save_prior(out, net, header)
    ckpt.unlink(missing_ok=True)
    return header
