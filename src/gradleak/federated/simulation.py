"""Multi-round federated training: what each obfuscation costs the model.

A server trains a classifier with K clients over R rounds. Each client holds the images of its own
patients (a patient's images are never split between clients: :mod:`gradleak.federated.partition`),
computes its update with the one client code path (:func:`gradleak.federated.client.client_update`,
which wraps :func:`gradleak.federated.protocol.local_update`), obfuscates it with
:func:`gradleak.obfuscation.apply` exactly as an attack capture does, and the server averages the updates
weighted by the clients' sample counts (:func:`gradleak.federated.arithmetic.mean_update`). The global
model is evaluated on a held-out set after every round.

    clients = partition_by_patient(labels, patient_ids, 10, scheme="dirichlet", alpha=0.5, seed=0)
    result = simulate(model, images, labels, clients, eval_images, eval_labels, settings, seed=0)

Everything is deterministic from ``seed`` on CPU: the client sampling and the clients' data order come
from one NumPy generator, the obfuscation noise from one ``torch.Generator``, consumed in a fixed order
(round by round, clients in increasing index).

One loop for every engine: each round the server samples and plans its clients' work (:class:`ClientJob`),
a :data:`ClientRunner` runs it (here, or on Flower's nodes: :func:`gradleak.flower.simulate`), the server
steps and :class:`Rounds` books the round.
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
from .evaluation import binary_metrics
from .arithmetic import mean_buffers, mean_update
from .client import check_finite, check_sent, client_update
from .protocol import ObservedProtocol, Protocol, Tensors, split_state
from .settings import MONITORS, Evaluation, Settings


# ------------------------------------------------------------------------------------------ server
class Server:
    """The global model's parameters and buffers and the server's optimiser state."""

    def __init__(self, model: nn.Module, state: Tensors, settings: Settings):
        params, buffers = split_state(model, {k: v.detach().clone() for k, v in state.items()})
        self.model, self.params, self.buffers, self.settings = model, params, buffers, settings
        self.velocity: Tensors | None = None

    def state(self) -> Tensors:
        return {k: v.detach().clone() for k, v in {**self.params, **self.buffers}.items()}

    def step(self, averaged: Tensors, update_is: str) -> None:
        """Apply the clients' averaged update (a gradient, or a weight delta)."""
        s = self.settings
        d = averaged if update_is == "gradient" else {k: -v for k, v in averaged.items()}
        if s.server_momentum:
            if self.velocity is None:
                self.velocity = {k: torch.zeros_like(v) for k, v in d.items()}
            self.velocity = {k: s.server_momentum * self.velocity[k] + d[k] for k in d}
            d = self.velocity
        self.params = {k: self.params[k] - s.server_lr * d[k].to(self.params[k].device) for k in self.params}

    def receive(self, uploads: "Uploads") -> None:
        """One round on the server: step with the clients' sample-weighted mean update
        (:func:`gradleak.federated.arithmetic.mean_update`) and, when they send them, take the sample-weighted
        mean of their buffers."""
        if not uploads.updates:
            return
        self.step(mean_update(uploads.updates, uploads.weights), uploads.update_is)
        if self.settings.sends_buffers and uploads.buffers[0]:
            device = next(iter(self.params.values())).device
            cpu = [{k: v.cpu() for k, v in b.items()} for b in uploads.buffers]
            self.buffers = {k: v.to(device) for k, v in mean_buffers(cpu, uploads.weights).items()}


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, state: Tensors, images: torch.Tensor, labels: torch.Tensor,
             threshold: float = 0.5, batch_size: int = 512) -> dict[str, Any]:
    """Score the model with weights ``state`` (eval mode) on ``images``: mean cross-entropy ``loss`` and
    :func:`gradleak.federated.evaluation.binary_metrics` of P(class 1)."""
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


@dataclass
class Uploads:
    """What the clients of one round sent: their (obfuscated) updates, sample counts, buffers, bits and
    obfuscation records, in client order."""

    updates: list[Tensors] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    buffers: list[Tensors] = field(default_factory=list)
    bits: list[int] = field(default_factory=list)
    records: list[list[dict[str, Any]]] = field(default_factory=list)
    update_is: str = "gradient"


@dataclass
class ClientJob:
    """One client's work in a round: its index, the positions of its images in ``clients[client]`` in
    training order, its protocol, the protocol of its update as an Observation records it, and its weight
    in the server's mean (its image count)."""

    client: int
    positions: np.ndarray
    protocol: Protocol
    observed: ObservedProtocol
    weight: float


#: Runs a round's clients: (round, the global state sent, the round's jobs) -> what they sent, in job order.
ClientRunner = Callable[[int, Tensors, list[ClientJob]], Uploads]


