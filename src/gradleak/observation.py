"""The Observation file: everything an honest-but-curious server receives from one client, and nothing else.

This is the seam between the victim side and the attacker side. ``gradleak capture`` writes one; any
tool may write one (e.g. from a real deployment), and ``gradleak attack`` reads it. The format is
documented in ``docs/observation-format.md``. Files are written with :func:`torch.save` and read with
``torch.load(weights_only=True)``, so loading never runs code from the file.

A file is hostile input: :func:`validate` checks the header's sizes against fixed limits and the
tensors' shapes against the architecture built on the ``meta`` device (which allocates no memory)
before anything is built for real.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .files import atomic_path
from .federated.protocol import ALGORITHMS, ObservedProtocol
from .models import build_from_header, parameter_names

FORMAT = "gradleak-observation/1"
REQUIRED_KEYS = ("format", "model", "global_state", "update", "protocol", "labels", "obfuscation", "data")
MODEL_KEYS = ("arch", "num_classes", "in_channels", "image_size")
PROTOCOL_KEYS = ("algorithm", "update_is", "num_images", "local_steps", "local_lr", "local_batch_size")

#: The largest sizes a header may name: beyond them a file is refused before any model or image is made.
LIMITS = {"model.image_size": 4096, "model.in_channels": 64, "model.num_classes": 100_000,
          "protocol.num_images": 100_000, "model.options": 4096}
#: The most input pixels (num_images x in_channels x image_size^2) an attack may have to hold: 1 GiB as float32.
MAX_INPUT_ELEMENTS = 2 ** 28


@dataclass
class Observation:
    """An in-memory Observation. ``labels`` is None unless the threat model grants them."""

    model: dict[str, Any]
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    protocol: ObservedProtocol
    labels: torch.Tensor | None = None
    obfuscation: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=lambda: {"value_range": [0, 1], "mean": [0.5], "std": [0.5]})
    buffers: dict[str, torch.Tensor] | None = None  # BN running statistics after training, if sent
    meta: dict[str, Any] = field(default_factory=dict)  # free-form provenance (not used by attacks)

    @property
    def num_images(self) -> int:
        return self.protocol.num_images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = int(self.model["image_size"])
        return (int(self.model["in_channels"]), s, s)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": FORMAT,
            "model": dict(self.model),
            "global_state": {k: v.detach().cpu().contiguous() for k, v in self.global_state.items()},
            "update": {k: v.detach().cpu().contiguous() for k, v in self.update.items()},
            "protocol": self.protocol.header(),
            "labels": None if self.labels is None else self.labels.detach().cpu().to(torch.int64),
            "obfuscation": [dict(o) for o in self.obfuscation],
            "data": dict(self.data),
        }
        if self.buffers is not None:
            d["buffers"] = {k: v.detach().cpu().contiguous() for k, v in self.buffers.items()}
        if self.meta:
            d["meta"] = dict(self.meta)
        return d


def save(obs: Observation, path: str | os.PathLike) -> Path:
    """Validate and write ``obs`` atomically (a temporary file renamed into place)."""
    validate(obs.to_dict(), where=str(path))
    with atomic_path(path) as tmp:
        torch.save(obs.to_dict(), tmp)
    return Path(path)


def load(path: str | os.PathLike) -> Observation:
    """Read and validate an Observation file; any problem is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"observation file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable observation file ({first[:160]})") from None
    protocol = validate(raw, where=str(path))
    return Observation(model=raw["model"], global_state=raw["global_state"], update=raw["update"],
                       protocol=protocol, labels=raw["labels"], obfuscation=list(raw["obfuscation"]),
                       data=raw["data"], buffers=raw.get("buffers"), meta=raw.get("meta") or {})


# ------------------------------------------------------------------------------------------- digest
#: What :func:`digest` covers: all but ``update`` and ``obfuscation``, which ``gradleak obfuscate`` rewrites.
DIGEST_KEYS = ("format", "model", "global_state", "protocol", "labels", "data", "buffers", "meta")


def digest(obs: Observation) -> str:
    """SHA-256 (hex) of what ties an observation to the batch of images behind it: the model and weights
    sent, the protocol, the labels, the data normalisation and the provenance (data set, indices).

    A truth file written with an observation carries it, so a truth file is never scored against
    another capture's observation; obfuscating the observation afterwards keeps it.
    """
    d = obs.to_dict()
    h = hashlib.sha256()
    for key in DIGEST_KEYS:
        _feed(h, key)
        _feed(h, d.get(key))
    return h.hexdigest()


