"""Obfuscation-aware matching: objectives chosen from what the server knows the client did.

When the attacker knows the obfuscation (setting ``attacker_knows_obfuscation``, default true) and the
observation's ``obfuscation`` list names one, :func:`for_observation` replaces the plain objective. It
reads each step through the registry's declarations (:mod:`gradleak.obfuscation.registry`), never by
name, so an obfuscation registered with a family is attacked with no change here:

- **sparsify** (``topk``, ``randk``, ``prune``): the coordinates that were sent are visible (non-zero)
  as long as every later step keeps zeros, so only those are compared (masked cosine / L2); a
  per-tensor ``rescale`` in the record (random-k's n/k) is undone; where the obfuscation bounds the
  entries it did not send (top-k, pruning), that bound is matched too.
- **sign** (``sign``): a smooth sign-agreement loss between the candidate's gradient g and the
  received signs (softplus of the disagreement, with +1 standing for "not negative", since signSGD
  sends +1 for an exact zero), with the temperature ``tau_l`` a fraction (``sign_temperature``) of the
  candidate's own root-mean-square gradient in layer l (scale-free).
- **stochastic quantize** (``qsgd``): the exact likelihood of the received levels. Stochastic rounding
  of f = s g / M (s intervals, M the bucket's norm, both in the record or read off the update) to the
  integer L happens with probability ``max(0, 1 - |f - L|)``, so the loss is the mean negative
  log-likelihood ``-log(1 - |f - L|)``, continued linearly where it would be infinite.
- **deterministic quantize** (``uniform``): the true value lies in the rounding cell, so the loss is
  the squared distance from the candidate's f = g / step to the cell ``[L - 1/2, L + 1/2]`` plus a small
  pull towards the cell centre (``cell_center_weight``) to break ties.
- **noise** (``gaussian``, ``laplace``, ``relative_gaussian``, ``snr_gaussian``): each layer's term is
  weighted by its signal-to-noise ratio, estimated from the update and the recorded noise std:
  ``w_l = snr_l / (1 + snr_l)`` with ``snr_l = max(0, mean(t_l^2) - sigma_l^2) / sigma_l^2``. Weight
  matrices of linear layers are optionally denoised first (``lowrank_denoise``): a FedSGD client's
  linear-layer gradient is a sum over its B images of outer products, so it has rank <= B (<= B x
  local steps for FedAvg); projecting the noisy matrix on its top singular vectors removes most of the
  noise.
- **cast** (``fp16``/``bf16``) changes values by less than float16 precision: the plain objective.

The last quantize, sign or noise step decides the objective; a sparsifier's mask joins it. With
several clients averaged (``num_clients_averaged`` > 1) the plain objective is used.

A record written by another tool may give only the name and the parameters a deployment knows; what
the objective needs is then derived from the declaration (QSGD's ``s`` from ``levels``, ...). Where it
cannot be, that step is treated as unknown (plain objective for it), and the matching's name and
``info["treated_as_unknown"]`` say which step and why. An unknown name is a one-line UserError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import obfuscation
from ..errors import UserError
from ..observation import Observation
from .objectives import Matching, Tensors, _flat, plain


def _per_tensor(value, name: str):
    return value[name] if isinstance(value, dict) else value


def _num_clients(obs: Observation) -> int:
    return int(obs.protocol.num_clients_averaged)


def _images_per_client(obs: Observation) -> int:
    return int(obs.protocol.images_per_client)


@dataclass
class Step:
    """One obfuscation step as a knowing server reads it: its declaration, and the values of its record
    (:func:`gradleak.obfuscation.server_record`), or why they are unknown."""

    index: int  # 1-based position in the observation's list
    ob: obfuscation.Obfuscation
    values: dict[str, Any] | None
    why: str | None = None

    def unknown(self) -> str:
        return f"obfuscation step {self.index} ({self.ob.name}) treated as unknown: {self.why}"


def families(obs: Observation) -> list[str]:
    """The families of the observation's obfuscation steps, identity steps (a recorded ``none``) left out."""
    return [f for f in (obfuscation.get(r["name"]).family for r in obs.obfuscation) if f != "identity"]


def obfuscated(obs: Observation) -> bool:
    """Whether the observation's update went through an obfuscation that changes it (a recorded ``none`` does
    not)."""
    return bool(families(obs))


