"""What gradleak puts into Flower messages, and reads back out of them.

A Flower training reply carries one ArrayRecord (by Flower's convention under ``"arrays"``: the new
model weights) and one MetricRecord (``"num-examples"``, the client's aggregation weight). gradleak's
client side adds one ConfigRecord, ``"gradleak"``, holding a JSON object (:func:`read_info`) with:

``arrays``       ``"weights"`` (Flower's convention: the ArrayRecord holds the weights after training, so
                 the update is their difference from the weights the server sent) or ``"update"`` (the
                 ArrayRecord holds the update itself: a FedSGD gradient or a FedAvg weight delta)
``protocol``     the protocol header of the update (:meth:`gradleak.federated.protocol.ObservedProtocol.header`)
``parameters``   the names of the model's parameters, in order (the other arrays are buffers)
``obfuscation``  the obfuscation records, in the order they were applied (:func:`gradleak.obfuscation.apply`)
``update_bits``  the update's communication cost after the last obfuscation
``client``, ``round``  who sent it (the simulation's partition id, else the node id) and when
``labels``       the batch's labels, only when the client's protocol reveals them

Everything a curious server could write into an Observation travels this way; nothing else does.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from ..errors import UserError
from ..obfuscation import plain

INFO_KEY = "gradleak"
ARRAYS_KEY = "arrays"  # Flower's strategies send and expect the model under this key
METRICS_KEY = "metrics"
BUFFERS_KEY = "gradleak-buffers"  # buffers travel here when the ArrayRecord holds an update
REFUSED_KEY = "gradleak-refused"  # a utility run's client that sends nothing says why here (e.g. it diverged)
NUM_EXAMPLES = "num-examples"  # Flower's FedAvg weights replies by this metric
ROUND = "server-round"  # Flower's strategies put the round number into the train config
PARTITION_ID = "partition-id"  # what Flower's simulation engine tells each virtual node


Tensors = dict[str, torch.Tensor]


def to_tensors(record: ArrayRecord) -> Tensors:
    """An ArrayRecord as CPU tensors (copies: the record is left as it was), keys in its order."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def to_record(tensors: Tensors) -> ArrayRecord:
    """Tensors as an ArrayRecord (moved to the CPU), keys in their order; a 0-d tensor (BatchNorm's
    ``num_batches_tracked``) stays 0-d."""
    return ArrayRecord({k: Array(np.asarray(v.detach().cpu().numpy(), order="C")) for k, v in tensors.items()})


def is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".")[0] == MessageType.TRAIN


def array_key(content: RecordDict, where: str) -> str:
    """The key of the message's model ArrayRecord: ``"arrays"`` when present, else the only one."""
    keys = [k for k in content.array_records if k != BUFFERS_KEY]
    if ARRAYS_KEY in keys:
        return ARRAYS_KEY
    if len(keys) != 1:
        raise UserError(f"{where}: expected one ArrayRecord (the model), found {len(keys)}: {', '.join(keys)}")
    return keys[0]


def read_info(content: RecordDict) -> dict[str, Any]:
    """gradleak's entry of a reply (an empty dict when the reply has none)."""
    if INFO_KEY not in content.config_records:
        return {}
    text = content.config_records[INFO_KEY].get("json")
    try:
        info = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict):
        raise UserError(f"the reply's '{INFO_KEY}' ConfigRecord does not hold a JSON object under 'json'")
    return info


def write_info(content: RecordDict, info: dict[str, Any]) -> None:
    content[INFO_KEY] = ConfigRecord({"json": json.dumps(plain(info))})


def num_examples(content: RecordDict) -> int | None:
    """The reply's ``num-examples`` metric (Flower's aggregation weight), if it has one."""
    for record in content.metric_records.values():
        value = record.get(NUM_EXAMPLES)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return None


def round_of(msg: Message) -> int:
    """The training round a message belongs to: the ``server-round`` config entry Flower's strategies
    send, else the message's group id when it is a number, else 0."""
    for record in msg.content.config_records.values():
        value = record.get(ROUND)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else 0


def client_of(context: Context) -> int:
    """Who a client is: its partition id in a Flower simulation, else its node id."""
    pid = context.node_config.get(PARTITION_ID)
    return int(pid) if isinstance(pid, int) else int(context.node_id)


def reply(msg: Message, arrays: Tensors, examples: int, info: dict[str, Any],
          buffers: Tensors | None = None) -> Message:
    """A training reply in Flower's layout (one ArrayRecord, one MetricRecord) with gradleak's entry."""
    content = RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: MetricRecord({NUM_EXAMPLES: int(examples)})})
    if buffers:
        content[BUFFERS_KEY] = to_record(buffers)
    write_info(content, info)
    return Message(content, reply_to=msg)


__all__ = ["ARRAYS_KEY", "BUFFERS_KEY", "INFO_KEY", "NUM_EXAMPLES", "REFUSED_KEY", "ROUND", "array_key", "client_of",
           "is_train", "num_examples", "read_info", "reply", "round_of", "to_record", "to_tensors", "write_info"]
