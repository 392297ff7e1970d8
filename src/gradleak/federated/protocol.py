"""What a federated client computes, written once as pure functions of explicit tensors.

The victim's client (:mod:`gradleak.federated.client`) and the attacker's simulation of that client
(:mod:`gradleak.attacks.simulate`) both call :func:`local_update`, so the attacker models exactly the
computation the protocol defines, and nothing ever mutates the weights the server sent.

Functions here take a module only as a *template* for :func:`torch.func.functional_call`; its own
parameters are never read or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import UserError
from ..models import has_batch_norm

ALGORITHMS = ("fedsgd", "fedavg")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Protocol:
    """The federated protocol one client follows in one round.

    ``fedsgd``: the client sends the gradient of the mean cross-entropy on its batch.
    ``fedavg``: the client runs ``local_steps`` SGD steps with ``local_lr`` and sends the weight delta
    ``w_after - w_before``. Mini-batches of ``local_batch_size`` are taken in the batch's order and
    cycled (step t uses mini-batch t mod ceil(B / local_batch_size)); ``None`` means full batch.
    ``sends_buffers``: the client also returns its BatchNorm running statistics after training.

    ``per_example_clip`` (DP-SGD style, Abadi et al. 2016, as Opacus does it): every gradient the client
    computes is replaced by ``(1/b) * sum_i g_i * min(1, C / (||g_i|| + 1e-6))`` over the b images of
    the (mini-)batch, where g_i is image i's gradient of its cross-entropy with respect to all parameters
    (one flat L2 norm over the whole parameter vector, per-sample gradients via ``torch.func.vmap``) and
    C = ``per_example_clip``. Under FedSGD the update's L2 sensitivity to one image is then C / B; the
    noise comes from the ``gaussian`` obfuscation. Under FedAvg every local step uses the clipped mean
    gradient (no per-step noise). Needs a model without BatchNorm (BatchNorm mixes the images of a batch).

    ``num_clients_averaged`` (K): K clients, each with its own batch of B images, start from the same
    global model; each computes (and obfuscates) its own update, and the server sees only their mean
    (as under secure aggregation). The observation then holds K*B images; client k has images
    k*B .. (k+1)*B - 1 (:func:`client_slices`).
    """

    algorithm: str = "fedsgd"
    local_steps: int = 1
    local_lr: float = 0.0
    local_batch_size: int | None = None
    sends_buffers: bool = False
    per_example_clip: float | None = None
    num_clients_averaged: int = 1

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"unknown protocol algorithm '{self.algorithm}' (use one of {', '.join(ALGORITHMS)})")
        if self.algorithm == "fedavg":
            if int(self.local_steps) < 1:
                raise UserError(f"fedavg needs local_steps >= 1, got {self.local_steps}")
            if not float(self.local_lr) > 0:
                raise UserError(f"fedavg needs local_lr > 0, got {self.local_lr}")
        if self.local_batch_size is not None and int(self.local_batch_size) < 1:
            raise UserError(f"local_batch_size must be >= 1, got {self.local_batch_size}")
        if self.per_example_clip is not None and (isinstance(self.per_example_clip, bool) or not isinstance(
                self.per_example_clip, (int, float)) or not 0 < float(self.per_example_clip) < float("inf")):
            raise UserError(f"per_example_clip must be a positive number, got {self.per_example_clip!r}")
        k = self.num_clients_averaged
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"num_clients_averaged must be a positive integer, got {k!r}")

    @property
    def update_is(self) -> str:
        return "gradient" if self.algorithm == "fedsgd" else "weight_delta"

    def observed(self, num_images: int) -> "ObservedProtocol":
        """This protocol as an Observation records it, for ``num_images`` images of all clients (K*B)."""
        return ObservedProtocol(**{f.name: getattr(self, f.name) for f in fields(Protocol)},
                                num_images=int(num_images))

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "Protocol":
        """The client's protocol of an Observation's ``protocol`` header."""
        return ObservedProtocol.from_header(header).client()


#: The keys of an Observation's ``protocol`` header, in the order they are written.
HEADER_KEYS = ("algorithm", "local_steps", "local_lr", "local_batch_size", "sends_buffers", "per_example_clip",
               "num_clients_averaged", "update_is", "num_images", "images_per_client")


@dataclass(frozen=True)
class ObservedProtocol(Protocol):
    """The protocol of an Observation: the client's :class:`Protocol` and ``num_images``, the images
    behind the update (K*B for K clients of B images averaged).

    Canonical: FedSGD has ``local_steps`` 1 and ``local_lr`` 0, and a ``local_batch_size`` equal to the
    client's batch is None (full batch). ``other`` keeps header keys gradleak does not know (a file
    written by another tool), so they are written back unchanged. An Observation's ``protocol`` is
    a dict only on disk (:meth:`header`, :meth:`from_header`).
    """

    num_images: int = field(kw_only=True)
    other: dict[str, Any] = field(default_factory=dict, kw_only=True, hash=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        n = self.num_images
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"num_images must be a positive integer, got {n!r}")
        if n % self.num_clients_averaged:
            raise UserError(f"{n} images cannot be split evenly among num_clients_averaged="
                            f"{self.num_clients_averaged} clients")
        if self.algorithm == "fedsgd":
            object.__setattr__(self, "local_steps", 1)
            object.__setattr__(self, "local_lr", 0.0)
        if self.local_batch_size is not None and int(self.local_batch_size) == self.images_per_client:
            object.__setattr__(self, "local_batch_size", None)

    @property
    def images_per_client(self) -> int:
        """B, the batch of one client."""
        return self.num_images // self.num_clients_averaged

    def client(self) -> Protocol:
        """The protocol each client followed (without the image count)."""
        return Protocol(**{f.name: getattr(self, f.name) for f in fields(Protocol)})

    def header(self) -> dict[str, Any]:
        """The ``protocol`` entry of an Observation file (plain values only)."""
        b = self.images_per_client
        known = {"algorithm": self.algorithm, "local_steps": int(self.local_steps), "local_lr": float(self.local_lr),
                 "local_batch_size": int(self.local_batch_size or b), "sends_buffers": bool(self.sends_buffers),
                 "per_example_clip": None if self.per_example_clip is None else float(self.per_example_clip),
                 "num_clients_averaged": int(self.num_clients_averaged), "update_is": self.update_is,
                 "num_images": int(self.num_images), "images_per_client": b}
        return {**self.other, **known}

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> "ObservedProtocol":
        """Read a ``protocol`` header (checked by :func:`gradleak.observation.validate`); keys it lacks take
        their defaults (files written before they existed)."""
        bs, pec = header.get("local_batch_size"), header.get("per_example_clip")
        return cls(algorithm=header["algorithm"], local_steps=int(header.get("local_steps", 1)),
                   local_lr=float(header.get("local_lr", 0.0)), local_batch_size=None if bs is None else int(bs),
                   sends_buffers=bool(header.get("sends_buffers", False)),
                   per_example_clip=None if pec is None else float(pec),
                   num_clients_averaged=int(header.get("num_clients_averaged") or 1),
                   num_images=int(header["num_images"]),
                   other={k: v for k, v in header.items() if k not in HEADER_KEYS})


def client_slices(num_images: int, num_clients: int) -> list[slice]:
    """The images of each of ``num_clients`` equal clients, in order (client k: k*B .. (k+1)*B - 1)."""
    if num_clients < 1 or num_images % num_clients:
        raise UserError(f"{num_images} images cannot be split evenly among {num_clients} clients")
    b = num_images // num_clients
    return [slice(k * b, (k + 1) * b) for k in range(num_clients)]


def split_state(model: nn.Module, state: Tensors) -> tuple[Tensors, Tensors]:
    """Split a ``state_dict``-style mapping into (parameters, buffers) by the model's names."""
    pnames = [n for n, _ in model.named_parameters()]
    params = {n: state[n] for n in pnames}
    buffers = {n: v for n, v in state.items() if n not in params}
    return params, buffers