def steps(obs: Observation, target: Tensors) -> list[Step]:
    """The observation's obfuscation steps, identity steps left out, each with its server-side values
    derived where its record lacks them; an unknown name is a one-line UserError."""
    found = []
    for i, rec in enumerate(obs.obfuscation, 1):
        try:
            ob = obfuscation.get(rec["name"])
        except UserError as e:
            raise UserError(f"the observation's obfuscation record {i}: {e}") from None
        if ob.family != "identity":
            found.append((i, ob, rec))
    context = obfuscation.Context.from_protocol(obs.protocol)
    k = _num_clients(obs)
    out = []
    for j, (i, ob, rec) in enumerate(found):
        # the mean of K clients' updates is no client's output: no value is read off it
        received = obfuscation.Received(target, context, exact=j == len(found) - 1 and k == 1,
                                        inexact=("which later steps changed" if j < len(found) - 1 else
                                                 f"the mean of {k} clients' updates, no client's own"))
        try:
            out.append(Step(i, ob, obfuscation.server_record(rec, received)))
        except obfuscation.Underivable as e:
            out.append(Step(i, ob, None, str(e)))
    return out


def for_observation(obs: Observation, target: Tensors, kind: str, knows: bool,
                    settings: dict[str, Any]) -> Matching:
    """The matching for ``obs``: the plain ``kind`` (cosine or l2) unless the attacker knows the
    obfuscation and an aware form applies. ``settings`` are the attack's resolved settings (the aware
    objectives' values, e.g. ``sign_temperature``, come from the presets)."""
    s = settings
    read = steps(obs, target) if knows and obs.obfuscation else []
    if not read:
        return plain(kind, target)
    if _num_clients(obs) > 1:
        if len(read) == 1 and read[0].ob.family == "sign":  # the mean of the clients' signs: their votes
            m = sign_matching(dict(target), None, float(s["sign_temperature"]))
            m.name = f"sign agreement weighted by {_num_clients(obs)} clients' votes"
            return m
        m = plain(kind, target)
        m.info["aware"] = "not applied: several clients averaged"
        return m
    t = dict(target)
    masks: Tensors | None = None
    bounds: dict[str, float] | None = None
    domain: Step | None = None
    unknown: list[str] = []
    for i, st in enumerate(read):
        later = read[i + 1:]
        if st.ob.family == "sparsify":
            if all(x.ob.keeps_zeros for x in later):
                sent = {k: v != 0 for k, v in target.items()}
                masks = sent if masks is None else {k: masks[k] & sent[k] for k in sent}
            if not later and st.values is None:
                unknown.append(st.unknown())
            elif not later:
                if st.values.get("rescale") is not None:
                    t = {k: v / float(_per_tensor(st.values["rescale"], k)) for k, v in t.items()}
                if st.ob.bounds_unsent:
                    bounds = unsent_bounds(target, st.values)
        elif st.ob.family in ("sign", "quantize", "noise"):
            domain = st
    if domain is not None and domain.values is None:
        unknown.append(domain.unknown())
        domain = None
    m = _matching(obs, t, kind, s, domain, masks, bounds)
    if unknown:
        m.info["treated_as_unknown"] = unknown
        m.name = f"{m.name}; " + "; ".join(unknown)
    return m


def _matching(obs: Observation, t: Tensors, kind: str, s: dict[str, Any], domain: Step | None,
              masks: Tensors | None, bounds: dict[str, float] | None) -> Matching:
    """The objective of the step that decides it (``domain``), joined by a sparsifier's mask and bound."""
    if domain is None:
        if masks is None:
            return plain(kind, t)
        if bounds is not None and s["sparse_bound_weight"] > 0:
            return bounded_sparse_matching(t, masks, bounds, kind, float(s["sparse_bound_weight"]))
        m = plain(kind, t, masks=masks)
        m.name = f"masked {kind}"
        return m
    values = domain.values
    if domain.ob.family == "sign":
        return sign_matching(t, masks, float(s["sign_temperature"]))
    if domain.ob.family == "quantize" and domain.ob.stochastic:
        return qsgd_matching(t, values, masks, float(s["qsgd_floor"]))
    if domain.ob.family == "quantize":
        return cell_matching(t, {k: float(_per_tensor(values["scale"], k)) for k in t}, masks,
                             float(s["cell_center_weight"]))
    return _noise_matching(obs, t, kind, s, values, masks)


