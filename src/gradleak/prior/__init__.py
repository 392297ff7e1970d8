"""ROG's learned post-processing: a chest X-ray prior trained on the attacker's auxiliary public images.

    from gradleak.prior import Prior, train_prior
    train_prior(load_dataset("kaggle:../shared/data/chest_xray,split=train"), "prior.safetensors",
                size=64, exclude_patients=attacked_patients)
    prior = Prior.load("prior.safetensors")
    prior.check_disjoint(truth.patient_ids)            # the threat model: no attacked patient trained it
    rec = run_attack("rog", obs, postprocess=prior)    # rec.extras["without_postprocessing"] keeps the raw

The network (:mod:`.network`) learns to undo the degradation model of :mod:`.degrade`; the file format
(:mod:`.fileformat`) is safetensors weights plus a JSON header and is read without unpickling.
The attack package never imports this one: the command line and the experiment layer hand a
:class:`Prior` to :func:`gradleak.attacks.run_attack` as its ``postprocess``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import UserError
from .degrade import DEFAULT_DEGRADATION, calibrate, degrade
from .fileformat import FORMAT, load_prior_file, save_prior
from .network import ARCH, PriorNet
from .train import check_disjoint, select_images, train_prior


class Prior:
    """A loaded prior: call it as ``prior(images, labels)`` (N x 1 x H x W in [0, 1], any H, W >= 4)."""

    def __init__(self, net: PriorNet, header: dict[str, Any], *, device: str = "cpu", source: str = "prior",
                 chunk: int = 64):
        self.net = net.to(device).eval()
        self.header = header
        self.device = device
        self.chunk = int(chunk)
        self.name = f"learned prior {Path(source).name} ({header['arch']}, trained at {header['size']} px)"

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Prior":
        net, header = load_prior_file(path)
        return cls(net, header, device=device, source=str(path))

    @property
    def patients(self) -> list[str]:
        return list(self.header["training"].get("patients", []))

    def check_disjoint(self, attacked_patients: Iterable[str]) -> None:
        check_disjoint(self.patients, attacked_patients, where=self.name)

    def check_images(self, shape: tuple[int, ...]) -> None:
        """UserError unless images of ``shape`` (C x H x W or N x C x H x W) can be post-processed."""
        c, h, w = tuple(shape)[-3:]
        if c != self.net.channels:
            raise UserError(f"{self.name} post-processes {self.net.channels}-channel images, the attack's "
                            f"have {c}")
        if min(h, w) < 4:
            raise UserError(f"{self.name} needs images of at least 4x4 px, got {h}x{w}")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_images(tuple(images.shape))
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.chunk):
                x = images[i:i + self.chunk].to(self.device, torch.float32)
                lab = labels[i:i + self.chunk] if labels is not None and self.net.num_classes else None
                out.append(self.net(x, lab).clamp(0, 1).cpu())
        return torch.cat(out) if out else images.clone()


__all__ = ["Prior", "PriorNet", "save_prior", "load_prior_file", "train_prior", "degrade",
           "calibrate", "check_disjoint", "select_images", "DEFAULT_DEGRADATION", "FORMAT",
           "ARCH"]