def mean_cross_entropy(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
    """The client's loss: mean cross-entropy of ``model`` with ``params``/``buffers`` on (x, y).

    ``y`` may be class indices (N) or soft labels (N x classes) as DLG optimises them.
    """
    logits = functional_call(model, {**params, **buffers}, (x,))
    if y.dtype.is_floating_point:
        return torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, y)


def gradient(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor,
             y: torch.Tensor) -> Tensors:
    """d(mean CE)/d(params). Differentiable with respect to ``x`` under outer transforms or autograd.

    Training-mode BatchNorm updates the running statistics in ``buffers`` in place, as a client's
    forward pass does; pass clones when that must not happen.
    """
    # buffers are an input of the transformed function (not captured), so BN may update them in place
    return grad(lambda p, b: mean_cross_entropy(model, p, b, x, y))(params, buffers)


def per_example_gradients(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor,
                          y: torch.Tensor) -> Tensors:
    """Each image's gradient of its own cross-entropy: ``{name: tensor[b, *param shape]}`` (torch.func vmap)."""
    def one(xi, yi):
        return grad(lambda p: mean_cross_entropy(model, p, buffers, xi.unsqueeze(0), yi.unsqueeze(0)))(params)
    return vmap(one)(x, y)


def clipped_mean_gradient(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor,
                          clip: float) -> Tensors:
    """DP-SGD's clipped gradient: ``(1/b) sum_i g_i min(1, clip / (||g_i|| + 1e-6))`` (Opacus's clip factor),
    ||g_i|| the L2 norm of image i's gradient over all parameters. Differentiable with respect to ``x``."""
    if has_batch_norm(model):
        raise UserError("per-example clipping needs a model without BatchNorm (BatchNorm mixes the images of "
                        "a batch, so per-image gradients are undefined); use e.g. lenet5 or resnet18_nobn")
    gs = per_example_gradients(model, params, buffers, x, y)
    b = x.shape[0]
    sq = sum(g.reshape(b, -1).pow(2).sum(dim=1) for g in gs.values())
    factor = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return {n: (g * factor.view(b, *([1] * (g.dim() - 1)))).sum(dim=0) / b for n, g in gs.items()}


