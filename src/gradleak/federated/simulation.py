"""Multi-round federated training: what each obfuscation costs the model.

A server trains a classifier with K clients over R rounds. Each client holds the images of its own
patients (a patient's images are never split between clients), computes its update with the one client
code path (:func:`gradleak.federated.client.client_update`, which wraps
:func:`gradleak.federated.protocol.local_update`), obfuscates it with :func:`gradleak.obfuscation.apply`
exactly as an attack capture does, and the server averages the updates weighted by the clients' sample
counts. The global model is evaluated on a held-out set after every round.

    clients = partition_by_patient(labels, patient_ids, 10, scheme="dirichlet", alpha=0.5, seed=0)
    result = simulate(model, images, labels, clients, eval_images, eval_labels, settings, seed=0)

Everything is deterministic from ``seed`` on CPU: the client sampling and the clients' data order come
from one NumPy generator, the obfuscation noise from one ``torch.Generator``, consumed in a fixed order
(round by round, clients in increasing index).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import obfuscation
from ..errors import UserError
from ..obfuscation import accounting
from ..metrics.classification import binary_metrics
from .client import client_update
from .protocol import Protocol, Tensors, split_state

PARTITIONS = ("iid", "dirichlet")
SAMPLINGS = ("fixed", "poisson")
MONITORS = {"roc_auc": 1, "accuracy": 1, "balanced_accuracy": 1, "f1": 1, "loss": -1}


# ------------------------------------------------------------------------------------------ partitions
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


# ------------------------------------------------------------------------------------------ settings
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


# ------------------------------------------------------------------------------------------ server
def aggregate(updates: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """``sum_k w_k u_k / sum_k w_k`` for each tensor name."""
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("nothing to aggregate")
    out = {}
    for name in updates[0]:
        acc = torch.zeros_like(updates[0][name], dtype=torch.float64)
        for u, w in zip(updates, weights):
            acc += float(w) * u[name].to(torch.float64)
        out[name] = (acc / total).to(updates[0][name].dtype)
    return out


def average_buffers(buffers: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Sample-weighted mean of the clients' buffers (integer counters are rounded)."""
    avg = aggregate([{k: v.double() for k, v in b.items()} for b in buffers], weights)
    return {k: (v.round() if not buffers[0][k].is_floating_point() else v).to(buffers[0][k].dtype)
            for k, v in avg.items()}


class Server:
    """The global model's parameters and buffers and the server's optimiser state."""

    def __init__(self, model: nn.Module, state: Tensors, settings: Settings):
        params, buffers = split_state(model, {k: v.detach().clone() for k, v in state.items()})
        self.model, self.params, self.buffers, self.settings = model, params, buffers, settings
        self.velocity: Tensors | None = None

    def state(self) -> Tensors:
        return {k: v.detach().clone() for k, v in {**self.params, **self.buffers}.items()}

    def step(self, mean_update: Tensors, update_is: str) -> None:
        s = self.settings
        d = mean_update if update_is == "gradient" else {k: -v for k, v in mean_update.items()}
        if s.server_momentum:
            if self.velocity is None:
                self.velocity = {k: torch.zeros_like(v) for k, v in d.items()}
            self.velocity = {k: s.server_momentum * self.velocity[k] + d[k] for k in d}
            d = self.velocity
        self.params = {k: self.params[k] - s.server_lr * d[k].to(self.params[k].device) for k in self.params}


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, state: Tensors, images: torch.Tensor, labels: torch.Tensor,
             threshold: float = 0.5, batch_size: int = 512) -> dict[str, Any]:
    """Score the model with weights ``state`` (eval mode) on ``images``: mean cross-entropy ``loss`` and
    :func:`gradleak.metrics.classification.binary_metrics` of P(class 1)."""
    model.eval()
    device = next(iter(state.values())).device
    probs, loss_sum = [], 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device)
        logits = functional_call(model, state, (x,))
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        probs.append(torch.softmax(logits.double(), dim=-1)[:, 1].cpu())
    p = torch.cat(probs).numpy()
    return binary_metrics(p, labels.cpu().numpy(), threshold, loss=loss_sum / max(1, len(images)))