def _feed(h, x: Any) -> None:
    """Feed a nested value of an observation dict to ``h`` unambiguously (dict keys in sorted order)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(x, dict):
        h.update(f"dict {len(x)};".encode())
        for k in sorted(x, key=str):
            _feed(h, str(k))
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):
        h.update(f"list {len(x)};".encode())
        for v in x:
            _feed(h, v)
    else:
        if isinstance(x, numbers.Number) and hasattr(x, "item"):  # numpy scalars as Python numbers
            x = x.item()
        try:
            text = json.dumps(x)
        except TypeError:
            text = repr(x)
        h.update(f"{type(x).__name__} {text};".encode())


# ------------------------------------------------------------------------------------------- validation
def _fmt_shape(s) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ")"


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_sizes(raw: dict, bad) -> None:
    """The header's sizes are integers within :data:`LIMITS` (before any model is built)."""
    model = raw["model"]
    for key in ("image_size", "in_channels", "num_classes"):
        v, cap = model[key], LIMITS[f"model.{key}"]
        if not _is_int(v) or not 1 <= int(v) <= cap:
            raise bad(f"model.{key} must be an integer from 1 to {cap}, got {v!r}")
    options = model.get("options")
    if options is not None:
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise bad("model.options must be a mapping of option names to values")
        cap = LIMITS["model.options"]
        for k, v in options.items():
            if v is not None and not isinstance(v, (bool, str)) and not (
                    isinstance(v, numbers.Real) and math.isfinite(v) and abs(v) <= cap):
                raise bad(f"model.options.{k} must be true/false, a text or a number of at most {cap}, got {v!r}")
    n = raw["protocol"]["num_images"]
    if not _is_int(n) or not 1 <= int(n) <= LIMITS["protocol.num_images"]:
        raise bad(f"protocol.num_images must be an integer from 1 to {LIMITS['protocol.num_images']}, got {n!r}")
    pixels = int(n) * int(model["in_channels"]) * int(model["image_size"]) ** 2
    if pixels > MAX_INPUT_ELEMENTS:
        raise bad(f"{n} images of {model['in_channels']} x {model['image_size']} x {model['image_size']} are "
                  f"{pixels} input values, more than the {MAX_INPUT_ELEMENTS} an attack may hold")


