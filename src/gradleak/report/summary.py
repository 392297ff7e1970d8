"""Pure summaries of a result folder's rows: settings grouped by defence, each attack's numbers on a setting,
the verdict in words, model utility, and the texts the report states (threat models, epsilon, the blind
baseline's variant, a utility run of another configuration). Plain data in, plain data out: no HTML, no
files."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Iterable

from .verdicts import (INCONCLUSIVE, RISK_ORDER, UNFIT, UNSEPARATED, all_converged, budget_text, image_level,
                       image_phrase, num, reid_significant, risk)

#: Grid keys that vary the sample, not the setting: averaged over in the summary.
SAMPLE_KEYS = ("seed", "capture.indices", "capture.model_seed")


def mean(xs: Iterable[Any]) -> float | None:
    """The mean of the finite numbers among ``xs`` (None when there is none)."""
    v = [x for x in (num(x) for x in xs) if x is not None]
    return sum(v) / len(v) if v else None


def last(x: Any) -> float | None:
    """A number, or the last entry of a list of numbers (a curve over rounds)."""
    if isinstance(x, list):
        return num(x[-1]) if x else None
    return num(x)


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def fmt(x: Any, spec: str = ".2f") -> str:
    """A number formatted by ``spec``, or ``–`` when there is none."""
    v = num(x)
    return "–" if v is None else format(v, spec)


def bits(x: Any) -> str:
    """``254 kbit``: a communication cost in bits, in the largest unit below it."""
    v = num(x)
    if v is None:
        return "–"
    for unit, f in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if v >= f:
            return f"{v / f:.3g} {unit}"
    return f"{v:.0f} bit"


# ----------------------------------------------------------------------------------------------- groups
def short_key(k: str) -> str:
    return {"capture.batch_size": "batch", "capture.arch": "model", "data.size": "px",
            "capture.labels_known": "labels known", "data.source": "data"}.get(k, k)


def condition(row: dict[str, Any], varying: list[str]) -> str:
    """What else than the defence this row's cell varied, e.g. ``batch=4``."""
    params = row.get("params", {})
    return ", ".join(f"{short_key(k)}={params[k]}" for k in varying if k in params)


def attack_label(row: dict[str, Any]) -> str:
    """The attack's name, with '+ prior' when a learned post-processing prior ran after it."""
    name = str(row.get("attack", "?"))
    if " + prior" in name:
        return name
    att = ((row.get("config") or {}).get("attack") or {})
    if att.get("prior") or (row.get("threat_model") or {}).get("postprocessing"):
        return name + " + prior"
    return name


