"""The prior file: safetensors weights plus a JSON header. Loading never unpickles.

The safetensors metadata holds one entry, ``gradleak_prior``: a JSON object

    {"format": "gradleak-prior/1", "arch": "unet3", "network": {"width": 24, "num_classes": 0, "channels": 1},
     "size": 64, "training": {"data": {...}, "num_images": ..., "patients": [...], "excluded_patients": ...,
     "steps": ..., "batch_size": ..., "lr": ..., "seed": ..., "final_loss": ...},
     "degradation": {"scale_factor": 4, ...}}

``patients`` lists every patient whose images trained the prior, so anyone can check that the images
attacked are not among them (:func:`gradleak.prior.check_disjoint`). A header with another format, an
unknown architecture, unknown or missing keys, or weights that do not fit the architecture is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import atomic_path
from .degrade import check_degradation
from .network import ARCH, PriorNet

FORMAT = "gradleak-prior/1"
HEADER_KEY = "gradleak_prior"
HEADER_KEYS = {"format", "arch", "network", "size", "training", "degradation"}
NETWORK_KEYS = {"width", "num_classes", "channels"}


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; UserError naming ``path`` when it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a {what} (unreadable safetensors file: {' '.join(str(e).split())})") from None
    return tensors, meta


def check_header(header: Any, where: str) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise UserError(f"{where}: prior header must be a JSON object")
    if header.get("format") != FORMAT:
        raise UserError(f"{where}: unknown prior format {header.get('format')!r} (expected '{FORMAT}')")
    unknown, missing = set(header) - HEADER_KEYS, HEADER_KEYS - set(header)
    if unknown:
        raise UserError(f"{where}: unknown prior header key(s): {', '.join(sorted(unknown))}")
    if missing:
        raise UserError(f"{where}: prior header lacks {', '.join(sorted(missing))}")
    if header["arch"] != ARCH:
        raise UserError(f"{where}: unknown prior architecture {header['arch']!r} (this gradleak knows '{ARCH}')")
    net = header["network"]
    if not isinstance(net, dict) or set(net) != NETWORK_KEYS or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in net.values()):
        raise UserError(f"{where}: prior header 'network' must hold the integers {', '.join(sorted(NETWORK_KEYS))}")
    if net["width"] < 1 or net["channels"] < 1 or net["num_classes"] < 0:
        raise UserError(f"{where}: prior header 'network' has out-of-range values {net}")
    if not isinstance(header["size"], int) or header["size"] < 4:
        raise UserError(f"{where}: prior header 'size' must be an integer >= 4, got {header['size']!r}")
    if not isinstance(header["training"], dict) or not isinstance(header["training"].get("patients", []), list):
        raise UserError(f"{where}: prior header 'training' must be an object with a list of patients")
    try:
        header["degradation"] = check_degradation(header["degradation"])
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{where}: prior header 'degradation': {e}") from None
    return header


def save_prior(path: str | Path, net: PriorNet, header: dict[str, Any]) -> Path:
    """Write ``net`` and ``header`` (``format``, ``arch`` and ``network`` are filled in) atomically."""
    path = Path(path)
    header = {**header, "format": FORMAT, "arch": ARCH, "network": net.config()}
    check_header(json.loads(json.dumps(header)), str(path))
    _atomic_save(dict(net.state_dict()), {HEADER_KEY: json.dumps(header, sort_keys=True)}, path)
    return path


def load_prior_file(path: str | Path) -> tuple[PriorNet, dict[str, Any]]:
    """The network (in eval mode) and header of a prior file."""
    tensors, meta = read_safetensors(path, "prior file")
    where = str(path)
    if HEADER_KEY not in meta:
        raise UserError(f"{where}: not a gradleak prior (no '{HEADER_KEY}' header in the safetensors metadata)")
    try:
        header = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError:
        raise UserError(f"{where}: prior header is not valid JSON") from None
    header = check_header(header, where)
    net = PriorNet(**header["network"])
    expected = net.state_dict()
    if set(tensors) != set(expected):
        extra, lack = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise UserError(f"{where}: weights do not fit the header's network (unexpected {extra[:3]}, missing "
                        f"{lack[:3]})")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape) or not v.dtype.is_floating_point:
            raise UserError(f"{where}: weight '{k}' has shape {tuple(v.shape)} {v.dtype}, the header's network "
                            f"needs {tuple(expected[k].shape)}")
        if not torch.isfinite(v).all():
            raise UserError(f"{where}: weight '{k}' holds non-finite values")
    net.load_state_dict({k: v.float() for k, v in tensors.items()})
    net.eval()
    return net, header