@dataclass
class _Federation:
    """The fixed parts of a simulation: the model template, the training data on its device, who holds what,
    the settings, the obfuscation specs, and the two sources of randomness (consumed in a fixed order)."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    y_np: np.ndarray
    clients: Sequence[np.ndarray]
    sizes: np.ndarray
    settings: Settings
    specs: list[dict[str, Any]]
    rng: np.random.Generator
    noise: torch.Generator

    def sample(self) -> list[int]:
        """This round's clients (those holding no image are dropped)."""
        s, k = self.settings, len(self.clients)
        if s.client_sampling == "poisson":
            chosen = [int(c) for c in np.flatnonzero(self.rng.random(k) < s.clients_per_round)]
        else:
            chosen = sorted(int(c) for c in self.rng.choice(k, s.clients_per_round_count, replace=False))
        return [c for c in chosen if self.sizes[c] > 0]

    def plan(self, chosen: list[int]) -> list[ClientJob]:
        """Each chosen client's images in this round's order (drawn from ``rng``, client by client) and
        its protocol."""
        s, jobs = self.settings, []
        for c in chosen:
            positions = _client_order(self.rng, self.y_np[self.clients[c]], s.class_balanced)
            proto = s.protocol(len(positions))
            if s.algorithm == "fedsgd" and s.local_batch_size is not None:
                positions = positions[:s.local_batch_size]
            jobs.append(ClientJob(c, positions, proto, proto.observed(len(positions)), float(self.sizes[c])))
        return jobs

    def uploads(self, r: int, state: Tensors, jobs: list[ClientJob]) -> Uploads:
        """The :data:`ClientRunner` of this process: every job's update from the global ``state``,
        obfuscated as in an attack capture, with the one noise generator (jobs in order)."""
        s, out = self.settings, Uploads()
        for i, job in enumerate(jobs):
            sel = torch.as_tensor(self.clients[job.client][job.positions], device=self.x.device)
            try:  # the run stops, as Flower's client stops it: accuracy of a model with NaN weights means nothing
                if i == 0:  # the one state every job starts from
                    check_sent(state)
                update, buf = client_update(self.model, state, self.x[sel], self.y[sel], job.protocol)
                check_finite(update, job.protocol)
            except UserError as e:
                raise UserError(f"round {r}: client {job.client}: {e}") from None
            context = obfuscation.Context.from_protocol(job.observed, sample_rate=s.sample_rate, rounds=s.rounds)
            update, records, b = obfuscation.apply(self.specs, {k: v.cpu() for k, v in update.items()},
                                                   self.noise, context)
            out.updates.append(update)
            out.weights.append(job.weight)
            out.buffers.append(buf)
            out.bits.append(int(b))
            out.records.append(records)
            out.update_is = job.protocol.update_is
        return out


@dataclass
class _Best:
    """The best evaluation so far by the monitored metric, and the rounds since it (early stopping)."""

    evaluation: Evaluation
    value: float | None = None
    round: int | None = None
    state: Tensors | None = None
    metrics: dict[str, Any] | None = None
    since: int = 0

    def update(self, r: int, metrics: dict[str, Any], state: Tensors) -> None:
        ev = self.evaluation
        value = metrics[ev.monitor]
        if value == value and (self.value is None or MONITORS[ev.monitor] * (value - self.value) > ev.min_delta):
            self.value, self.round, self.metrics, self.state, self.since = value, r, metrics, state, 0
        else:
            self.since += 1

    @property
    def patience_spent(self) -> bool:
        return self.evaluation.patience is not None and self.since >= self.evaluation.patience


def _show(bar, rep: RoundReport) -> None:
    post = {"auc": f"{rep.metrics['roc_auc']:.3f}", "acc": f"{rep.metrics['accuracy']:.3f}"} if rep.metrics else {}
    if rep.epsilon is not None:
        post["eps"] = f"{rep.epsilon:.2f}"
    bar.set_postfix(post)
    bar.update(1)