def _check_protocol(proto: dict, bad) -> ObservedProtocol:
    """The ``protocol`` header's keys and types; returns it as an :class:`ObservedProtocol`."""
    for k in PROTOCOL_KEYS:
        if k not in proto:
            raise bad(f"missing key 'protocol.{k}'")
    if proto["algorithm"] not in ALGORITHMS:
        raise bad(f"protocol.algorithm is {proto['algorithm']!r}, expected one of {', '.join(ALGORITHMS)}")
    expected_is = "gradient" if proto["algorithm"] == "fedsgd" else "weight_delta"
    if proto["update_is"] != expected_is:
        raise bad(f"protocol.update_is is {proto['update_is']!r} but {proto['algorithm']} sends a {expected_is}")
    n = proto["num_images"]
    k = proto.get("num_clients_averaged", 1)
    if not _is_int(k) or k < 1 or n % k:
        raise bad(f"protocol.num_clients_averaged must be a positive integer dividing num_images ({n}), got {k!r}")
    ipc = proto.get("images_per_client")
    if ipc is not None and (not _is_int(ipc) or ipc * k != n):
        raise bad(f"protocol.images_per_client is {ipc!r} but num_images / num_clients_averaged is {n // k}")
    pec = proto.get("per_example_clip")
    if pec is not None and (isinstance(pec, bool) or not isinstance(pec, (int, float)) or not 0 < pec < math.inf):
        raise bad(f"protocol.per_example_clip must be null or a positive number, got {pec!r}")
    steps, lr, bs = proto["local_steps"], proto["local_lr"], proto["local_batch_size"]
    if not _is_int(steps) or steps < 1:
        raise bad(f"protocol.local_steps must be a positive integer, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
        raise bad(f"protocol.local_lr must be a non-negative number, got {lr!r}")
    if bs is not None and (not _is_int(bs) or bs < 1):
        raise bad(f"protocol.local_batch_size must be null or a positive integer, got {bs!r}")
    if not isinstance(proto.get("sends_buffers", False), bool):
        raise bad(f"protocol.sends_buffers must be true or false, got {proto['sends_buffers']!r}")
    try:
        return ObservedProtocol.from_header(proto)
    except UserError as e:
        raise bad(f"protocol: {e}") from None


def _check_data(data: Any, model: dict, bad) -> None:
    if not isinstance(data, dict):
        raise bad("'data' must be a dict")
    for k in ("mean", "std"):
        if k in data and (not isinstance(data[k], (list, tuple)) or len(data[k]) not in (1, int(model["in_channels"]))):
            raise bad(f"data.{k} must be a list of 1 or in_channels numbers")
    if "std" in data and any(not isinstance(s, (int, float)) or not s > 0 or not math.isfinite(s)
                             for s in data["std"]):
        raise bad("data.std must be positive")


def _template_shapes(raw: dict, bad) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The architecture's state_dict shapes and parameter names, from a model built on the ``meta`` device."""
    model = raw["model"]
    try:
        with torch.device("meta"):
            template = build_from_header(model, raw["data"])
    except UserError as e:
        raise bad(str(e)) from None
    except Exception as e:
        raise bad(f"cannot build model {model.get('arch')!r} from its header ({e})") from None
    return {k: tuple(v.shape) for k, v in template.state_dict().items()}, parameter_names(template)


def _check_tensors(raw: dict, reference: dict[str, tuple[int, ...]], pnames: list[str], bad) -> None:
    arch = raw["model"]["arch"]
    gs = raw["global_state"]
    missing = [k for k in reference if k not in gs]
    extra = [k for k in gs if k not in reference]
    if missing:
        raise bad(f"global_state lacks '{missing[0]}' required by {arch}"
                  + (f" ({len(missing)} names missing)" if len(missing) > 1 else ""))
    if extra:
        raise bad(f"global_state has '{extra[0]}', which {arch} does not have")
    for k, ref in reference.items():
        v = gs[k]
        if not isinstance(v, torch.Tensor):
            raise bad(f"global_state['{k}'] is not a tensor")
        if tuple(v.shape) != ref:
            raise bad(f"global_state['{k}'] has shape {_fmt_shape(v.shape)}, {arch} expects {_fmt_shape(ref)}")
    upd = raw["update"]
    if list(upd) != pnames:
        missing = [k for k in pnames if k not in upd]
        extra = [k for k in upd if k not in pnames]
        if missing:
            raise bad(f"update lacks parameter '{missing[0]}' of {arch}")
        if extra:
            raise bad(f"update has '{extra[0]}', which is not a parameter of {arch}")
        raise bad(f"update keys are not in {arch}'s parameter order")
    for k in pnames:
        v = upd[k]
        if not isinstance(v, torch.Tensor):
            raise bad(f"update['{k}'] is not a tensor")
        if tuple(v.shape) != reference[k]:
            raise bad(f"update['{k}'] has shape {_fmt_shape(v.shape)}, {arch} expects {_fmt_shape(reference[k])}")
        if not v.is_floating_point():
            raise bad(f"update['{k}'] has dtype {v.dtype}, expected a floating-point tensor")
        if not torch.isfinite(v).all():
            raise bad(f"update['{k}'] contains NaN or Inf")
    buffers = raw.get("buffers")
    if buffers is not None:
        if not isinstance(buffers, dict):
            raise bad("'buffers' must be a dict of tensors")
        for k, v in buffers.items():
            if k not in reference or k in pnames:
                raise bad(f"buffers has '{k}', which is not a buffer of {arch}")
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != reference[k]:
                raise bad(f"buffers['{k}'] has the wrong shape or type")


def validate(raw: Any, where: str = "observation") -> ObservedProtocol:
    """Check an Observation dict against the format and its own model header; returns its protocol.

    Sizes are checked against :data:`LIMITS` and shapes against the architecture built on the ``meta``
    device, so a hostile header allocates nothing. Raises :class:`UserError` naming the file and the
    offending key.
    """
    def bad(msg: str) -> UserError:
        return UserError(f"{where}: {msg}")

    if not isinstance(raw, dict):
        raise bad(f"expected a dict at the top level, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise bad(f"format tag is {raw.get('format')!r}, expected {FORMAT!r}")
    for k in REQUIRED_KEYS:
        if k not in raw:
            raise bad(f"missing key '{k}'")
    model = raw["model"]
    if not isinstance(model, dict):
        raise bad("'model' must be a dict")
    for k in MODEL_KEYS:
        if k not in model:
            raise bad(f"missing key 'model.{k}'")
    if not isinstance(raw["protocol"], dict):
        raise bad("'protocol' must be a dict")
    if "num_images" not in raw["protocol"]:
        raise bad("missing key 'protocol.num_images'")
    _check_sizes(raw, bad)
    protocol = _check_protocol(raw["protocol"], bad)
    _check_data(raw["data"], model, bad)
    for section in ("global_state", "update"):
        if not isinstance(raw[section], dict):
            raise bad(f"'{section}' must be a dict of tensors")
    reference, pnames = _template_shapes(raw, bad)
    _check_tensors(raw, reference, pnames, bad)
    n = protocol.num_images
    labels = raw["labels"]
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
            raise bad("labels must be None or a 1-D integer tensor")
        if labels.numel() != n:
            raise bad(f"labels has {labels.numel()} entries but protocol.num_images is {n}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= int(model["num_classes"])):
            raise bad(f"labels must lie in [0, {int(model['num_classes']) - 1}]")
    if not isinstance(raw["obfuscation"], list) or not all(isinstance(o, dict) and "name" in o
                                                           for o in raw["obfuscation"]):
        raise bad("'obfuscation' must be a list of dicts, each with a 'name'")
    return protocol
