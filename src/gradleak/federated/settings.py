"""How a federation trains and is evaluated: the ``federation`` and ``evaluation`` sections of a utility
config, as the simulation (:mod:`gradleak.federated.simulation`) reads them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .partition import PARTITIONS
from .protocol import Protocol

SAMPLINGS = ("fixed", "poisson")
MONITORS = {"roc_auc": 1, "accuracy": 1, "balanced_accuracy": 1, "f1": 1, "loss": -1}


@dataclass
class Settings:
    """How the federation trains (the ``federation`` section of a utility config).

    ``clients_per_round``: the fraction of the K clients that take part in a round: exactly
    ``max(1, round(fraction * K))`` clients drawn without replacement (``client_sampling: fixed``), or
    each client independently with that probability (``poisson``, what DP accountants assume).

    ``fedsgd``: a client sends the gradient of the mean cross-entropy on ``local_batch_size`` images drawn
    from its data (all its images when None); the server steps with ``server_lr``.
    ``fedavg``: a client runs ``local_steps`` SGD steps of ``local_lr`` on mini-batches of
    ``local_batch_size`` (or ``local_epochs`` passes over its data when ``local_steps`` is None) and sends
    the weight delta; the server adds ``server_lr`` times the average delta (1.0 is plain FedAvg).

    The server averages updates weighted by the clients' sample counts (number of local images) and
    may keep momentum: ``v <- momentum * v + d``, ``w <- w - server_lr * v``, where ``d`` is the
    averaged gradient (FedSGD) or minus the averaged delta (FedAvg).

    ``class_balanced``: each client resamples its images every round with replacement, each image drawn
    with probability inversely proportional to its class's count on that client, so the classes are
    seen equally often in training (the client's loss and protocol stay unchanged).
    """

    num_clients: int = 10
    partition: str = "iid"
    alpha: float = 0.5
    clients_per_round: float = 1.0
    client_sampling: str = "fixed"
    rounds: int = 20
    algorithm: str = "fedavg"
    local_epochs: int = 1
    local_steps: int | None = None
    local_lr: float = 0.05
    local_batch_size: int | None = 32
    server_lr: float = 1.0
    server_momentum: float = 0.0
    sends_buffers: bool = True
    class_balanced: bool = False

    def __post_init__(self):
        if self.algorithm not in ("fedsgd", "fedavg"):
            raise UserError(f"federation.algorithm must be fedsgd or fedavg, got '{self.algorithm}'")
        if self.num_clients < 1:
            raise UserError(f"federation.num_clients must be >= 1, got {self.num_clients}")
        if self.rounds < 1:
            raise UserError(f"federation.rounds must be >= 1, got {self.rounds}")
        if not 0 < self.clients_per_round <= 1:
            raise UserError(f"federation.clients_per_round must be a fraction in (0, 1], got {self.clients_per_round}")
        if self.client_sampling not in SAMPLINGS:
            raise UserError(f"federation.client_sampling must be one of {', '.join(SAMPLINGS)}, "
                            f"got '{self.client_sampling}'")
        if self.partition not in PARTITIONS:
            raise UserError(f"federation.partition must be one of {', '.join(PARTITIONS)}, got '{self.partition}'")
        if self.local_epochs < 1:
            raise UserError(f"federation.local_epochs must be >= 1, got {self.local_epochs}")
        if self.local_steps is not None and self.local_steps < 1:
            raise UserError(f"federation.local_steps must be >= 1, got {self.local_steps}")
        if self.local_batch_size is not None and self.local_batch_size < 1:
            raise UserError(f"federation.local_batch_size must be >= 1, got {self.local_batch_size}")
        if self.algorithm == "fedavg" and not self.local_lr > 0:
            raise UserError(f"federation.local_lr must be > 0 for fedavg, got {self.local_lr}")
        if not self.server_lr > 0:
            raise UserError(f"federation.server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise UserError(f"federation.server_momentum must be in [0, 1), got {self.server_momentum}")

    @property
    def sample_rate(self) -> float:
        """The probability that a given client takes part in a given round."""
        if self.client_sampling == "poisson":
            return float(self.clients_per_round)
        return self.clients_per_round_count / self.num_clients

    @property
    def clients_per_round_count(self) -> int:
        return max(1, int(round(self.clients_per_round * self.num_clients)))

    def protocol(self, num_images: int) -> Protocol:
        """The protocol a client holding ``num_images`` images follows in one round."""
        bs = self.local_batch_size
        if self.algorithm == "fedsgd":
            return Protocol("fedsgd", sends_buffers=self.sends_buffers)
        full = bs is None or bs >= num_images
        steps = self.local_steps or self.local_epochs * (1 if full else -(-num_images // bs))
        return Protocol("fedavg", local_steps=int(steps), local_lr=float(self.local_lr),
                        local_batch_size=None if full else int(bs), sends_buffers=self.sends_buffers)


@dataclass
class Evaluation:
    """When and how the global model is scored (the ``evaluation`` section of a utility config)."""

    every: int = 1
    threshold: float = 0.5
    monitor: str = "roc_auc"
    patience: int | None = None
    min_delta: float = 0.0
    batch_size: int = 512

    def __post_init__(self):
        if self.monitor not in MONITORS:
            raise UserError(f"evaluation.monitor must be one of {', '.join(MONITORS)}, got '{self.monitor}'")
        if self.every < 1:
            raise UserError(f"evaluation.every must be >= 1, got {self.every}")
        if not 0 < self.threshold < 1:
            raise UserError(f"evaluation.threshold must be in (0, 1), got {self.threshold}")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"evaluation.patience must be >= 1 (or null), got {self.patience}")


__all__ = ["MONITORS", "SAMPLINGS", "Evaluation", "Settings"]
