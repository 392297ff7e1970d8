"""Utility runs on Flower's simulation engine.

:func:`simulate` takes the arguments of :func:`gradleak.federated.simulation.simulate` and returns the
same :class:`~gradleak.federated.simulation.SimulationResult`, but every client is a Flower ClientApp
(one virtual node per client, run by ``flwr.simulation.run_simulation`` on Ray) that computes its update
with gradleak's client (:func:`.client.train_reply`) and obfuscates it with :func:`.mod.obfuscation_mod`;
the server is a ServerApp that runs the built-in loop itself (sampling, aggregation, server step,
evaluation, early stopping, DP accounting) with a client runner (:func:`node_runner`) that sends each
round's client jobs to the nodes as training messages.

Same seed, same run: the client sampling and each client's data order come from the loop's one NumPy
generator (the server sends a client its data order with the round's configuration). The obfuscation noise
differs: clients run in parallel, so each draws from its own generator seeded per (seed, round, client)
(:func:`.mod.noise_generator`) instead of sharing one; without random obfuscations the two engines give the
same numbers, bit for bit when the built-in loop also runs on one CPU thread, as each Flower node does.

Ray starts once per call (a few seconds); the data go to Ray's object store once and each virtual node
fetches its own client's images.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from ..errors import UserError
from ..federated import simulation
from ..federated.protocol import Protocol, Tensors
from ..federated.simulation import ClientJob, ClientRunner, Settings, SimulationResult, Uploads
from .client import train_reply
from .mod import obfuscation_mod
from .records import ARRAYS_KEY, BUFFERS_KEY, REFUSED_KEY, ROUND, client_of, read_info, to_record, to_tensors

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
        logging.getLogger("flwr").setLevel(logging.ERROR)  # in the node's process: no notice when it ends
        images, labels = _fetch(data_refs[client_of(context)])
        config = msg.content["config"]
        pos = torch.as_tensor(list(config["positions"]), dtype=torch.int64)
        proto = Protocol.from_header(json.loads(str(config["protocol"])))
        try:
            return train_reply(msg, _fetch(model_ref), images[pos], labels[pos], proto, send="update",
                               device=device)
        except UserError as e:  # e.g. its training diverged: the server stops the run with this one line
            why = f"round {int(config[ROUND])}: client {client_of(context)}: {e}"
            return Message(RecordDict({REFUSED_KEY: ConfigRecord({"reason": why})}), reply_to=msg)

    return app


# ------------------------------------------------------------------------------------------ server side
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


def _train(grid: Grid, nodes: dict[int, int], r: int, state: Tensors, jobs: list[ClientJob]) -> list[RecordDict]:
    """Send the round's training messages (the global state, and each client's data order and protocol)
    and return the replies' contents in the jobs' order."""
    arrays = to_record(state)
    msgs = [Message(RecordDict({ARRAYS_KEY: arrays, "config": ConfigRecord({
        ROUND: r, "positions": [int(p) for p in job.positions], "protocol": json.dumps(job.observed.header())})}),
        dst_node_id=nodes[job.client], message_type=MessageType.TRAIN, group_id=str(r)) for job in jobs]
    by_node = {int(rep.metadata.src_node_id): rep for rep in grid.send_and_receive(msgs)}
    out = []
    for job in jobs:
        rep = by_node.get(nodes[job.client])
        if rep is not None and not rep.has_error() and REFUSED_KEY in rep.content:
            raise UserError(str(rep.content[REFUSED_KEY]["reason"]))
        if rep is None or rep.has_error():
            reason = rep.error.reason if rep is not None else "no reply"
            raise RuntimeError(f"client {job.client} failed in round {r}: {reason}")
        out.append(rep.content)
    return out


def _uploads(jobs: list[ClientJob], replies: list[RecordDict]) -> Uploads:
    """The round's replies as the server's :class:`~gradleak.federated.simulation.Uploads`."""
    out = Uploads()
    for job, content in zip(jobs, replies):
        info = read_info(content)
        out.updates.append(to_tensors(content[ARRAYS_KEY]))
        out.weights.append(job.weight)
        out.buffers.append(to_tensors(content[BUFFERS_KEY]) if BUFFERS_KEY in content else {})
        out.bits.append(int(info["update_bits"]))
        out.records.append(info.get("obfuscation", []))
        out.update_is = job.protocol.update_is
    return out


def node_runner(grid: Grid, num_clients: int) -> ClientRunner:
    """The :data:`~gradleak.federated.simulation.ClientRunner` of a ServerApp: each round's jobs go to the
    clients' virtual nodes as training messages, their replies come back as the round's uploads."""
    nodes = _nodes(grid, num_clients)

    def run_clients(r: int, state: Tensors, jobs: list[ClientJob]) -> Uploads:
        return _uploads(jobs, _train(grid, nodes, r, state, jobs))

    return run_clients


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
             eval_images: torch.Tensor, eval_labels: torch.Tensor, settings: Settings, **kw: Any) -> SimulationResult:
    """:func:`gradleak.federated.simulation.simulate` on Flower's simulation engine (see the module
    docstring): the same arguments (``evaluation``, ``obfuscations``, ``seed``, ``delta``, ``device``,
    ``progress``, ``on_round``), the same result."""
    import ray
    from flwr.simulation import run_simulation

    # a wrong argument fails here, not inside the ServerApp
    args = inspect.signature(simulation.simulate).bind(model, images, labels, clients, eval_images, eval_labels,
                                                       settings, **kw)
    args.apply_defaults()
    if args.kwargs["run_clients"] is not None:
        raise TypeError("Flower's engine runs the clients itself: run_clients is not an argument of its simulate")
    options = {k: v for k, v in args.kwargs.items() if k != "run_clients"}
    clients = [np.asarray(c, dtype=np.int64) for c in clients]
    specs = simulation.checked_specs(options["obfuscations"], settings, clients)  # fail before Ray starts
    seed, device = int(options["seed"]), str(options["device"])
    if ray.is_initialized():  # Flower's simulation shuts Ray down when it ends
        raise UserError("Flower's engine starts and stops Ray itself and cannot run where Ray already runs "
                        "(e.g. in a Ray sweep worker); use federation.engine: local there")
    # Flower would start Ray itself; starting it here lets the data go to the object store first
    with warnings.catch_warnings():  # Ray's notice of a future default for GPU-less tasks
        warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    result: dict[str, SimulationResult] = {}
    try:
        model_ref = ray.put(copy.deepcopy(model).cpu())
        data_refs = [ray.put((images[torch.as_tensor(c)].cpu(), labels[torch.as_tensor(c)].cpu())) for c in clients]
        app = client_app(model_ref, data_refs, specs, seed=seed, sample_rate=settings.sample_rate,
                         rounds=settings.rounds, device=device)
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            result["run"] = simulation.simulate(model, images, labels, clients, eval_images, eval_labels, settings,
                                                run_clients=node_runner(grid, settings.num_clients), **options)

        with _quiet_flower():
            run_simulation(server_app, app, num_supernodes=settings.num_clients,
                           backend_config=_backend(settings, device))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if "run" not in result:
        raise RuntimeError("Flower's simulation ended without running the server")
    return result["run"]


__all__ = ["client_app", "node_runner", "simulate"]
