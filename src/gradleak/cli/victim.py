"""Victim-side subcommands: ``capture`` (a client's update on a batch, saved as an observation) and
``obfuscate`` (obfuscations applied to an observation file)."""

from __future__ import annotations

import argparse

from ..errors import UserError
from .arguments import _output


def cmd_capture(a: argparse.Namespace) -> int:
    from ..capture import capture_batch
    from ..federated import Protocol
    from ..obfuscation import parse_spec

    out = _output(a.out, "file", "--out")
    truth_path = _output(a.truth or out.parent / "truth.npz", "file", "--truth")
    if truth_path.resolve() == out.resolve():
        raise UserError(f"--truth and --out name the same file {out}; the truth goes to a file of its own")
    specs = [parse_spec(s) for s in a.obfuscation or []]
    proto = Protocol(algorithm=a.algorithm, local_steps=a.local_steps, local_lr=a.local_lr,
                     local_batch_size=a.local_batch_size, sends_buffers=a.sends_buffers,
                     per_example_clip=a.per_example_clip, num_clients_averaged=a.num_clients_averaged)
    c = capture_batch(a.data, protocol=proto, indices=a.indices, batch_size=a.batch_size, seed=a.seed, size=a.size,
                      arch=a.arch, num_classes=a.num_classes, model_state=a.model_state, model_seed=a.model_seed,
                      labels_known=a.labels_known, obfuscations=specs)
    c.save(out, truth_path)
    obs, k = c.observation, proto.num_clients_averaged
    clients = f", {k} clients x {obs.protocol.images_per_client} images averaged" if k > 1 else ""
    applied = ", ".join(o["name"] for o in obs.obfuscation) or "none"
    victim = f"{obs.model['arch']} from {a.model_state}" if a.model_state else obs.model["arch"]
    print(f"observation: {out}  ({victim}, {proto.algorithm}, B={obs.num_images}{clients}, obfuscation {applied}, "
          f"{c.bits} bits/update)")
    print(f"truth:       {truth_path}  (never read by attacks; pass it to 'gradleak attack --truth')")
    return 0


def cmd_obfuscate(a: argparse.Namespace) -> int:
    import torch

    from .. import observation
    from ..obfuscation import Context, apply, parse_spec, resolve_all

    _output(a.out, "file", "--out")
    specs = [parse_spec(s) for s in a.spec]
    resolve_all(specs)
    obs = observation.load(a.observation)
    generator = torch.Generator().manual_seed(int(a.seed))
    update, records, bits = apply(specs, obs.update, generator, Context.from_protocol(obs.protocol))
    obs.update = update
    obs.obfuscation = list(obs.obfuscation) + records
    observation.save(obs, a.out)
    print(f"{a.out}: applied {', '.join(r['name'] for r in records)} to {a.observation} "
          f"({bits} bits/update); obfuscation now {[o['name'] for o in obs.obfuscation]}")
    return 0
