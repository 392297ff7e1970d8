"""Several clients' rounded updates, read apart: the mean of K clients' updates split back into each client's.

Under secure aggregation the server receives only the mean of K clients' updates. Where every client rounded
its own update to a grid of its own step as its last obfuscation (a quantizer: ``uniform``, whose record's
``scale`` is the step; QSGD unbucketed, ``scale / s``) and the records give each client's step for each
tensor (``per_client``, as the victim side writes them), each entry of the mean is
``(1/K) sum_k step_k n_k`` with integer levels ``n_k``. Steps are real numbers in general position, so few
level vectors give the same sum to within the floats' rounding: :func:`levels` looks each entry up in the
sorted table of all sums with levels up to ``L`` in magnitude, for ``L`` = 1, 2, 4, ... (most entries of a
rounded update are a step or two; the smallest table that holds a match is taken first, and within it the
nearest match). Each client's update is then ``step_k n_k``: :func:`split` returns one
Observation per client, each attacked as one client's batch.

This reads what the records give: a deployment that sums integer codes under one common scale (the usual
way secure aggregation meets quantization) gives no client's own step, and nothing is split.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from .. import obfuscation
from ..observation import Observation
from .aware import steps as obfuscation_steps

#: The largest table of level sums (entries): ``(2L + 1)^K`` may not pass it, so K clients' levels are read
#: up to the largest ``L`` that allows (4 clients: 18).
MAX_TABLE = 2 ** 21
#: The share of the update's entries that must be read for the split to stand; below it nothing is split.
MIN_READ = 0.99


def _client_records(obs: Observation) -> list[list[dict[str, Any]]] | None:
    """Each client's own obfuscation records: the merged record's common values with that client's
    ``per_client`` ones (:func:`gradleak.obfuscation.merge_client_records` undone); None where a record's
    ``per_client`` is not one dict per client."""
    k = int(obs.protocol.num_clients_averaged)
    out: list[list[dict[str, Any]]] = [[] for _ in range(k)]
    for rec in obs.obfuscation:
        pc = rec.get("per_client")
        if pc is not None and not (isinstance(pc, list) and len(pc) == k and all(isinstance(c, dict) for c in pc)):
            return None
        base = {key: v for key, v in rec.items() if key not in ("per_client", "sigma_of_mean")}
        for i in range(k):
            out[i].append({**base, **(pc[i] if pc else {})})
    return out


def client_steps(obs: Observation) -> tuple[list[dict[str, float]], int] | str:
    """Each client's rounding step for every tensor of the update and the largest level the quantizer
    sends, or why there is none (the reason is a phrase)."""
    k = int(obs.protocol.num_clients_averaged)
    if k <= 1:
        return "one client's update"
    read = obfuscation_steps(obs, obs.update)  # the non-identity steps (an unknown name is a one-line UserError)
    if not read or read[-1].ob.family != "quantize":
        return "the clients' last obfuscation is not a quantizer"
    ob, last = read[-1].ob, read[-1].index - 1
    pc = obs.obfuscation[last].get("per_client")
    if not (isinstance(pc, list) and len(pc) == k and all(isinstance(c, dict) for c in pc)):
        return "the records do not give each client's quantizer values"
    records = _client_records(obs)
    if records is None:  # an earlier step's
        return "the records do not give each client's values"
    if 3 ** k > MAX_TABLE:
        return f"{k} clients: their levels of one step alone make {3 ** k} sums, past the {MAX_TABLE} a table holds"
    out = []
    top = None
    for mine in records:
        rec = mine[last]
        try:
            values = obfuscation.server_record(rec, obfuscation.Received(
                obs.update, obfuscation.Context.from_protocol(obs.protocol), exact=False,
                inexact=f"the mean of {k} clients' updates, no client's own"))
        except obfuscation.Underivable as e:
            return f"a client's quantizer values are unknown ({e})"
        scale = values.get("scale")
        if not isinstance(scale, dict) or values.get("bucket_size"):
            return "the records do not give each client's step for each tensor"
        div = float(values["s"]) if ob.stochastic else 1.0
        # the most steps an entry may be: QSGD's s; a rounding's levels - 1 where its record gives them
        given = rec.get("levels") or values.get("levels")
        try:
            most = int(values["s"]) if ob.stochastic else int(given) - 1 if given else 2 ** 31 - 1
        except (TypeError, ValueError):
            return "the records do not give the clients' levels"
        top = max(1, most if top is None else max(top, most))
        each = {}
        for name in obs.update:
            step = scale.get(name)
            if not isinstance(step, (int, float)) or not 0 <= float(step) < float("inf"):
                return f"the records give no client's step for '{name}'"
            each[name] = float(step) / div
        out.append(each)
    return out, int(top)


def readable(k: int, top: int) -> int:
    """The largest level of K clients' that :func:`levels` reads: ``top``, or less where its table would
    pass :data:`MAX_TABLE` (at least 1)."""
    largest = 1
    while largest < top and (2 * (largest + 1) + 1) ** k <= MAX_TABLE:
        largest += 1
    return largest


def _table(steps: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All sums ``steps . n`` with integer ``|n_k| <= bound``, sorted, and their level vectors."""
    r = torch.arange(-bound, bound + 1, dtype=torch.int32)
    n = torch.cartesian_prod(*[r] * len(steps)).reshape(-1, len(steps))
    sums = n.double() @ steps
    order = torch.argsort(sums, stable=True)
    return sums[order], n[order]


