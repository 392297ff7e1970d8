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

Where the records do not give each client's step (a server told only the quantizer, not the clients'
scales; or with ``client_steps: mean``), :func:`read_steps` reads them off the mean itself, for its
largest layer weight: an entry one client alone sent as one step is that step over K, so the steps are among the
tensor's most frequent values, and of the sets of those that explain the rest, the one whose clients'
levels are zero in the most whole rows and columns (a client's own update of a layer is zero for every
unit none of its images switches on and every input none of them has) is taken. Which step of another
tensor is which client's is then not known: each client is given the mean there.

A deployment that sums integer codes under one common scale (the usual way secure aggregation meets
quantization) has no client's own step to read, and nothing is split.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
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
#: Steps read off the mean (where the records do not give each client's, or ``client_steps: mean``): the
#: positive values of the largest layer weight's mean that occur most often, this many of them, are looked at.
READ_CANDIDATES = 64
#: ... in a tensor of at least this many nonzero entries (fewer show no client's step often enough).
READ_MIN_ENTRIES = 4096
#: At most this many K-sets of those candidates are tried (fewer candidates past it).
READ_SUBSETS = 5000
#: The K-sets that explain the most of the candidates' entries, this many, are checked on them.
READ_BASES = 24
#: The rows of the tensor (evenly spaced) on which the candidate sets' zeros are counted.
READ_ROWS = 32
#: The most clients whose steps are read off the mean (measured up to 8; the sets to compare grow as
#: comb(candidates, K) x 3^K).
READ_MAX_CLIENTS = 8
#: Two sums of steps are one where they differ by less than this relative amount (float32 values).
READ_TOLERANCE = 1e-5


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


def read_steps(mean: torch.Tensor, k: int, top: int, deadline: float | None = None) -> list[float] | None:
    """K clients' rounding steps of one tensor read off the mean of their rounded values alone (ascending),
    each client's levels at most ``top``; None where they do not show.

    An entry one client alone sent as one step is ``step_k / K``, the same float wherever it occurs, so
    the steps are among the tensor's most frequent magnitudes (:data:`READ_CANDIDATES` of them are looked
    at). Those are also sums of steps (two clients of opposite labels send opposite signs, so a difference
    of two steps can be the most frequent of all), and any basis of the lattice the steps span explains
    them as well. So of the K-sets of candidates
    that explain the most of the candidates' entries as sums with levels -2 to 2 (-1 to 1 past 6 clients),
    :data:`READ_BASES` of them, are compared by the zeros of their clients' levels on :data:`READ_ROWS`
    rows of the tensor (its first dimension): the rows and columns all zero in a client's levels (an
    entry not read is no zero), summed over the clients. A client's own update of a layer is exactly zero
    in every row of a unit none of its images switches on and in every column of an input none of them
    has; a basis that mixes two clients is zero there only where both are, and one that spans less than
    the clients' lattice reads fewer entries, so the clients' own steps give the most. None also where no
    set's levels have a zero row or column or two sets have as many (the zeros tell no client apart), and
    past ``deadline`` (a ``time.perf_counter()`` value). The tensor is a layer's weight (2-D): its rows a
    layer's units, its columns their inputs."""
    v = mean.detach().reshape(-1).abs()
    v = v[v > 0]
    if k < 1 or v.numel() < READ_MIN_ENTRIES:
        return None
    values, counts = torch.unique(v, return_counts=True)
    n = max(k, min(READ_CANDIDATES, values.numel()))
    while n > k and math.comb(n, k) > READ_SUBSETS:
        n -= 1
    if values.numel() < k:
        return None
    order = torch.argsort(counts, descending=True, stable=True)[:n]
    cand = values[order].double() * k
    weight = counts[order].double()
    span = 2 if 5 ** k <= 1 << 16 else 1
    r = torch.arange(-span, span + 1, dtype=torch.float64)
    levels_small = torch.cartesian_prod(*[r] * k).reshape(-1, k)
    scored = []
    for subset in itertools.combinations(range(n), k):
        if deadline is not None and time.perf_counter() > deadline:
            return None
        sums = levels_small @ cand[list(subset)]
        hit = ((sums[:, None] - cand[None, :]).abs() <= READ_TOLERANCE * cand[None, :]).any(dim=0)
        scored.append((float(weight[hit].sum()), subset))
    scored.sort(key=lambda t: -t[0])
    bases = [sub for m, sub in scored[:READ_BASES] if m >= 0.5 * scored[0][0]]
    rows = mean.detach().reshape(mean.shape[0] if mean.dim() > 1 else 1, -1)
    sample = rows[torch.linspace(0, rows.shape[0] - 1, min(READ_ROWS, rows.shape[0])).long()]
    counts = []
    for sub in bases:
        if deadline is not None and time.perf_counter() > deadline:
            return None
        steps = sorted(float(cand[i]) for i in sub)
        lv, read, _ = levels(sample, steps, top, clients=k)
        zero = ((lv == 0) & read[None, :]).reshape(k, sample.shape[0], -1)  # an entry not read is no zero
        counts.append((int(zero.all(dim=2).sum()) + int(zero.all(dim=1).sum()), steps))
    if not counts:
        return None
    most = max(c for c, _ in counts)
    best = [steps for c, steps in counts if c == most]
    # no zero row or column in any set's levels, or two sets as good: the zeros tell no client apart
    return best[0] if most > 0 and len(best) == 1 else None