def _noise_matching(obs: Observation, t: Tensors, kind: str, s: dict[str, Any], values: dict[str, Any],
                    masks: Tensors | None) -> Matching:
    noise = values["sigma_of_mean"] if values.get("sigma_of_mean") is not None else values["sigma"]
    sigma = {k: float(_per_tensor(noise, k)) for k in t}
    if s["lowrank_denoise"]:
        rank = _images_per_client(obs)
        if obs.protocol.algorithm == "fedavg":
            rank *= int(obs.protocol.local_steps)
        denoised = lowrank_denoise(t, rank)
        for k in t:
            if denoised[k] is not t[k]:  # the noise left in a rank-r projection of an m x n matrix
                m_, n_ = t[k].shape
                sigma[k] *= math.sqrt(rank * (m_ + n_) / (m_ * n_))
        t = denoised
    weights = snr_weights(t, sigma)
    m = plain(kind, t, weights=weights, masks=masks)
    m.name = f"snr-weighted {kind}" + (" (low-rank denoised)" if s["lowrank_denoise"] else "")
    m.info["weights"] = weights
    return m


# ------------------------------------------------------------------------------------------- sparsity
def unsent_bounds(target: Tensors, record: dict[str, Any]) -> dict[str, float]:
    """What top-k and pruning reveal about the entries they did not send: their magnitude is at most the
    recorded per-tensor ``threshold`` (pruning), else the smallest sent magnitude of the tensor, or of
    the whole update when the record's ``scope`` is ``global`` (global top-k)."""
    def smallest(v: torch.Tensor) -> float:
        a = v.abs()[v != 0]
        return float(a.min()) if a.numel() else 0.0

    if record.get("scope") == "global":
        b = min((smallest(v) for v in target.values() if bool((v != 0).any())), default=0.0)
        return {k: b for k in target}
    if isinstance(record.get("threshold"), dict):
        return {k: float(record["threshold"][k]) for k in target}
    return {k: smallest(v) for k, v in target.items()}


def bounded_sparse_matching(target: Tensors, masks: Tensors, bounds: dict[str, float], kind: str,
                            weight: float = 1.0) -> Matching:
    """Squared distance from the candidate to the set of updates consistent with a top-k / pruned one:
    the sent entries must equal the received values, the others must not exceed the bound in magnitude.

    For ``cosine`` the candidate is first scaled by ``a = ||t_sent|| / ||g_sent||`` (so the loss is
    ``2 (1 - masked cosine) + weight * sum_unsent relu(a |g| - bound)^2 / ||t_sent||^2``, scale-free);
    for ``l2`` a = 1.
    """
    parts = []
    tt = 0.0
    for k, t in target.items():
        sent = _flat(masks[k])
        idx = torch.nonzero(sent).reshape(-1)
        unsent = (~sent).to(t.dtype)
        parts.append((k, idx, _flat(t)[idx].contiguous(), unsent, float(bounds[k])))
        tt += float(_flat(t)[idx].double().pow(2).sum())
    scale_free = kind == "cosine"

    def fn(update: Tensors) -> torch.Tensor:
        gg = 0.0
        sent_vals = []
        for k, idx, tk, unsent, b in parts:
            gk = _flat(update[k])[idx]
            sent_vals.append(gk)
            gg = gg + torch.dot(gk, gk)
        a = (tt ** 0.5) / gg.clamp_min(1e-30).sqrt() if scale_free else 1.0
        dist = 0.0
        for (k, idx, tk, unsent, b), gk in zip(parts, sent_vals):
            d = a * gk - tk
            over = torch.relu(a * _flat(update[k]).abs() - b) * unsent
            dist = dist + torch.dot(d, d) + weight * torch.dot(over, over)
        return dist / tt if scale_free else dist

    return Matching(f"masked {kind} + bound on unsent entries", fn, {"bound_weight": weight})


