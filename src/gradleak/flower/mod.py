"""A Flower client mod that obfuscates every training reply with gradleak's obfuscations.

    from gradleak.flower import obfuscation_mod
    app = ClientApp(mods=[obfuscation_mod(["qsgd:levels=16"])])

The mod lets the ClientApp train, takes the update out of its reply (the new weights minus the weights
the server sent, Flower's convention; or the reply's arrays themselves when gradleak's train function
says they are the update), runs :func:`gradleak.obfuscation.apply` on it — the one path that captures and
utility runs use — and puts the obfuscated update back into the reply. The obfuscation records travel to
the server in the reply's ``"gradleak"`` ConfigRecord (:mod:`.records`), so a capture on the server
(:class:`gradleak.flower.CaptureStrategy`) writes them into the Observation.

Per-example clipping (``Protocol.per_example_clip``) happens inside training, not after it: the train
function of :mod:`.client` does it through :func:`gradleak.federated.client.client_update`. The mod reads
the protocol from the reply (or from its ``protocol`` argument) so that Gaussian noise after per-example
clipping is calibrated to the per-image sensitivity ``per_example_clip / B``.

Noise comes from a generator seeded per (seed, round, client) when ``seed`` is given (reproducible
simulations), and from the operating system's entropy when it is not — what a real client must do.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from flwr.app import Context, Message
from torch import nn

from .. import obfuscation
from ..errors import UserError
from ..federated.protocol import ObservedProtocol, Protocol
from .records import REFUSED_KEY, array_key, client_of, is_train, num_examples, read_info, round_of, to_record, \
    to_tensors, write_info

ProtocolSource = Protocol | Callable[[int], Protocol] | None


def noise_generator(seed: int | None, server_round: int, client: int) -> torch.Generator:
    """The generator of one client's noise in one round: seeded from (seed, round, client), or from the
    operating system's entropy when ``seed`` is None."""
    g = torch.Generator()
    if seed is None:
        g.seed()
        return g
    words = np.random.SeedSequence([int(seed), int(server_round), int(client)]).generate_state(2, np.uint32)
    return g.manual_seed((int(words[0]) << 32) | int(words[1]))


def protocol_header(source: ProtocolSource, examples: int | None) -> dict[str, Any] | None:
    """The protocol header of an update of ``examples`` images from a Protocol (or a function of the
    number of images returning one); None when either is unknown."""
    if source is None or not examples:
        return None
    proto = source if isinstance(source, Protocol) else source(int(examples))
    return proto.observed(int(examples)).header()


def _names(parameters: nn.Module | Sequence[str] | None) -> list[str] | None:
    if parameters is None:
        return None
    if isinstance(parameters, nn.Module):
        return [n for n, _ in parameters.named_parameters()]
    return [str(n) for n in parameters]


class ObfuscationMod:
    """The mod :func:`obfuscation_mod` returns (see there)."""

    def __init__(self, obfuscations: Sequence[Any] = (), *, protocol: ProtocolSource = None,
                 parameters: nn.Module | Sequence[str] | None = None, seed: int | None = None,
                 sample_rate: float | None = None, rounds: int | None = None):
        self.specs = [obfuscation.normalize(s) for s in obfuscations]
        obfuscation.resolve_all(self.specs)  # a bad spec fails when the app is built, not in a round
        self.protocol = protocol
        self.parameters = _names(parameters)
        self.seed = seed
        self.sample_rate = sample_rate
        self.rounds = rounds

    def __call__(self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if not is_train(msg):
            return call_next(msg, context)
        sent = to_tensors(msg.content[array_key(msg.content, "the server's train message")])
        out = call_next(msg, context)
        if out.has_error() or REFUSED_KEY in out.content:  # nothing to obfuscate
            return out
        key = array_key(out.content, "the client's train reply")
        info = read_info(out.content)
        arrays = to_tensors(out.content[key])
        mode = info.get("arrays", "weights")
        names = self._parameters(info, arrays)
        update = {n: arrays[n] - sent[n] if mode == "weights" else arrays[n] for n in names}
        header = info.get("protocol") or protocol_header(self.protocol, num_examples(out.content))
        kw = {"sample_rate": self.sample_rate, "rounds": self.rounds}
        ctx = (obfuscation.Context.from_protocol(ObservedProtocol.from_header(header), **kw) if header
               else obfuscation.Context(**kw))
        server_round, client = round_of(msg), client_of(context)
        obfuscated, records, bits = obfuscation.apply(self.specs, update, noise_generator(self.seed, server_round,
                                                                                             client), ctx)
        for n in names:
            arrays[n] = sent[n] + obfuscated[n] if mode == "weights" else obfuscated[n]
        out.content[key] = to_record(arrays)
        info.update(arrays=mode, parameters=names, obfuscation=list(info.get("obfuscation", [])) + records,
                    update_bits=bits, client=client, round=server_round)
        if header:
            info["protocol"] = header
        write_info(out.content, info)
        return out

    def _parameters(self, info: dict[str, Any], arrays: dict[str, torch.Tensor]) -> list[str]:
        names = info.get("parameters") or self.parameters or [k for k, v in arrays.items() if v.is_floating_point()]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise UserError(f"obfuscation_mod: the reply has no array '{missing[0]}' (a parameter of the model)")
        return list(names)


def obfuscation_mod(obfuscations: Sequence[Any] = (), *, protocol: ProtocolSource = None,
                    parameters: nn.Module | Sequence[str] | None = None, seed: int | None = None,
                    sample_rate: float | None = None, rounds: int | None = None) -> ObfuscationMod:
    """A Flower mod that applies gradleak obfuscations (specs as in ``gradleak capture --obfuscation``,
    e.g. ``["topk:fraction=0.1", "gaussian:clip=1,noise_multiplier=0.5"]``) to every training reply.

    ``protocol``: what the client computes (a :class:`~gradleak.federated.protocol.Protocol`, or a function
    of the client's number of images returning one); only needed when the reply does not say it itself
    (gradleak's train function does), for noise calibrated to per-example clipping and for the server's
    capture. ``parameters``: the model (or its parameter names) when it has buffers, such as BatchNorm
    statistics, that are not part of the update; by default every floating-point array is.
    ``seed``: reproducible noise (simulations only); None draws it from the operating system.
    ``sample_rate``, ``rounds``: the DP schedule for the accounting of Gaussian noise (the probability
    that a client takes part in a round, and the number of rounds).
    """
    return ObfuscationMod(obfuscations, protocol=protocol, parameters=parameters, seed=seed,
                          sample_rate=sample_rate, rounds=rounds)


__all__ = ["ObfuscationMod", "noise_generator", "obfuscation_mod", "protocol_header"]
