"""FedAvg-aware matching, and its obfuscation-unaware counterpart.

The :class:`~gradleak.attacks.simulate.Simulator` already unrolls a FedAvg client exactly: it runs the
client's ``local_steps`` SGD steps of ``local_lr`` from the weights the server sent, functionally
(``torch.func.functional_call`` on explicit tensors, via the same
:func:`gradleak.federated.protocol.local_update` the victim ran), and its simulated update is the weight
delta, which the attack matches to the observed one. That is the default (``unroll_local_steps: true``).

:func:`assume_fedsgd` is what an attacker does who ignores local training: it reads the weight delta as
one gradient step, ``gradient ~ -delta / (local_lr * local_steps)``, and simulates a FedSGD gradient.
"""

from __future__ import annotations

import dataclasses

from ..federated.arithmetic import fedavg_gradient_scale
from .objectives import Matching
from .simulate import Simulator

def assume_fedsgd(sim: Simulator) -> Simulator:
    """Turn ``sim`` into a FedSGD simulator whose target is the delta read as a mean gradient
    (:func:`gradleak.federated.arithmetic.fedavg_gradient_scale`)."""
    p = sim.protocol
    if p.algorithm != "fedavg":
        return sim
    scale = fedavg_gradient_scale(p)
    sim.target = {k: v * scale for k, v in sim.target.items()}
    sim.protocol = dataclasses.replace(p, algorithm="fedsgd", local_steps=1, local_lr=0.0, local_batch_size=None)
    return sim


def in_delta_units(matching: Matching, step: float) -> Matching:
    """``matching`` (built against the observed weight delta) applied to a simulated gradient ``g`` read
    as the delta ``step * g`` (``step = -local_lr * local_steps``,
    :func:`gradleak.federated.arithmetic.fedavg_delta_scale`), so the objective's thresholds, noise
    levels and quantization steps stay in the units the obfuscation records."""
    return Matching(matching.name, lambda update: matching({k: v * step for k, v in update.items()}), matching.info)