def _reid_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Re-identification summed over the cells: hits and counts, the rankings measured, chance levels."""
    reid_hits = reid_n = iip_hits = iip_n = top5_hits = 0
    chance, chance5, leave_out = [], [], []
    distances: set[str] = set()
    rankings: set[str] = set()
    for r in rows:
        reid = r.get("reid") or {}
        rankings |= {k for k, v in (reid.get("by_distance") or {}).items() if "top1" in v}
        s = reid.get("strongest")
        if not s:
            continue
        reid_hits += s["top1_hits"]
        reid_n += s["n"]
        n_img = s.get("iip_n", s["n"])
        iip_n += n_img
        iip_hits += s["iip_hits"] if "iip_hits" in s else round((s.get("iip") or 0) * n_img)
        top5_hits += s["top5_hits"] if s.get("top5_hits") is not None else round((s.get("top5") or 0) * s["n"])
        distances.add(s["distance"])
        chance.append(reid.get("chance_top1"))
        chance5.append(reid.get("chance_top5"))
        leave_out.append(bool(reid.get("leave_the_image_out")))
    return {"reid_hits": reid_hits if reid_n else None, "reid_n": reid_n or None,
            "reid_measured": bool(distances), "top5_hits": top5_hits if reid_n else None,
            "iip_hits": iip_hits if iip_n else None, "iip_n": iip_n or None,
            "reid_distances": sorted(distances), "reid_rankings": sorted(rankings),
            "leave_the_image_out": bool(leave_out) and all(leave_out),
            "chance": mean(chance), "chance5": mean(chance5)}


def _budget_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Convergence per cell and the mean budget (iterations, seconds)."""
    budgets = [r.get("budget") or {} for r in rows]
    conv = [r["converged"] if "converged" in r else b.get("converged", (r.get("attack_run") or {}).get("converged"))
            for r, b in zip(rows, budgets)]
    its = mean(b.get("iterations", (r.get("attack_run") or {}).get("iterations")) for r, b in zip(rows, budgets))
    secs = mean(b.get("seconds", (r.get("timings") or {}).get("attack_s")) for r, b in zip(rows, budgets))
    # auto's separation: the kept inputs of the leaky layer that read as noise, not as any image
    separations = [((b.get("pipeline") or {}).get("separation") or {}) for b in budgets]
    noise = [int(sep["like_noise"]) for sep in separations if sep.get("like_noise") is not None]
    # auto's runs that found a layer leaking whole batches and left its update unseparated (fewer images
    # separated than attacked): what their fallback reached is not what the update holds
    pipes = [b.get("pipeline") or {} for b in budgets]
    unseparated = [str(p["leaky_layer"]) for p in pipes if p.get("leaky_layer") and p.get("images")
                   and int(p.get("separated") or 0) < int(p["images"])]
    # auto's images that do not reproduce an exact update or a sparsifier's sent entries (no nearer it than uniform
    # grey images): they show what the attack reached, not what the update holds, whatever it separated
    unfit = [p for p in pipes if isinstance(p.get("fit"), dict) and p["fit"].get("fits") is False]
    residuals = [p["fit"] for p in unfit if num(p["fit"].get("relative_residual")) is not None]
    worst = max(residuals, key=lambda f: float(f["relative_residual"])) if residuals else {}
    # how auto read the update where it found such a layer: how many images it separated, and in how many
    # cells the mean of several clients' updates was first split into each client's
    leaked = [p for p in pipes if p.get("leaky_layer") and p.get("images")]
    split = [p for p in pipes if isinstance(p.get("clients_split"), dict)]
    return {"converged": conv, "iterations": its, "seconds": secs,
            "seconds_per_iteration": (secs / its) if its and secs is not None else None,
            "inputs_like_noise": sum(noise) if noise else None,
            "unseparated": len(unseparated), "unseparated_layers": sorted(set(unseparated)),
            "unfit": len(unfit), "unfit_residual": num(worst.get("relative_residual")),
            "unfit_grey": num(worst.get("grey_residual")),
            "unfit_separated": sum(int(p.get("separated") or 0) > 0 for p in unfit),
            "leaky_layers": sorted({str(p["leaky_layer"]) for p in leaked}),
            "separated": sum(int(p.get("separated") or 0) for p in leaked) if leaked else None,
            "separated_of": sum(int(p["images"]) for p in leaked) if leaked else None,
            "clients_split": len(split), "split_into": sorted({len(p.get("clients") or []) for p in split}),
            "split_off_the_mean": sum(bool(p["clients_split"].get("steps_read_off")) for p in split)}