def _unscaled(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The merged records without the clients' own values (``per_client``, and the scale they differ in)
    nor the noise of their mean (``sigma_of_mean``): what a server told no client's own values knows."""
    out = []
    for rec in records:
        r = {key: v for key, v in rec.items() if key not in ("per_client", "sigma_of_mean")}
        if "per_client" in rec:
            r.pop("scale", None)
        out.append(r)
    return out


def _read_records(obs: Observation, steps: list[dict[str, float | None]]) -> list[list[dict[str, Any]]]:
    """Each client's records where its steps were read off the mean: the merged records without the clients'
    values (:func:`_unscaled`), the last quantizer's ``scale`` that client's read step for the tensor split
    and, for every other tensor (where the client is given the mean), what its rounding would have
    recorded for the mean (QSGD: its max- or l2-norm; uniform: the largest entry over levels - 1)."""
    last = obfuscation_steps(obs, obs.update)[-1]
    rec = obs.obfuscation[last.index - 1]
    div = float(rec["s"]) if last.ob.stochastic else 1.0
    per = 1.0 if last.ob.stochastic else float(int(rec["levels"]) - 1)
    l2 = last.ob.stochastic and rec.get("norm") == "l2"
    of_mean = {name: ((float(v.detach().double().norm()) if l2 else float(v.detach().double().abs().max()) / per)
                      if v.numel() else 0.0)
               for name, v in obs.update.items() if steps[0][name] is None}
    out = []
    for mine in steps:
        records = _unscaled(obs.obfuscation)
        records[last.index - 1]["scale"] = {name: float(mine[name]) * div if mine[name] is not None
                                            else of_mean[name] for name in obs.update}
        out.append(records)
    return out


def client_steps(obs: Observation, source: str = "records", deadline: float | None = None
                 ) -> tuple[list[dict[str, float | None]], int, str | None] | str:
    """Each client's rounding step for every tensor of the update, the largest level the quantizer sends,
    and the tensor whose steps were read off the mean (None where the records gave every step), or why
    there is none (the reason is a phrase). ``source`` "records": the records' per-client steps where
    they give them, else the steps read off the mean (:func:`read_steps`); "mean": read off the mean
    even where the records give them (a server not told each client's scale). Steps read off the mean
    are the largest layer weight's only: which step of another tensor is which client's is not known, so
    every other tensor's step is None (each client is given the mean there); the clients come in the
    order of their steps, not the records'."""
    k = int(obs.protocol.num_clients_averaged)
    if k <= 1:
        return "one client's update"
    read = obfuscation_steps(obs, obs.update)  # the non-identity steps (an unknown name is a one-line UserError)
    if not read or read[-1].ob.family != "quantize":
        return "the clients' last obfuscation is not a quantizer"
    ob, last = read[-1].ob, read[-1].index - 1
    if 3 ** k > MAX_TABLE:
        return f"{k} clients: their levels of one step alone make {3 ** k} sums, past the {MAX_TABLE} a table holds"
    got = _recorded_steps(obs, ob, last, k) if source == "records" else "the records' steps are not used"
    if not isinstance(got, str):
        return (*got, None)
    return _steps_off_the_mean(obs, ob, last, k, got, deadline)


def _steps_off_the_mean(obs: Observation, ob, last: int, k: int, why: str, deadline: float | None
                        ) -> tuple[list[dict[str, float | None]], int, str] | str:
    """:func:`client_steps` read off the largest layer weight's (2-D) mean, or why not (``why``: why the records'
    steps were not taken)."""
    rec = obs.obfuscation[last]
    if rec.get("bucket_size"):
        return f"{why}, and QSGD's steps per bucket are not read off the mean"
    if k > READ_MAX_CLIENTS:
        return f"{why}, and past {READ_MAX_CLIENTS} clients their steps are not read off the mean"
    try:
        top = int(rec["s"]) if ob.stochastic else int(rec["levels"]) - 1
    except (KeyError, TypeError, ValueError):
        return f"{why}, and the records do not give the clients' levels"
    weights = [n for n, v in obs.update.items() if v.dim() == 2]
    if not weights:
        return f"{why}, and the update has no layer's weight (2-D) to read the clients' steps off"
    name = max(weights, key=lambda n: obs.update[n].numel())
    found = read_steps(obs.update[name], k, max(1, top), deadline=deadline)
    if found is None:
        if deadline is not None and time.perf_counter() > deadline:
            return f"{why}, and the clients' steps were not read off the mean in the time the split may take"
        return f"{why}, and the clients' steps do not show in the mean's values of '{name}'"
    return [{n: (found[i] if n == name else None) for n in obs.update} for i in range(k)], max(1, top), name


def _recorded_steps(obs: Observation, ob, last: int, k: int) -> tuple[list[dict[str, float]], int] | str:
    """:func:`client_steps` from the records' per-client values, or why not."""
    pc = obs.obfuscation[last].get("per_client")
    if not (isinstance(pc, list) and len(pc) == k and all(isinstance(c, dict) for c in pc)):
        return "the records do not give each client's quantizer values"
    records = _client_records(obs)
    if records is None:  # an earlier step's
        return "the records do not give each client's values"
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


def split(obs: Observation, time_limit: float | None = None, source: str = "records"
          ) -> tuple[list[Observation], dict[str, Any]] | tuple[None, str]:
    """One Observation per client (its update ``step_k n_k``, its own records, its labels where the mean's
    are given, in the clients' order), and what the split read; or None and why nothing is split (also when
    ``time_limit`` seconds pass first). Entries no level vector explains are shared among the clients in
    proportion to their steps; where two explain one about equally, the nearer is taken and the entry does
    not count as read. BatchNorm statistics sent with the update are the clients' mean, no client's own:
    the clients' observations go without them. ``source``: where the steps come from
    (:func:`client_steps`); where they were read off the mean, each client is given the mean in every
    other tensor (``entries_given_the_mean``; the share read is that of the tensor split), records with
    its read step as the scale (:func:`_read_records`), and no labels (which client is which is not
    known)."""
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + float(time_limit)
    got = client_steps(obs, source, deadline)
    if isinstance(got, str):
        return None, got
    steps, top, read_from = got
    k = len(steps)
    records = _client_records(obs)
    if read_from is not None or records is None:
        records = _read_records(obs, steps)
    updates: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    total, unread, ambiguous, given_mean = 0, 0, 0, 0
    per_tensor = {}
    for name, m in obs.update.items():
        d = [s[name] for s in steps]
        if any(x is None for x in d):  # no client's step known here: each is given the mean, not read
            for u in updates:
                u[name] = m.detach().clone()
            given_mean += m.numel()
            per_tensor[name] = 0.0
            continue
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
    labels = obs.labels if read_from is None else None  # steps read off the mean: no client is known as which
    clients = [dataclasses.replace(obs, update=updates[i], protocol=proto, obfuscation=records[i], buffers=None,
                                   labels=None if labels is None else labels[i * b:(i + 1) * b].clone())
               for i in range(k)]
    info = {"clients": k, "entries_read": round(share_read, 6), "ambiguous": ambiguous, "per_tensor": per_tensor,
            "levels_read": readable(k, top), "largest_level": top, "seconds": round(time.perf_counter() - t0, 3),
            "steps": "the records' per-client values" if read_from is None else
            f"read off the mean's most frequent values of '{read_from}' (the other tensors each client's mean)",
            "steps_read_off": read_from}
    if given_mean:
        info["entries_given_the_mean"] = given_mean
        info["tensors_given_the_mean"] = [n for n in obs.update if steps[0][n] is None]
        info["note"] = ("each client is given the mean in those tensors: a fallback that reads labels or "
                        "matches gradients there reads all clients'")
    if obs.buffers is not None:
        info["buffers"] = "the clients' mean BatchNorm statistics, no client's own: not given to the clients"
    return clients, info