class Rounds:
    """What a simulation books after each round, whoever ran the clients (this module's loop or Flower's
    engine): the round's report (clients, images, bits, client-level epsilon so far, evaluation when due),
    the best evaluation and early stopping, the ``on_round`` callback and the progress bar.

        rounds = Rounds(model, settings, evaluation, eval_images, eval_labels, sizes)
        for r in ...:  # the clients' uploads reach the server, then
            if rounds.book(r, t0, chosen, uploads, server): break
        result = rounds.result(server)
    """

    def __init__(self, model: nn.Module, settings: Settings, evaluation: Evaluation, eval_images: torch.Tensor,
                 eval_labels: torch.Tensor, sizes: np.ndarray, *, delta: float | None = None, progress: bool = False,
                 on_round: Callable[[int, Tensors, dict[str, Any]], None] | None = None):
        self.model, self.settings, self.evaluation = model, settings, evaluation
        self.eval_images, self.eval_labels, self.sizes, self.delta = eval_images, eval_labels, sizes, delta
        self.on_round = on_round
        self.best = _Best(evaluation)
        self.reports: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] | None = None
        self.update_bits: list[int] = []
        self.stopped = False
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=settings.rounds, desc="rounds", unit="round", dynamic_ncols=True)

    def book(self, r: int, t0: float, chosen: list[int], uploads: Uploads, server: Server) -> bool:
        """Book round ``r`` (begun at ``perf_counter()`` ``t0``) after ``server`` received ``uploads`` from the
        ``chosen`` clients; True when early stopping ends the run here."""
        s, ev = self.settings, self.evaluation
        self.update_bits += uploads.bits
        if uploads.records:
            self.records = obfuscation.merge_client_records(uploads.records)
        eps = epsilon_after(self.records, s.sample_rate, r, self.delta)
        rep = RoundReport(r, chosen, int(self.sizes[chosen].sum()) if chosen else 0, sum(uploads.bits), eps, 0.0)
        state = server.state()
        if r % ev.every == 0 or r == s.rounds:
            rep.metrics = self.metrics = evaluate(self.model, state, self.eval_images, self.eval_labels,
                                                  ev.threshold, ev.batch_size)
            self.best.update(r, rep.metrics, state)
        rep.seconds = time.perf_counter() - t0
        report = rep.as_dict()
        self.reports.append(report)
        if self.on_round:
            self.on_round(r, state, report)
        if self.bar is not None:
            _show(self.bar, rep)
        self.stopped = self.best.patience_spent
        return self.stopped

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def result(self, server: Server) -> SimulationResult:
        b = self.best
        return SimulationResult(
            rounds=self.reports, final_state=server.state(), best_state=b.state, best_round=b.round, best=b.metrics,
            final=self.metrics, stopped_early=self.stopped, obfuscation=self.records,
            bits_per_update=float(np.mean(self.update_bits)) if self.update_bits else 0.0)


def checked_specs(obfuscations: Sequence[dict[str, Any]], settings: Settings,
                  clients: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """The obfuscation specs with the simulation's DP schedule filled in, checked with the client index
    lists before any training (a bad spec is a :class:`UserError`)."""
    specs = schedule_dp([obfuscation.normalize(s) for s in obfuscations], settings.sample_rate, settings.rounds)
    obfuscation.resolve_all(specs)
    if len(clients) != settings.num_clients:
        raise ValueError(f"{len(clients)} client index lists for {settings.num_clients} clients")
    return specs


def simulate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, clients: Sequence[np.ndarray],
             eval_images: torch.Tensor, eval_labels: torch.Tensor, settings: Settings, *,
             evaluation: Evaluation | None = None, obfuscations: Sequence[dict[str, Any]] = (),
             seed: int = 0, delta: float | None = None, device: str = "cpu", progress: bool = False,
             on_round: Callable[[int, Tensors, dict[str, Any]], None] | None = None,
             run_clients: ClientRunner | None = None) -> SimulationResult:
    """Train ``model`` (its current weights are the initial global model) with federated clients.

    ``images``/``labels``: every training image (N x C x H x W in [0, 1]) and label; ``clients[k]``
    the indices client k holds. ``obfuscations`` (specs as in an experiment config) are applied to each
    client's update through :func:`gradleak.obfuscation.apply`. ``on_round(r, state, report)`` is called
    after every round with the new global state. Returns per-round reports (the round's clients, bits
    uploaded by all of them, client-level epsilon spent so far, seconds, and metrics on the evaluation
    set when evaluated), the final and the best global state.

    ``run_clients`` runs each round's client jobs elsewhere (e.g. on Flower's nodes); the sampling, the
    data order and the server stay this loop's. By default the clients run here, one after another.
    """
    evaluation = evaluation or Evaluation()
    specs = checked_specs(obfuscations, settings, clients)  # fail before any training
    dev = torch.device(device)
    model = model.to(dev)
    server = Server(model, {k: v.to(dev) for k, v in model.state_dict().items()}, settings)
    sizes = np.array([len(c) for c in clients], dtype=np.int64)
    x = images.to(dev) if run_clients is None else images  # the images stay where other runners read them
    fed = _Federation(model, x, labels.to(dev), labels.cpu().numpy(), clients, sizes, settings, specs,
                      np.random.default_rng(seed), torch.Generator().manual_seed(int(seed)))
    run_clients = run_clients or fed.uploads
    rounds = Rounds(model, settings, evaluation, eval_images, eval_labels, sizes, delta=delta, progress=progress,
                    on_round=on_round)
    try:
        for r in range(1, settings.rounds + 1):
            t0 = time.perf_counter()
            chosen = fed.sample()
            uploads = run_clients(r, server.state(), fed.plan(chosen))
            server.receive(uploads)
            if rounds.book(r, t0, chosen, uploads, server):
                break
    finally:
        rounds.close()
    return rounds.result(server)


__all__ = ["ClientJob", "ClientRunner", "Evaluation", "Rounds", "Server", "Settings", "SimulationResult", "Uploads",
           "checked_specs", "dp_records", "epsilon_after", "evaluate", "schedule_dp", "simulate"]