def _post(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Nested results some attacks add (e.g. before post-processing): their mean PSNR and SSIM."""
    out: dict[str, dict[str, list[Any]]] = {}
    for r in rows:
        for k, v in r["metrics"].items():
            if k != "metric_variants" and isinstance(v, dict) and isinstance(v.get("psnr"), (int, float)):
                out.setdefault(k, {"psnr": [], "ssim": []})
                out[k]["psnr"].append(v.get("psnr"))
                out[k]["ssim"].append(v.get("ssim"))
    return {k: {"psnr": mean(v["psnr"]), "ssim": mean(v["ssim"])} for k, v in out.items()}


def attack_stats(attack: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One attack's numbers on one setting: image metrics, blind baseline and gain (means over the cells),
    re-identification (summed), budget and convergence, bits and epsilon, and its risk level."""
    from ..metrics.baseline import ssim_skill

    m = lambda k: mean(r["metrics"].get(k) for r in rows)  # noqa: E731
    base = lambda k: mean((r.get("baseline") or {}).get(k) for r in rows)  # noqa: E731
    gain = lambda k: mean((r.get("gain_over_baseline") or {}).get(k) for r in rows)  # noqa: E731
    ssim_, base_ssim = m("ssim"), base("ssim")
    s = {"attack": attack, "cells": len(rows), "psnr": m("psnr"), "ssim": ssim_,
         "ms_ssim": m("ms_ssim"), "lpips": m("lpips"), "label_accuracy": m("label_accuracy"),
         "images": sum(int(r["metrics"].get("num_images") or 0) for r in rows),
         "baseline_psnr": base("psnr"), "baseline_ssim": base_ssim,
         "gain_psnr": gain("psnr_db"), "gain_ssim": gain("ssim"),
         "ssim_skill": (ssim_skill(ssim_, base_ssim) if ssim_ is not None and base_ssim is not None else None),
         **_budget_stats(rows), **_reid_stats(rows),
         "bits": mean(r.get("bits") for r in rows), "epsilon": mean(r.get("epsilon") for r in rows),
         "post": _post(rows)}
    s["risk"] = risk(s)
    return s


class Group:
    """All cells of one defence setting under one condition (e.g. batch size)."""

    def __init__(self, setting: str, condition: str):
        self.setting, self.condition = setting, condition
        self.by_attack: dict[str, list[dict[str, Any]]] = OrderedDict()

    @property
    def label(self) -> str:
        return self.setting + (f" ({self.condition})" if self.condition else "")

    def attack_stats(self, attack: str) -> dict[str, Any]:
        return attack_stats(attack, self.by_attack[attack])

    def worst_case(self) -> dict[str, Any]:
        """The attack that leaks most on this setting: the highest risk level (an unconverged attack that
        shows no leak makes the setting inconclusive), then the highest patient re-identification rate, then
        the highest SSIM gain over the blind baseline."""
        stats = [self.attack_stats(a) for a in self.by_attack]
        return max(stats, key=lambda s: (RISK_ORDER[s["risk"]], (s["reid_hits"] or 0) / (s["reid_n"] or 1),
                                         (s["ssim_skill"] if s["ssim_skill"] is not None else -1e9),
                                         (s["ssim"] if s["ssim"] is not None else -1)))

    def utility_key(self) -> str:
        """The utility run of this setting (that of its first cell)."""
        return self.by_attack[next(iter(self.by_attack))][0].get("utility_key") or ""


def _varying(rows: list[dict[str, Any]]) -> list[str]:
    """The grid keys besides the defence, the attack and the sample whose value differs between rows."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.get("params", {}) if k not in keys]
    return [k for k in keys
            if k != "attack" and not k.startswith("attack.") and k not in SAMPLE_KEYS
            and not k.startswith("capture.obfuscation") and not k.startswith("capture.protocol")
            and len({json.dumps(r.get("params", {}).get(k), sort_keys=True, default=str) for r in rows}) > 1]


def groups(rows: list[dict[str, Any]]) -> tuple[list[Group], list[str]]:
    """The rows grouped by defence setting and condition, the unprotected setting first, and the grid keys
    that make the conditions."""
    varying = _varying(rows)
    found: dict[tuple[str, str], Group] = OrderedDict()
    for r in rows:
        key = (r["setting"], condition(r, varying))
        found.setdefault(key, Group(*key)).by_attack.setdefault(attack_label(r), []).append(r)
    # unprotected first, then in the order the grid lists them
    return sorted(found.values(), key=lambda g: (g.setting != "none",)), varying


# ---------------------------------------------------------------------------------------------- utility
def auc_summary(utility: dict[str, Any] | None) -> dict[str, Any] | None:
    """ROC AUC (``value``) with a ``note`` on its 95 % interval over seeds; None when not measured."""
    auc = num(((utility or {}).get("final") or {}).get("roc_auc"))
    if auc is None:
        return None
    ci = ((utility or {}).get("final_ci95") or {}).get("roc_auc")
    seeds = int((utility or {}).get("seeds") or 1)
    note = f"95% interval {ci[0]:.2f}–{ci[1]:.2f}, {seeds} seeds" if ci else "one seed, no interval"
    return {"value": auc, "note": note}


def auc_text(utility: dict[str, Any] | None) -> str:
    """``0.712 (95% interval 0.66–0.76, 3 seeds)``, or ``–``."""
    a = auc_summary(utility)
    return f"{a['value']:.3f} ({a['note']})" if a else "–"


def utility_mismatch(rows: list[dict[str, Any]], utilities: dict[str, dict[str, Any]]) -> str:
    """How the utility runs' model and protocol differ from the attacked ones ('' when they match)."""
    diffs: set[str] = set()
    for r in rows:
        u = utilities.get(r.get("utility_key") or "")
        capture = (r.get("config") or {}).get("capture") or {}
        if not u or not capture:
            continue
        ua, ca = (u.get("model") or {}).get("arch"), capture.get("arch")
        up, cp = (u.get("protocol") or {}).get("algorithm"), (capture.get("protocol") or {}).get("algorithm")
        if ua and ca and ua != ca:
            diffs.add(f"the utility runs trained {ua}, the attacks ran on {ca}")
        if up and cp and up != cp:
            diffs.add(f"the utility runs used {up}, the attacked updates {cp}")
    return "; ".join(sorted(diffs)) + "." if diffs else ""


def epsilon_summary(utility: dict[str, Any] | None, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Epsilon (``value``) with what it depends on (``note``: delta, the rounds accounted and the client
    sampling rate). From the utility run when there is one (the whole training), else from the attacked
    update's record (one round as recorded, noted "capture"). None without a DP guarantee."""
    if utility and last(utility.get("epsilon")) is not None:
        eps, delta = last(utility.get("epsilon")), utility.get("delta")
        rounds = utility.get("rounds_run")
        q = (((utility.get("threat_model") or {}).get("dp") or {}).get("sample_rate"))
        where = "training"
    else:
        recs = [o for r in rows for o in (r.get("obfuscation") or []) if isinstance(o, dict)
                and num(o.get("epsilon")) is not None]
        if not recs:
            return None
        o = recs[-1]
        eps, delta, rounds, q = o["epsilon"], o.get("delta"), o.get("rounds"), o.get("sample_rate")
        where = "capture"
    parts = [f"δ {delta:g}" if num(delta) is not None else None,
             f"{rounds} round{'s' if rounds != 1 else ''}" if rounds is not None else None,
             f"sample rate {q:g}" if num(q) is not None else None]
    note = ", ".join(x for x in parts if x)
    if note and where == "capture":
        note += "; capture"
    return {"value": num(eps), "note": note}


# ------------------------------------------------------------------------------------------------ texts
def threat_text(rows: list[dict[str, Any]]) -> list[str]:
    """Each distinct threat model of the rows, in words, with the attack it belongs to."""
    out: list[str] = []
    for r in rows:
        tm = r.get("threat_model") or {}
        if not tm:
            continue
        k = int(tm.get("clients_averaged") or 1)
        clients = f", the mean of {k} clients' updates (secure aggregation)" if k > 1 else ""
        t = (f"{r['attack']}: server {tm.get('server', 'honest-but-curious')}; protocol {tm.get('protocol')}{clients}; "
             "labels "
             f"{'known' if tm.get('labels_known') else 'inferred (' + str(tm.get('labels')) + ')'}; obfuscation "
             + ("none" if not tm.get("obfuscation") else
                ("known to the attacker" if tm.get("obfuscation_known") else "not known to the attacker"))
             + f"; BatchNorm statistics: {tm.get('bn_statistics')}")
        if tm.get("per_client_scales_known"):
            t += "; each client's rounding scale known to the server (the mean split into each client's update)"
        elif tm.get("per_client_scales_known") is False:
            t += ("; no client's rounding scale known to the server (the clients' steps read off the mean to split "
                  "it into each client's update)")
        if t not in out:
            out.append(t)
    return out


def baseline_variant(rows: list[dict[str, Any]]) -> str:
    """How the rows' blind baseline was made (the default variant when none recorded it)."""
    from ..metrics.baseline import VARIANT

    for r in rows:
        v = (r.get("baseline") or {}).get("variant")
        if v:
            return str(v)
    return VARIANT + " (not measured for these results)"


def data_text(d: dict[str, Any]) -> str:
    """``phantoms, 16 px (n=32)``: a data config in words."""
    d = dict(d)
    src = str(d.pop("source", "?"))
    path = d.pop("path", None)
    size = d.pop("size", None)
    rest = ", ".join(f"{k}={v}" for k, v in sorted(d.items()))
    return (f"{src}{' ' + str(path) if path else ''}" + (f", {size} px" if size else "")
            + (f" ({rest})" if rest else ""))


def image_text(s: dict[str, Any]) -> str:
    """How recognisable the images are, with the SSIM and PSNR gain over the blind guess."""
    text = image_phrase(image_level(s.get("ssim_skill")))
    if s.get("baseline_ssim") is not None and s.get("ssim") is not None:
        sk = s.get("ssim_skill") or 0.0
        text += (f": SSIM {s['ssim']:.2f} against {s['baseline_ssim']:.2f} for the blind guess "
                 + (f"({sk * 100:.0f}% of the gap it leaves closed)" if sk >= 0 else "(worse than the blind guess)"))
        if s.get("gain_psnr") is not None:
            text += f", PSNR {s['gain_psnr']:+.1f} dB over it"
    return text


def _reid_text(s: dict[str, Any]) -> str:
    lo = "leave-the-image-out" if s.get("leave_the_image_out") else "the attacked image in the gallery"
    guess = ""
    if s["chance"]:
        guess = (f"; a random guess: {s['chance'] * s['reid_n']:.2g}/{s['reid_n']}; "
                 + ("clearly better than guessing" if reid_significant(s) else "not clearly better than guessing"))
    return (f"patient re-identified in {s['reid_hits']}/{s['reid_n']} cases ({lo}"
            + (f"; top-5 {s['top5_hits']}/{s['reid_n']}" if s.get("top5_hits") is not None else "") + guess + ")")


def leak_text(s: dict[str, Any]) -> str | None:
    """Why the update leaks, where ``auto`` found a layer that leaks whole batches: the layer, how many of
    the images its update separated into, and whether the mean of several clients' updates was split into
    each client's first; None where no such layer was found (optimisation attacks, models without one)."""
    layers = s.get("leaky_layers")
    if not layers:
        return None
    names = ", ".join(f"'{n}'" for n in layers)
    sep = int(s.get("separated") or 0)
    text = (f"the update of {names}, a linear layer into a ReLU, carries each image's input to it; "
            + (f"it separated into {sep} of {s.get('separated_of')} images" if sep else
               f"it did not separate into any of the {s.get('separated_of')} images"))
    if sep and s.get("unfit_separated"):  # counted as separated, yet their update is not the one received
        text += " (whose images do not reproduce the update: the count is the attack's, not a proof)"
    split = int(s.get("clients_split") or 0)
    if split:
        k = "/".join(str(n) for n in s.get("split_into") or []) or "several"
        cells = f" (in {split} of {s.get('cells')} cells)" if s.get("cells") and split < s["cells"] else ""
        off = int(s.get("split_off_the_mean") or 0)
        scales = ("read off the mean's own values, no client's scale needed" if off == split else
                  "which needs each client's rounding scale (the threat models say so)" if not off else
                  f"in {off} of them read off the mean's own values, in the others from each client's rounding "
                  f"scale (the threat models say so)")
        text += (f" after the mean of {k} clients' updates was split into each client's by their rounding steps"
                 f"{cells}, {scales}")
    return text


def verdict(s: dict[str, Any], utility: dict[str, Any] | None, baseline_auc: float | None) -> str:
    """The verdict of one setting in plain words, its budget included."""
    parts = []
    if risk(s) == "inconclusive":
        why = (INCONCLUSIVE if not all_converged(s) else
               "inconclusive: no blind baseline to judge the images against"
               if image_level(s.get("ssim_skill")) is None else UNSEPARATED if s.get("unseparated") else UNFIT)
        parts.append(cap(why) + " — it can show a leak, never its absence")
    parts.append(image_text(s) if parts else cap(image_text(s)))
    if s.get("reid_n"):
        parts.append(_reid_text(s))
    elif s.get("reid_measured") is not None and s.get("iip_n"):
        parts.append("patient re-identification not measurable (no attacked patient has another image in the "
                     "gallery)")
    if s.get("iip_n"):
        parts.append(f"exact image identified (IIP) in {s['iip_hits']}/{s['iip_n']}")
    text = "; ".join(parts) + "."
    how = leak_text(s)
    if how:
        text += f" How it leaked: {how}."
    text += f" Budget: {budget_text(s)}."
    auc = num(((utility or {}).get("final") or {}).get("roc_auc"))
    if auc is not None:
        delta = f", {auc - baseline_auc:+.3f} vs. no protection" if baseline_auc is not None else ""
        text += f" Model ROC AUC {auc_text(utility)}{delta}."
    return text
