"""The curious server on Flower: write every client update a strategy receives as an Observation file.

    strategy = CaptureStrategy(FedAvg(...), "captured/", model={"arch": "lenet5", "num_classes": 2,
                               "in_channels": 1, "image_size": 64})
    strategy.start(grid, initial_arrays, num_rounds=5)

:class:`CaptureStrategy` wraps any Flower strategy (it must be the outermost wrapper). In each round it
keeps the weights it sends, and before the wrapped strategy aggregates, it writes each reply as
``FOLDER/roundRRR/clientC.pt`` (:func:`gradleak.observation.save`), which ``gradleak attack`` reads as it
reads any capture, and lists them in ``FOLDER/captures.json``. An Observation holds the weights the client
was sent, its update (the reply's weights minus those, or the update the reply carries), the protocol
(from the reply's ``"gradleak"`` entry, or the ``protocol`` given here), the obfuscation records the
client's mod sent along, and labels only when the client's protocol reveals them.

Central DP as Flower does it (``DifferentialPrivacyServerSideFixedClipping`` and the adaptive variant)
clips each update on the server and adds noise to their aggregate. The noise never touches an
individual update: the server sees it clipped and un-noised. The Observation holds exactly that (the
clipping written as a ``gaussian`` record with ``sigma`` 0, ``applied_by`` the server) and its ``meta``
says where the noise went; ``unclipped=True`` writes the update as it arrived instead (a curious server
holds that too). With client-side clipping (``fixedclipping_mod``) the update arrives clipped, and the
clip record follows the client's own records.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping, Strategy)

from .. import obfuscation
from ..errors import UserError
from ..files import write_text
from ..models import build_from_header, parameter_names
from ..federated.client import check_sent, nonfinite
from ..federated.protocol import ObservedProtocol
from ..observation import Observation, save
from .mod import ProtocolSource, protocol_header
from .records import BUFFERS_KEY, Tensors, array_key, num_examples, read_info, to_tensors

SERVER_CLIPPING = (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping)
CLIENT_CLIPPING = (DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyClientSideAdaptiveClipping)
DEFAULT_DATA = {"value_range": [0, 1], "mean": [0.5], "std": [0.5]}
log = logging.getLogger(__name__)


class NonFiniteReply(UserError):
    """A reply whose update has NaN or Inf entries (the client's training diverged): no Observation."""


def central_dp(strategy: Strategy, unclipped: bool = False) -> dict[str, Any] | None:
    """What Flower's central-DP wrapper ``strategy`` does to the updates this round, or None;
    ``server_sees`` says what a capture in front of it writes (``unclipped``: the update as it arrived)."""
    if not isinstance(strategy, SERVER_CLIPPING + CLIENT_CLIPPING):
        return None
    z, clip, m = float(strategy.noise_multiplier), float(strategy.clipping_norm), int(strategy.num_sampled_clients)
    where = "server" if isinstance(strategy, SERVER_CLIPPING) else "client"
    noise = f"Gaussian noise of std {z * clip / m:g} is added to the aggregate only"
    if where == "server" and unclipped:
        sees = f"each update as the client sent it; the server clips it to L2 norm {clip:g} afterwards, and {noise}"
    else:
        sees = f"each update clipped to L2 norm {clip:g} by the {where}, without noise: {noise}"
    return {"strategy": type(strategy).__name__, "clipping": where, "clipping_norm": clip, "noise_multiplier": z,
            "num_sampled_clients": m, "aggregate_noise_std": z * clip / m, "server_sees": sees}


def _clip_record(update: Tensors, dp: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
    """The update clipped as Flower's wrapper clips it, and the record that says so."""
    clipped, records, _ = obfuscation.apply([{"name": "gaussian", "clip": dp["clipping_norm"], "sigma": 0.0}], update)
    record = {**records[0], "applied_by": f"{dp['clipping']} ({dp['strategy']})"}
    if dp["clipping"] == "client":
        record.pop("norm_before_clip", None)  # the update arrived clipped: its norm before is not known
    return clipped, record


def observation_from_reply(msg: Message, sent: Tensors, *, model: dict[str, Any], data: dict[str, Any] | None = None,
                           protocol: ProtocolSource = None, dp: dict[str, Any] | None = None, unclipped: bool = False,
                           meta: dict[str, Any] | None = None) -> Observation:
    """The Observation of one training reply ``msg`` to the weights ``sent`` (see the module docstring)."""
    data = {**DEFAULT_DATA, **(data or {})}
    template = build_from_header(model, data)
    params = parameter_names(template)
    content = msg.content
    info = read_info(content)
    arrays = to_tensors(content[array_key(content, "a client's train reply")])
    mode = info.get("arrays", "weights")
    header = info.get("protocol") or protocol_header(protocol, num_examples(content))
    if header is None:
        raise UserError("capture: the reply does not say which protocol the client followed; give the capture "
                        "protocol=Protocol(...) (or a function of the number of images returning one)")
    if mode == "weights" and header["algorithm"] == "fedsgd":
        raise UserError("capture: a reply of new weights carries a weight delta, not a gradient; describe one SGD "
                        "step as Protocol('fedavg', local_steps=1, local_lr=<the client's learning rate>)")
    missing = [n for n in params if n not in arrays]
    if missing:
        raise UserError(f"capture: the reply has no array '{missing[0]}' of {model['arch']}")
    try:
        check_sent(sent)
    except UserError as e:
        raise NonFiniteReply(f"capture: {e}: no update a server can attack") from None
    update = {n: arrays[n] - sent[n] if mode == "weights" else arrays[n] for n in params}
    bad = nonfinite(update)
    if bad is not None:
        raise NonFiniteReply(f"capture: the reply's update of '{bad}' has NaN or Inf entries (the client's "
                             f"training diverged): no update a server can attack")
    records = list(info.get("obfuscation", []))
    if dp is not None:
        clipped, record = _clip_record(update, dp)
        if dp["clipping"] == "client" or not unclipped:
            records.append(record)
        if dp["clipping"] == "server" and not unclipped:
            update = clipped
    buffers = None
    if header.get("sends_buffers"):
        source = arrays if mode == "weights" else to_tensors(content[BUFFERS_KEY]) if BUFFERS_KEY in content else {}
        buffers = {k: source[k] for k in template.state_dict() if k not in params and k in source} or None
    labels = torch.tensor(info["labels"], dtype=torch.int64) if info.get("labels") is not None else None
    return Observation(model=dict(model), global_state=dict(sent), update=update,
                       protocol=ObservedProtocol.from_header(header),
                       labels=labels, obfuscation=records, data=data, buffers=buffers, meta=dict(meta or {}))


class CaptureStrategy(Strategy):
    """Wrap ``strategy`` and write every training reply it receives as an Observation under ``folder``.

    ``model``: the architecture the federation trains, as an Observation's model header (``arch``,
    ``num_classes``, ``in_channels``, ``image_size``, optional ``options``): one of gradleak's, whose
    ``state_dict()`` names are the keys of the ArrayRecord the server sends. ``data``: the model's input
    normalisation (``mean``, ``std``). ``protocol``: used when a reply does not say its protocol.
    ``rounds``: the rounds to capture (all when None). ``unclipped``: with server-side central DP,
    write updates as they arrived rather than as the server clips them.
    """

    def __init__(self, strategy: Strategy, folder: str | os.PathLike, *, model: dict[str, Any],
                 data: dict[str, Any] | None = None, protocol: ProtocolSource = None,
                 rounds: Iterable[int] | None = None, unclipped: bool = False):
        super().__init__()
        self.strategy = strategy
        self.folder = Path(folder)
        self.model = dict(model)
        self.data = {**DEFAULT_DATA, **(data or {})}
        build_from_header(self.model, self.data)  # a bad header fails before the first round
        self.protocol = protocol
        self.rounds = None if rounds is None else {int(r) for r in rounds}
        self.unclipped = bool(unclipped)
        self.sent: dict[int, Tensors] = {}
        self.captured: list[dict[str, Any]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.rounds is None or server_round in self.rounds:
            self.sent[server_round] = to_tensors(arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self.sent.pop(server_round, None)
        if sent is not None:
            dp = central_dp(self.strategy, self.unclipped)
            for msg in replies:
                if msg.has_error():  # e.g. gradleak's client refusing to send a diverged update: listed, not written
                    node = int(msg.metadata.src_node_id)
                    self.captured.append({"round": server_round, "client": node, "node_id": node,
                                          "refused": f"the client answered with an error: {msg.error.reason}"})
                else:
                    try:
                        self._write(server_round, sent, msg, dp)
                    except NonFiniteReply as e:  # one client's diverged reply does not stop the capture
                        client = read_info(msg.content).get("client", int(msg.metadata.src_node_id))
                        self.captured.append({"round": server_round, "client": client,
                                              "node_id": int(msg.metadata.src_node_id), "refused": str(e)})
                        log.warning(f"round {server_round}, client {client}: {e}")
            write_text(self.folder / "captures.json", json.dumps(self.captured, indent=2) + "\n")
        return self.strategy.aggregate_train(server_round, replies)

    def _write(self, server_round: int, sent: Tensors, msg: Message, dp: dict[str, Any] | None) -> None:
        info = read_info(msg.content)
        node = int(msg.metadata.src_node_id)
        client = info.get("client", node)
        meta = {"source": "flower", "round": server_round, "node_id": node, "client": client,
                "reply_is": info.get("arrays", "weights"),
                "threat_model": {"server_sees": dp["server_sees"] if dp else "each update as the client sent it",
                                 "labels": "revealed by the protocol" if info.get("labels") is not None else "not sent",
                                 "obfuscation_known": True, "central_dp": dp}}
        obs = observation_from_reply(msg, sent, model=self.model, data=self.data, protocol=self.protocol, dp=dp,
                                     unclipped=self.unclipped, meta=meta)
        path = self.folder / f"round{server_round:03d}" / f"client{client}.pt"
        save(obs, path)
        self.captured.append({"round": server_round, "client": client, "node_id": node,
                              "file": str(path.relative_to(self.folder)),
                              "num_images": obs.num_images, "algorithm": obs.protocol.algorithm,
                              "obfuscation": [r["name"] for r in obs.obfuscation]})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def __getattr__(self, name: str) -> Any:  # e.g. privacy_spent() of a DP wrapper
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)


__all__ = ["CaptureStrategy", "NonFiniteReply", "central_dp", "observation_from_reply"]