# ------------------------------------------------------------------------------------------ DP schedule
def schedule_dp(specs: list[dict[str, Any]], sample_rate: float, rounds: int) -> list[dict[str, Any]]:
    """Fill the client sampling rate and the number of rounds into obfuscations run in DP mode.

    An obfuscation spec with ``target_epsilon`` derives its noise for a schedule; in a simulation the
    schedule is the simulation's own (``sample_rate`` = a client's probability to take part in a
    round, ``rounds`` = R). Values the spec already gives must agree with the simulation.
    """
    out = []
    for spec in specs:
        spec = dict(spec)
        if spec.get("target_epsilon") is not None:
            for key, value in (("sample_rate", float(sample_rate)), ("rounds", int(rounds))):
                given = spec.get(key)
                if given is None:
                    spec[key] = value
                elif not math.isclose(float(given), float(value), rel_tol=1e-9):
                    raise UserError(f"obfuscation '{spec.get('name')}' has {key}={given}, but the simulation's "
                                    f"{key} is {value} (leave it out to use the simulation's)")
        out.append(spec)
    return out


def dp_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of Gaussian mechanisms with client-level sensitivity (the whole update clipped)."""
    return [r for r in records if r.get("dp_unit") == "client" and r.get("noise_multiplier")]


def epsilon_after(records: Sequence[dict[str, Any]], sample_rate: float, rounds: int,
                  delta: float | None = None) -> float | None:
    """Client-level epsilon spent after ``rounds`` rounds by the Gaussian mechanisms among ``records``,
    from :func:`gradleak.obfuscation.accounting.epsilon_spent` (Opacus's accountant) with the client
    sampling rate; each record's own ``delta`` and ``accountant`` are used (``delta`` when it names
    none). Several such mechanisms compose by adding their epsilons. None when there is none."""
    dp = dp_records(records)
    if not dp:
        return None
    eps = 0.0
    for r in dp:
        d = r.get("delta", delta)
        if d is None:
            return None
        eps += accounting.epsilon_spent(float(r["noise_multiplier"]), sample_rate, int(rounds), float(d),
                                        accountant=r.get("accountant") or "rdp")
    return float(eps)


# ------------------------------------------------------------------------------------------ the loop
@dataclass
class RoundReport:
    round: int
    clients: list[int]
    train_images: int
    bits: int
    epsilon: float | None
    seconds: float
    metrics: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "metrics"}
        if self.metrics is not None:
            d.update({k: v for k, v in self.metrics.items() if k != "num_images"})
            d["eval_images"] = self.metrics["num_images"]
        return d


@dataclass
class SimulationResult:
    rounds: list[dict[str, Any]]
    final_state: Tensors
    best_state: Tensors | None
    best_round: int | None
    best: dict[str, Any] | None
    final: dict[str, Any] | None
    stopped_early: bool
    obfuscation: list[dict[str, Any]] = field(default_factory=list)
    bits_per_update: float = 0.0


def _client_order(rng: np.random.Generator, y: np.ndarray, balanced: bool) -> np.ndarray:
    """This round's order of a client's images (positions into its own index list)."""
    n = len(y)
    if not balanced:
        return rng.permutation(n)
    counts = np.bincount(y)
    w = 1.0 / counts[y]
    return rng.choice(n, size=n, replace=True, p=w / w.sum())


def simulate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, clients: Sequence[np.ndarray],
             eval_images: torch.Tensor, eval_labels: torch.Tensor, settings: Settings, *,
             evaluation: Evaluation | None = None, obfuscations: Sequence[dict[str, Any]] = (),
             seed: int = 0, delta: float | None = None, device: str = "cpu", progress: bool = False,
             on_round: Callable[[int, Tensors, dict[str, Any]], None] | None = None) -> SimulationResult:
    """Train ``model`` (its current weights are the initial global model) with federated clients.

    ``images``/``labels``: every training image (N x C x H x W in [0, 1]) and label; ``clients[k]``
    the indices client k holds. ``obfuscations`` (specs as in an experiment config) are applied to each
    client's update through :func:`gradleak.obfuscation.apply`. ``on_round(r, state, report)`` is called
    after every round with the new global state. Returns per-round reports (the round's clients, bits
    uploaded by all of them, client-level epsilon spent so far, seconds, and metrics on the evaluation
    set when evaluated), the final and the best global state.
    """
    evaluation = evaluation or Evaluation()
    specs = schedule_dp([obfuscation.normalize(s) for s in obfuscations], settings.sample_rate, settings.rounds)
    obfuscation.resolve_all(specs)  # fail on a bad spec before any training
    dev = torch.device(device)
    model = model.to(dev)
    server = Server(model, {k: v.to(dev) for k, v in model.state_dict().items()}, settings)
    x_all = images.to(dev)
    y_all = labels.to(dev)
    y_np = labels.cpu().numpy()
    sizes = np.array([len(c) for c in clients], dtype=np.int64)
    k_total = len(clients)
    if k_total != settings.num_clients:
        raise ValueError(f"{k_total} client index lists for {settings.num_clients} clients")
    rng = np.random.default_rng(seed)
    noise = torch.Generator().manual_seed(int(seed))
    sign = MONITORS[evaluation.monitor]
    best_value, best_round, best_state, best = None, None, None, None
    since_best = 0
    reports: list[dict[str, Any]] = []
    last_records: list[dict[str, Any]] = []
    last_metrics: dict[str, Any] | None = None
    update_bits: list[int] = []
    stopped = False
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=settings.rounds, desc="rounds", unit="round", dynamic_ncols=True)
    try:
        for r in range(1, settings.rounds + 1):
            t0 = time.perf_counter()
            if settings.client_sampling == "poisson":
                chosen = [int(c) for c in np.flatnonzero(rng.random(k_total) < settings.clients_per_round)]
            else:
                chosen = sorted(int(c) for c in rng.choice(k_total, settings.clients_per_round_count,
                                                            replace=False))
            chosen = [c for c in chosen if sizes[c] > 0]
            updates, weights, buffers, bits = [], [], [], 0
            round_records: list[list[dict[str, Any]]] = []
            state = server.state()
            update_is = "gradient"
            for c in chosen:
                idx = clients[c]
                order = idx[_client_order(rng, y_np[idx], settings.class_balanced)]
                proto = settings.protocol(len(order))
                if settings.algorithm == "fedsgd" and settings.local_batch_size is not None:
                    order = order[:settings.local_batch_size]
                sel = torch.as_tensor(order, device=dev)
                update, buf = client_update(model, state, x_all[sel], y_all[sel], proto)
                context = obfuscation.Context.from_protocol(proto.header(len(order)), sample_rate=settings.sample_rate,
                                                            rounds=settings.rounds)
                update, records, b = obfuscation.apply(specs, {k: v.cpu() for k, v in update.items()}, noise,
                                                       context)
                updates.append(update)
                weights.append(float(sizes[c]))
                buffers.append(buf)
                bits += int(b)
                update_bits.append(int(b))
                round_records.append(records)
                update_is = proto.update_is
            if updates:
                server.step(aggregate(updates, weights), update_is)
                if settings.sends_buffers and buffers and buffers[0]:
                    server.buffers = {k: v.to(dev) for k, v in average_buffers(
                        [{k: v.cpu() for k, v in b.items()} for b in buffers], weights).items()}
            if round_records:
                last_records = obfuscation.merge_client_records(round_records)
            eps = epsilon_after(last_records, settings.sample_rate, r, delta)
            rep = RoundReport(r, chosen, int(sizes[chosen].sum()) if chosen else 0, bits, eps, 0.0)
            new_state = server.state()
            if r % evaluation.every == 0 or r == settings.rounds:
                m = evaluate(model, new_state, eval_images, eval_labels, evaluation.threshold,
                             evaluation.batch_size)
                rep.metrics = last_metrics = m
                value = m[evaluation.monitor]
                if value == value and (best_value is None or sign * (value - best_value) > evaluation.min_delta):
                    best_value, best_round, best = value, r, m
                    best_state = new_state
                    since_best = 0
                else:
                    since_best += 1
            rep.seconds = time.perf_counter() - t0
            report = rep.as_dict()
            reports.append(report)
            if on_round:
                on_round(r, new_state, report)
            if bar is not None:
                post = {"auc": f"{rep.metrics['roc_auc']:.3f}", "acc": f"{rep.metrics['accuracy']:.3f}"} \
                    if rep.metrics else {}
                if eps is not None:
                    post["eps"] = f"{eps:.2f}"
                bar.set_postfix(post)
                bar.update(1)
            if evaluation.patience is not None and since_best >= evaluation.patience:
                stopped = True
                break
    finally:
        if bar is not None:
            bar.close()
    return SimulationResult(
        rounds=reports, final_state=server.state(), best_state=best_state, best_round=best_round,
        best=best, final=last_metrics, stopped_early=stopped, obfuscation=last_records,
        bits_per_update=float(np.mean(update_bits)) if update_bits else 0.0)


__all__ = ["Evaluation", "Partition", "Server", "Settings", "SimulationResult", "aggregate", "average_buffers",
           "dp_records", "epsilon_after", "evaluate", "partition_by_patient", "patient_groups", "patient_labels",
           "schedule_dp", "simulate"]
