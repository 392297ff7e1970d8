"""Utility runs on Flower's simulation engine.

:func:`simulate` takes the arguments of :func:`gradleak.federated.simulation.simulate` and returns the
same :class:`~gradleak.federated.simulation.SimulationResult`, but every client is a Flower ClientApp
(one virtual node per client, run by ``flwr.simulation.run_simulation`` on Ray) that computes its update
with gradleak's client (:func:`.client.train_reply`) and obfuscates it with :func:`.mod.obfuscation_mod`;
the server is a ServerApp that samples clients, aggregates, steps, evaluates and stops early exactly as
the built-in loop does, with its server, aggregation, evaluation and DP accounting.

Same seed, same run: the client sampling and each client's data order come from one NumPy generator
consumed in the built-in loop's order (the server draws a client's data order and sends it with the
round's configuration). The obfuscation noise differs: clients run in parallel, so each draws from its own
generator seeded per (seed, round, client) (:func:`.mod.noise_generator`) instead of sharing one; without
random obfuscations the two engines give the same numbers (bit for bit when the built-in loop also runs on
one CPU thread, as each Flower node does).

Ray starts once per call (a few seconds); the data go to Ray's object store once and each virtual node
fetches its own client's images.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from .. import obfuscation
from ..errors import UserError
from ..federated.protocol import Protocol, Tensors
from ..federated.simulation import (Evaluation, RoundReport, Server, Settings, SimulationResult, Uploads, _Best,
                                    _client_order, _show, epsilon_after, evaluate, schedule_dp)
from .client import train_reply
from .mod import obfuscation_mod
from .records import ARRAYS_KEY, BUFFERS_KEY, ROUND, client_of, read_info, to_record, to_tensors

NODE_TIMEOUT_S = 300.0  # how long the server waits for the virtual nodes to come up
_FETCHED: dict[str, Any] = {}  # per process (each Ray worker): what it has read from the object store


# ------------------------------------------------------------------------------------------ client side
def _fetch(ref) -> Any:
    import ray

    key = ref.hex()
    if key not in _FETCHED:
        _FETCHED[key] = ray.get(ref)
    return _FETCHED[key]


def client_app(model_ref, data_refs: Sequence[Any], specs: Sequence[dict[str, Any]], *, seed: int,
               sample_rate: float, rounds: int, device: str) -> ClientApp:
    """The ClientApp of every virtual node: client k (its partition id) trains on its images
    (``data_refs[k]``: images and labels in Ray's object store) in the order and under the protocol the
    round's configuration gives, and sends its update (not new weights) through the obfuscation mod."""
    app = ClientApp(mods=[obfuscation_mod(specs, seed=seed, sample_rate=sample_rate, rounds=rounds)])

    @app.query()
    def identify(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"client": ConfigRecord({"client": client_of(context)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        images, labels = _fetch(data_refs[client_of(context)])
        config = msg.content["config"]
        pos = torch.as_tensor(list(config["positions"]), dtype=torch.int64)
        proto = Protocol.from_header(json.loads(str(config["protocol"])))
        return train_reply(msg, _fetch(model_ref), images[pos], labels[pos], proto, send="update", device=device)

    return app


# ------------------------------------------------------------------------------------------ server side
@dataclass
class _Job:
    """Everything the ServerApp needs: the arguments of :func:`simulate`."""

    model: nn.Module
    labels: np.ndarray
    clients: Sequence[np.ndarray]
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    settings: Settings
    evaluation: Evaluation
    seed: int
    delta: float | None
    device: str
    progress: bool
    on_round: Callable[[int, Tensors, dict[str, Any]], None] | None


def _nodes(grid: Grid, num_clients: int) -> dict[int, int]:
    """Client index (partition id) -> node id, asked of every virtual node once they are up."""
    deadline = time.monotonic() + NODE_TIMEOUT_S
    while len(ids := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(ids)} of {num_clients} Flower nodes came up in {NODE_TIMEOUT_S:.0f}s")
        time.sleep(0.05)
    asks = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in ids]
    out = {}
    for rep in grid.send_and_receive(asks):
        if rep.has_error():
            raise RuntimeError(f"a Flower node failed to say which client it is: {rep.error.reason}")
        out[int(rep.content["client"]["client"])] = int(rep.metadata.src_node_id)
    return out


def _round_plan(rng: np.random.Generator, job: _Job, sizes: np.ndarray) -> list[tuple[int, np.ndarray, dict]]:
    """This round's clients, each with the positions of its images in training order and its protocol
    header, drawn from ``rng`` in the order the built-in loop draws them."""
    s = job.settings
    if s.client_sampling == "poisson":
        chosen = [int(c) for c in np.flatnonzero(rng.random(len(sizes)) < s.clients_per_round)]
    else:
        chosen = sorted(int(c) for c in rng.choice(len(sizes), s.clients_per_round_count, replace=False))
    plan = []
    for c in (c for c in chosen if sizes[c] > 0):
        idx = job.clients[c]
        positions = _client_order(rng, job.labels[idx], s.class_balanced)
        proto = s.protocol(len(positions))
        if s.algorithm == "fedsgd" and s.local_batch_size is not None:
            positions = positions[:s.local_batch_size]
        plan.append((c, positions, proto.observed(len(positions)).header()))
    return plan


def _train(grid: Grid, nodes: dict[int, int], r: int, state: Tensors, plan) -> list[RecordDict]:
    """Send the round's training messages and return the replies' contents in the plan's order."""
    arrays = to_record(state)
    msgs = [Message(RecordDict({ARRAYS_KEY: arrays, "config": ConfigRecord({
        ROUND: r, "positions": [int(p) for p in positions], "protocol": json.dumps(header)})}),
        dst_node_id=nodes[c], message_type=MessageType.TRAIN, group_id=str(r)) for c, positions, header in plan]
    by_node = {int(rep.metadata.src_node_id): rep for rep in grid.send_and_receive(msgs)}
    out = []
    for c, _, _ in plan:
        rep = by_node.get(nodes[c])
        if rep is None or rep.has_error():
            reason = rep.error.reason if rep is not None else "no reply"
            raise RuntimeError(f"client {c} failed in round {r}: {reason}")
        out.append(rep.content)
    return out


def _uploads(job: _Job, plan, replies: list[RecordDict], sizes: np.ndarray) -> Uploads:
    """The round's replies as the server's :class:`~gradleak.federated.simulation.Uploads`."""
    out = Uploads(update_is="gradient" if job.settings.algorithm == "fedsgd" else "weight_delta")
    for (c, _, _), content in zip(plan, replies):
        info = read_info(content)
        out.updates.append(to_tensors(content[ARRAYS_KEY]))
        out.weights.append(float(sizes[c]))
        out.buffers.append(to_tensors(content[BUFFERS_KEY]) if BUFFERS_KEY in content else {})
        out.bits.append(int(info["update_bits"]))
        out.records.append(info.get("obfuscation", []))
    return out


def serve(grid: Grid, job: _Job) -> SimulationResult:
    """The server's side of :func:`simulate`, run inside the ServerApp."""
    s, dev = job.settings, torch.device(job.device)
    nodes = _nodes(grid, s.num_clients)
    model = job.model.to(dev)
    server = Server(model, {k: v.to(dev) for k, v in model.state_dict().items()}, s)
    sizes = np.array([len(c) for c in job.clients], dtype=np.int64)
    rng = np.random.default_rng(job.seed)
    best, reports, update_bits = _Best(job.evaluation), [], []
    last_records, last_metrics, stopped = [], None, False
    bar = _bar(job)
    try:
        for r in range(1, s.rounds + 1):
            t0 = time.perf_counter()
            plan = _round_plan(rng, job, sizes)
            uploads = _uploads(job, plan, _train(grid, nodes, r, server.state(), plan), sizes)
            server.receive(uploads)
            update_bits += uploads.bits
            last_records = obfuscation.merge_client_records(uploads.records) if uploads.records else last_records
            chosen = [c for c, _, _ in plan]
            rep = RoundReport(r, chosen, int(sizes[chosen].sum()) if chosen else 0, sum(uploads.bits),
                              epsilon_after(last_records, s.sample_rate, r, job.delta), 0.0)
            state = server.state()
            if r % job.evaluation.every == 0 or r == s.rounds:
                rep.metrics = last_metrics = evaluate(model, state, job.eval_images, job.eval_labels,
                                                      job.evaluation.threshold, job.evaluation.batch_size)
                best.update(r, rep.metrics, state)
            rep.seconds = time.perf_counter() - t0
            reports.append(rep.as_dict())
            if job.on_round:
                job.on_round(r, state, reports[-1])
            if bar is not None:
                _show(bar, rep)
            if best.patience_spent:
                stopped = True
                break
    finally:
        if bar is not None:
            bar.close()
    return SimulationResult(rounds=reports, final_state=server.state(), best_state=best.state, best_round=best.round,
                            best=best.metrics, final=last_metrics, stopped_early=stopped, obfuscation=last_records,
                            bits_per_update=float(np.mean(update_bits)) if update_bits else 0.0)


def _bar(job: _Job):
    if not job.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=job.settings.rounds, desc="rounds (flower)", unit="round", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------ the run
@contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower's own log (start-up banners, the notice that run_simulation is deprecated) only for errors."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _backend(settings: Settings, device: str) -> dict[str, Any]:
    """One CPU per virtual client; on a GPU, clients of a round share it."""
    gpus = 0.0 if device == "cpu" else 1.0 / max(1, min(settings.clients_per_round_count, os.cpu_count() or 1))
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus}}


def simulate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, clients: Sequence[np.ndarray],
             eval_images: torch.Tensor, eval_labels: torch.Tensor, settings: Settings, *,
             evaluation: Evaluation | None = None, obfuscations: Sequence[dict[str, Any]] = (),
             seed: int = 0, delta: float | None = None, device: str = "cpu", progress: bool = False,
             on_round: Callable[[int, Tensors, dict[str, Any]], None] | None = None) -> SimulationResult:
    """:func:`gradleak.federated.simulation.simulate` on Flower's simulation engine (see the module
    docstring): the same arguments, the same result."""
    import ray
    from flwr.simulation import run_simulation

    specs = schedule_dp([obfuscation.normalize(s) for s in obfuscations], settings.sample_rate, settings.rounds)
    obfuscation.resolve_all(specs)  # fail on a bad spec before Ray starts
    if len(clients) != settings.num_clients:
        raise ValueError(f"{len(clients)} client index lists for {settings.num_clients} clients")
    job = _Job(model, labels.cpu().numpy(), [np.asarray(c, dtype=np.int64) for c in clients], eval_images,
               eval_labels, settings, evaluation or Evaluation(), int(seed), delta, str(device), progress, on_round)
    if ray.is_initialized():  # Flower's simulation shuts Ray down when it ends
        raise UserError("Flower's engine starts and stops Ray itself and cannot run where Ray already runs "
                        "(e.g. in a Ray sweep worker); use federation.engine: local there")
    # Flower would start Ray itself; starting it here lets the data go to the object store first
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    result: dict[str, SimulationResult] = {}
    try:
        model_ref = ray.put(copy.deepcopy(model).cpu())
        data_refs = [ray.put((images[torch.as_tensor(c)].cpu(), labels[torch.as_tensor(c)].cpu())) for c in job.clients]
        app = client_app(model_ref, data_refs, specs, seed=job.seed, sample_rate=settings.sample_rate,
                         rounds=settings.rounds, device=job.device)
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            result["run"] = serve(grid, job)

        with _quiet_flower():
            run_simulation(server_app, app, num_supernodes=settings.num_clients,
                           backend_config=_backend(settings, job.device))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if "run" not in result:
        raise RuntimeError("Flower's simulation ended without running the server")
    return result["run"]


__all__ = ["client_app", "serve", "simulate"]