# ------------------------------------------------------------------------------------------------ sign
def sign_matching(target: Tensors, masks: Tensors | None = None, temperature: float = 0.5) -> Matching:
    """Smooth agreement with received signs, where a sign of +1 also stands for an exact zero (as
    signSGD sends it): ``softplus(g / tau)`` where -1 was received (g should be negative) and
    ``max(0, softplus(-g / tau) - log 2)`` where +1 was (g should not be negative), averaged over the
    entries, with ``tau = temperature x`` the candidate's root-mean-square gradient in that layer.

    The mean of K clients' signs (each entry a vote, ``t / max|t|`` in [-1, 1] per tensor) weighs the
    two terms by the share of clients that sent each side, ``(1 - t / max|t|) / 2`` for -1: one client's
    signs give weights 1 and 0, the loss above."""
    parts = []
    count = 0
    for k, t in target.items():
        flat = _flat(t)
        sel = None if masks is None else torch.nonzero(_flat(masks[k])).reshape(-1)
        if sel is not None:
            flat = flat[sel]
        top = float(flat.abs().max()) if flat.numel() else 0.0
        neg = ((1 - flat / top) / 2).clamp(0, 1) if top > 0 else torch.zeros_like(flat)
        parts.append((k, sel, neg.contiguous(), (1 - neg).contiguous()))
        count += int(neg.numel())
    log2 = math.log(2.0)

    def fn(update: Tensors) -> torch.Tensor:
        total = 0.0
        for k, sel, neg, pos in parts:
            g = _flat(update[k])
            tau = temperature * g.pow(2).mean().sqrt() + 1e-30
            if sel is not None:
                g = g[sel]
            z = g / tau
            total = total + torch.dot(neg, F.softplus(z)) + torch.dot(pos, torch.relu(F.softplus(-z) - log2))
        return total / max(count, 1)

    return Matching("sign agreement", fn, {"temperature": temperature})