def levels(mean: torch.Tensor, steps: list[float], top: int, *, clients: int | None = None,
           deadline: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The integer levels behind each entry of ``mean`` = ``(1/K) sum_k steps[k] n_k`` (K = ``clients``,
    by default the number of steps; clients whose step is zero sent zeros and are left out of ``steps``),
    each ``|n_k| <= top``: (levels len(steps) x numel, int32; read, a bool per entry; ambiguous, a bool
    per entry). An entry counts as read where one level vector's sum lies within what rounding each
    client's value and the mean to the received dtype can leave; where two do in the same table, the
    entry is ambiguous and not read (the nearer is still returned). Past ``deadline`` (a
    ``time.perf_counter()`` value) no further table is searched."""
    k = len(steps)
    clients = k if clients is None else int(clients)
    info = torch.finfo(mean.dtype)
    eps = float(info.eps)
    y = mean.detach().reshape(-1).to("cpu", torch.float64) * clients
    d = torch.tensor(steps, dtype=torch.float64)
    out = torch.zeros(k, y.numel(), dtype=torch.int32)
    read = torch.zeros(y.numel(), dtype=torch.bool)
    ambiguous = torch.zeros(y.numel(), dtype=torch.bool)
    largest = readable(k, top)
    bounds = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b < largest} | {min(top, largest)})
    # allowed: twice the rounding of each value and of the mean (half an eps each), the sums of a float64
    # mean (one eps per client), and the absolute spacing of subnormal numbers
    allow = 2.0 + (2.0 * clients if eps < 1e-10 else 0.0)
    floor = clients * float(info.tiny) * eps
    todo = torch.arange(y.numel())
    for bound in bounds:
        if todo.numel() == 0 or (deadline is not None and time.perf_counter() > deadline):
            break
        sums, n = _table(d, bound)
        mag = n.abs().double() @ d.abs()
        left = []
        for c0 in range(0, todo.numel(), 1 << 20):
            ix = todo[c0:c0 + (1 << 20)]
            yy = y[ix]
            at = torch.searchsorted(sums, yy)
            window = (at[:, None] + torch.arange(-2, 2)[None, :]).clamp(0, sums.numel() - 1)  # n x 4
            # the residual in units of that rounding: the truth's is below 1 (float32), and within a table
            # the smallest wins (a larger table's spurious matches lie near it as often as the truth)
            off = (yy[:, None] - sums[window]).abs() / (0.5 * eps * (yy.abs()[:, None] + mag[window]) + floor)
            off = torch.where(torch.isfinite(off), off, torch.full_like(off, float("inf")))
            best = off.argmin(dim=1)
            hit = off.gather(1, best[:, None])[:, 0] <= allow
            # another level vector as near (a window slot that is not the same table entry)
            others = (off <= allow) & (window != window.gather(1, best[:, None]))
            two = hit & others.any(dim=1)
            pick = window[torch.arange(ix.numel()), best][hit]
            out[:, ix[hit]] = n[pick].T
            read[ix[hit & ~two]] = True
            ambiguous[ix[two]] = True
            left.append(ix[~hit])
        todo = torch.cat(left)
    return out, read, ambiguous


def split(obs: Observation, time_limit: float | None = None
          ) -> tuple[list[Observation], dict[str, Any]] | tuple[None, str]:
    """One Observation per client (its update ``step_k n_k``, its own records, its labels where the mean's
    are given, in the clients' order), and what the split read; or None and why nothing is split (also when
    ``time_limit`` seconds pass first). Entries no level vector explains are shared among the clients in
    proportion to their steps; where two explain one about equally, the nearer is taken and the entry does
    not count as read. BatchNorm statistics sent with the update are the clients' mean, no client's own:
    the clients' observations go without them."""
    t0 = time.perf_counter()
    got = client_steps(obs)
    if isinstance(got, str):
        return None, got
    steps, top = got
    k = len(steps)
    records = _client_records(obs)  # checked by client_steps
    deadline = None if time_limit is None else t0 + float(time_limit)
    updates: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    total, unread, ambiguous = 0, 0, 0
    per_tensor = {}
    for name, m in obs.update.items():
        d = [s[name] for s in steps]
        for u in updates:
            u[name] = torch.zeros_like(m)
        live = [i for i, x in enumerate(d) if x > 0]  # a zero step: that client's tensor was all zeros
        if not live or m.numel() == 0:
            per_tensor[name] = 1.0
            continue
        n, read, two = levels(m, [d[i] for i in live], top, clients=k, deadline=deadline)
        y = m.detach().reshape(-1).to("cpu", torch.float64) * k
        share = torch.tensor([d[i] for i in live], dtype=torch.float64)
        share = share / share.sum()
        for j, i in enumerate(live):  # an ambiguous entry takes the nearest sum's levels (right in 394 of 404
            # on the report batch, QSGD 16, 4 clients; all 235 of fc1) but does not count as read
            v = torch.where(read | two, n[j].double() * d[i], y * share[j])
            updates[i][name] = v.reshape(m.shape).to(device=m.device, dtype=m.dtype)
        total += m.numel()
        unread += int((~read).sum())
        ambiguous += int(two.sum())
        per_tensor[name] = round(float(read.double().mean()), 6)
    share_read = 1.0 - unread / max(total, 1)
    late = deadline is not None and time.perf_counter() > deadline
    if share_read < MIN_READ:
        return None, (f"only {100 * share_read:.1f} % of the mean's entries are one sum of the clients' levels "
                      + (f"in the {float(time_limit):.1f} s the split may take" if late else
                         f"(read up to {readable(k, top)} of the {top} levels each client may send"
                         + (f"; {ambiguous} entries two sums explain" if ambiguous else "") + ")"))
    b = obs.protocol.images_per_client
    proto = dataclasses.replace(obs.protocol, num_clients_averaged=1, num_images=b, sends_buffers=False)
    clients = [dataclasses.replace(obs, update=updates[i], protocol=proto, obfuscation=records[i], buffers=None,
                                   labels=None if obs.labels is None else obs.labels[i * b:(i + 1) * b].clone())
               for i in range(k)]
    info = {"clients": k, "entries_read": round(share_read, 6), "ambiguous": ambiguous, "per_tensor": per_tensor,
            "levels_read": readable(k, top), "largest_level": top, "seconds": round(time.perf_counter() - t0, 3)}
    if obs.buffers is not None:
        info["buffers"] = "the clients' mean BatchNorm statistics, no client's own: not given to the clients"
    return clients, info