def client_gradient(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor,
                    protocol: Protocol) -> Tensors:
    """The gradient a client following ``protocol`` computes on (x, y): plain, or per-example clipped."""
    if protocol.per_example_clip is None:
        return gradient(model, params, buffers, x, y)
    return clipped_mean_gradient(model, params, buffers, x, y, float(protocol.per_example_clip))


def minibatches(n: int, batch_size: int | None, steps: int) -> list[slice]:
    """The slices of the client batch used at each local step (in order, cycled)."""
    bs = n if not batch_size else min(int(batch_size), n)
    per_epoch = -(-n // bs)
    return [slice((t % per_epoch) * bs, min(n, (t % per_epoch) * bs + bs)) for t in range(steps)]


def local_update(model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor,
                 protocol: Protocol) -> tuple[Tensors, Tensors]:
    """One client's update under ``protocol``, starting from ``params``/``buffers``.

    This is one client; with ``protocol.num_clients_averaged`` K > 1 the caller runs it on each client's
    slice (:func:`client_slices`) and averages. Returns ``(update, buffers_after)``; ``update`` is keyed
    by parameter name in the model's order.
    ``params`` and ``buffers`` are never modified (buffers are cloned before the forward passes).
    """
    buffers = {k: v.clone() for k, v in buffers.items()}
    if protocol.algorithm == "fedsgd":
        g = client_gradient(model, params, buffers, x, y, protocol)
        return {n: g[n] for n in params}, buffers
    current = dict(params)
    for sl in minibatches(x.shape[0], protocol.local_batch_size, protocol.local_steps):
        g = client_gradient(model, current, buffers, x[sl], y[sl], protocol)
        current = {n: current[n] - protocol.local_lr * g[n] for n in current}
    return {n: current[n] - params[n] for n in params}, buffers