# ------------------------------------------------------------------------------------------------ qsgd
def qsgd_scales(target: Tensors, record: dict[str, Any]) -> Tensors:
    """Per-entry QSGD norm M: from the record (per tensor), else read off each bucket of the update
    (max-norm: the largest |q| in the bucket is M; L2: s x the smallest non-zero |q|)."""
    s = int(record["s"])
    out = {}
    for k, t in target.items():
        if isinstance(record.get("scale"), dict) and k in record["scale"]:
            out[k] = torch.full_like(t, float(record["scale"][k]))
            continue
        flat = _flat(t).abs()
        d = int(record.get("bucket_size") or flat.numel())
        nb = -(-flat.numel() // d)
        padded = torch.cat([flat, flat.new_zeros(nb * d - flat.numel())]).view(nb, d)
        if record.get("norm", "max") == "max":
            m = padded.amax(dim=1)
        else:
            nz = torch.where(padded > 0, padded, torch.full_like(padded, float("inf")))
            m = nz.amin(dim=1) * s
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out[k] = m[:, None].expand(nb, d).reshape(-1)[: flat.numel()].view_as(t).clone()
    return out


def qsgd_matching(target: Tensors, record: dict[str, Any], masks: Tensors | None = None,
                  floor: float = 0.05) -> Matching:
    s = int(record["s"])
    scales = qsgd_scales(target, record)
    parts = []
    count = 0
    for k, t in target.items():
        m = _flat(scales[k])
        ok = m > 0
        if masks is not None:
            ok = ok & _flat(masks[k])
        if bool(ok.all()):  # every entry counts: no gather (the common case, and much faster)
            idx, inv, tk = None, s / m, _flat(t)
        else:
            idx = torch.nonzero(ok).reshape(-1)
            if idx.numel() == 0:
                continue
            inv, tk = s / m[idx], _flat(t)[idx]
        level = torch.round(tk * inv).contiguous()
        parts.append((k, idx, inv.contiguous(), level))
        count += level.numel()
    top = 1 - floor

    def fn(update: Tensors) -> torch.Tensor:
        total = 0.0
        for k, idx, inv, level in parts:
            g = _flat(update[k])
            d = ((g if idx is None else g[idx]) * inv - level).abs()
            # -log(1 - d) below 1 - floor, continued linearly (same value and slope) above it
            total = total + (-torch.log1p(-d.clamp(max=top))).sum() + (d - top).clamp(min=0).sum() / floor
        return total / max(count, 1)

    return Matching("qsgd likelihood", fn, {"s": s, "floor": floor})


# --------------------------------------------------------------------- per-entry likelihoods
def entry_likelihood(st: Step, name: str, target: torch.Tensor, scale: float = 1.0):
    """The negative log-likelihood of each received entry of tensor ``name`` under a quantizing step
    ``st`` (the last obfuscation), as a function of the residual ``R`` = candidate - received, in units
    of ``target`` times ``scale`` (a FedAvg delta read as a gradient): ``fn(R, rows, derivatives)`` ->
    the value entry-wise, and with ``derivatives`` also its first and second derivative, ``rows``
    selecting the rows ``R`` holds. Deterministic rounding: the squared distance to the rounding cell
    (plus 1e-4 of the squared distance to its centre, to break ties), as :func:`cell_matching`; QSGD:
    ``-log(1 - |d|)``, ``d`` the distance in levels, continued linearly near 1, as
    :func:`qsgd_matching`. None where the step is not a quantizer with known values."""
    if st.values is None or st.ob.family != "quantize":
        return None
    if st.ob.stochastic:
        s = int(st.values["s"])
        levels = qsgd_scales({name: target}, st.values)[name].float() * (abs(scale) / s)
        levels = torch.where(levels > 0, levels, torch.ones_like(levels))
        floor = 0.05
        top = 1 - floor

        def qsgd(R: torch.Tensor, rows: torch.Tensor, derivatives: bool = True):
            e = levels[rows]
            d = R / e
            a = d.abs()
            inside = a < top
            a.clamp_(max=top)
            value = torch.where(inside, torch.log1p(-a).neg_(), (d.abs() - top) / floor - math.log(floor))
            if not derivatives:
                return value
            slope = torch.where(inside, (1 - a).reciprocal_(), torch.full_like(a, 1 / floor))
            curve = torch.where(inside, slope * slope, torch.full_like(a, 1e-6)).div_(e * e)
            return value, torch.copysign(slope, d).div_(e), curve
        return qsgd
    step = float(_per_tensor(st.values["scale"], name)) * abs(scale)
    if not step > 0:
        return None
    center = 1e-4

    def cell(R: torch.Tensor, rows: torch.Tensor, derivatives: bool = True):
        d = R / step
        out = d.abs().sub_(0.5).clamp_(min=0)
        value = out.square().add_(d.square(), alpha=center)
        if not derivatives:
            return value
        slope = torch.copysign(out, d).mul_(2).add_(d, alpha=2 * center).div_(step)
        curve = (out > 0).to(d.dtype).mul_(2 / step**2).add_(2 * center / step**2)
        return value, slope, curve
    return cell


# ------------------------------------------------------------------------------------- rounding cells
def cell_matching(target: Tensors, steps: dict[str, float], masks: Tensors | None = None,
                  center_weight: float = 0.01) -> Matching:
    parts = []
    count = 0
    for k, t in target.items():
        step = steps[k]
        if not step > 0:
            continue
        sel = None if masks is None else torch.nonzero(_flat(masks[k])).reshape(-1)
        tk = _flat(t) if sel is None else _flat(t)[sel]
        parts.append((k, sel, 1.0 / step, torch.round(tk / step).contiguous()))
        count += tk.numel()

    def fn(update: Tensors) -> torch.Tensor:
        total = 0.0
        for k, sel, inv, level in parts:
            g = _flat(update[k])
            if sel is not None:
                g = g[sel]
            d = g * inv - level
            out = torch.relu(d.abs() - 0.5)
            total = total + torch.dot(out, out) + center_weight * torch.dot(d, d)
        return total / max(count, 1)

    return Matching("rounding-cell distance", fn, {"center_weight": center_weight})


# ----------------------------------------------------------------------------------------------- noise
def snr_weights(target: Tensors, sigma: dict[str, float]) -> dict[str, float]:
    """``snr / (1 + snr)`` per layer, ``snr = max(0, mean(t^2) - sigma^2) / sigma^2``. When no layer's
    energy rises above its noise the estimate says nothing about which layers to trust: every layer then
    gets weight 1 (matching nothing is no attack)."""
    w = {}
    for k, t in target.items():
        var = sigma[k] ** 2
        if var <= 0:
            w[k] = 1.0
            continue
        snr = max(0.0, float(t.double().pow(2).mean()) - var) / var
        w[k] = snr / (1 + snr)
    if w and not any(v > 0 for v in w.values()):
        return {k: 1.0 for k in w}
    return w


def lowrank_denoise(target: Tensors, rank: int) -> Tensors:
    """Project each 2-D weight matrix (linear layers) with both sides larger than ``rank`` on its top
    ``rank`` singular vectors; other tensors are returned unchanged."""
    out = {}
    for k, t in target.items():
        if t.dim() == 2 and min(t.shape) > rank:
            # the projection on the top singular vectors of the shorter side, from the eigenvectors of its
            # Gram matrix: the same projection as a thin SVD's, without decomposing the long side (fc1 of
            # lenet5 at 64 px, 512 x 16384: 1.2 s by SVD on two cores)
            d = t.double()
            wide = d.shape[0] <= d.shape[1]
            _, vecs = torch.linalg.eigh(d @ d.T if wide else d.T @ d)
            u = vecs[:, -rank:]
            out[k] = (u @ (u.T @ d) if wide else (d @ u) @ u.T).to(t.dtype)
        else:
            out[k] = t
    return out
