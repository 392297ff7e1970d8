"""What the report page says, as plain data for its template: the bottom line, a verdict and a summary row
per defence setting, every setting x attack, the points of the privacy-utility plot, failed cells, what was
tested, and the definitions. Pure functions of the rows and the utility runs (no HTML, no files); the
template formats the numbers (:func:`gradleak.report.summary.fmt`, :func:`~gradleak.report.summary.bits`)."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from .summary import (Group, auc_summary, baseline_variant, cap, data_text, epsilon_summary, groups, threat_text,
                      utility_mismatch, verdict)
from .verdicts import budget_text, num, strongest_tried


def _defence_and_strength(setting: str) -> tuple[str, str]:
    """``qsgd(levels=4)`` -> (``qsgd``, ``levels=4``); a composed setting stays whole."""
    if " + " in setting:
        return setting, ""
    defence, _, strength = setting.partition("(")
    return defence, strength.rstrip(")")


def _setting(g: Group, utilities: dict[str, dict[str, Any]], base_auc: float | None) -> dict[str, Any]:
    """One defence setting judged by its worst-case attack: the summary row, the verdict and the plot point."""
    w = g.worst_case()
    u = utilities.get(g.by_attack[w["attack"]][0].get("utility_key") or "")
    final = (u or {}).get("final") or {}
    defence, strength = _defence_and_strength(g.setting)
    return {**w, "label": g.label, "setting": g.setting, "condition": g.condition, "defence": defence,
            "strength": strength, "budget": budget_text({**w, "attack": None}),
            "chance_count": w["chance"] * w["reid_n"] if w.get("chance") is not None and w["reid_n"] else None,
            "auc": auc_summary(u), "accuracy": final.get("accuracy"),
            "dp": epsilon_summary(u, g.by_attack[w["attack"]]), "verdict": verdict(w, u, base_auc),
            "point": {"setting": g.setting, "label": g.label, "skill": w["ssim_skill"],
                      "reid": (w["reid_hits"] / w["reid_n"]) if w["reid_n"] else None,
                      "auc": num(final.get("roc_auc")), "bits": w["bits"], "risk": w["risk"]}}


def _bottom_line(settings: list[dict[str, Any]], tried: list[str], failed: int) -> dict[str, Any]:
    """The page's first paragraph: the unprotected setting, whether any defence brought the risk down to low
    (and which keeps the model best), inconclusive settings, the strongest attack tried, failed cells."""
    points = [s["point"] for s in settings]
    base = next((s for s in settings if s["setting"] == "none"), None)
    protected = [p for p in points if p["setting"] != "none"]
    low = [p for p in protected if p["risk"] == "low"]
    best = max(low, key=lambda p: (p["auc"] if p["auc"] is not None else -1)) if low else None
    strongest, stronger = strongest_tried(tried)
    out = {"unprotected": None, "protected": len(protected), "low": len(low), "best": best,
           "no_leak_unprotected": bool(base and base["risk"] in ("low", "inconclusive") and low),
           "inconclusive": sum(p["risk"] == "inconclusive" for p in points), "strongest": strongest,
           "stronger": ", ".join(stronger), "failed": failed}
    if base:
        text = verdict(base, None, None)
        out["unprotected"] = {"risk": base["risk"], "text": text[:1].lower() + text[1:]}
    out["empty"] = not (base or protected or out["inconclusive"] or strongest is not None or failed)
    return out


def _details(gs: list[Group]) -> list[dict[str, Any]]:
    """Every setting x attack with its numbers, risk and budget."""
    out = []
    for g in gs:
        for a in g.by_attack:
            s = g.attack_stats(a)
            out.append({**s, "label": g.label, "budget": budget_text({**s, "attack": None}),
                        "post": [{"name": k.replace("_", " "), **v} for k, v in s["post"].items()]})
    return out


def _protocol_text(p: dict[str, Any]) -> str:
    """``fedsgd``, or ``fedsgd, mean of 4 clients`` where the server saw only several clients' mean."""
    k = int(p.get("num_clients_averaged") or 1)
    return str(p.get("algorithm")) + (f", mean of {k} clients" if k > 1 else "")


def _tested(rows: list[dict[str, Any]], varying: list[str]) -> dict[str, str]:
    """Data, victim models, protocols, batch sizes and what else varied, each as one text."""
    cfgs = [r.get("config") or {} for r in rows]
    caps = [c.get("capture") or {} for c in cfgs if c.get("capture")]
    return {"data": "; ".join(sorted({data_text(c["data"]) for c in cfgs if c.get("data")})) or "n/a",
            "archs": ", ".join(sorted({str(c.get("arch")) for c in caps})) or "n/a",
            "protocols": ", ".join(sorted({_protocol_text(c.get("protocol") or {}) for c in caps})) or "n/a",
            "batches": ", ".join(map(str, sorted({int(c.get("batch_size")) for c in caps}))) or "n/a",
            "varying": ", ".join(varying) or "nothing"}


def _definitions(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metric variants and the re-identification setup the rows recorded, for the definitions."""
    variants: dict[str, str] = OrderedDict()
    for r in rows:
        for k, v in (r.get("metric_variants") or {}).items():
            variants.setdefault(k.upper().replace("_", "-"), v)
    reid = next(((r.get("reid") or {}) for r in rows if r.get("reid")), {})
    reid_variants = reid.get("variants") or {}
    gallery = reid.get("gallery", {}) if reid else None
    lpips_note = next((r["metrics"].get("lpips_note") for r in rows if r["metrics"].get("lpips_note")), None)
    return {"psnr": variants.get("PSNR", "peak signal-to-noise ratio"),
            "ssim": variants.get("SSIM", "structural similarity"),
            "ms_ssim": variants.get("MS-SSIM", "multi-scale SSIM"),
            "lpips": variants.get("LPIPS", "") + (". " + cap(lpips_note) if lpips_note else ""),
            "reid_threat": cap(reid.get("threat_model", "Re-identification was not measured")),
            "gallery": ({"images": gallery.get("images"), "patients": gallery.get("patients")}
                        if gallery is not None else None),
            "top1": cap(reid_variants.get("top1", "not measured")), "top5": cap(reid_variants.get("top5", "")),
            "embedding": (reid.get("embedding") or {}).get("variant") or "none",
            "iip": reid_variants.get("iip", "image identifiability precision (Yin et al. 2021)"),
            "baseline": cap(baseline_variant(rows))}


def context(rows_all: list[dict[str, Any]], spec: dict[str, Any], utilities: dict[str, dict[str, Any]],
            folder_name: str, generated: str) -> dict[str, Any]:
    """Everything the template shows, from the rows (finished and failed), the spec and the utility runs.
    The image grids and the plot are added by the caller (they read pictures)."""
    rows = [r for r in rows_all if r.get("status") == "ok"]
    failed = [r for r in rows_all if r.get("status") != "ok"]
    gs, varying = groups(rows)
    base = next((g for g in gs if g.setting == "none"), None)
    base_auc = num(((utilities.get(base.utility_key()) or {}).get("final") or {}).get("roc_auc")) if base else None
    settings = [_setting(g, utilities, base_auc) for g in gs]
    versions = next((r.get("versions") for r in rows if r.get("versions")), {}) or {}
    return {
        "name": spec.get("name") or folder_name, "folder": folder_name, "generated": generated,
        "version": versions.get("gradleak", ""), "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "cells": len(rows), "images": sum(int(r["metrics"].get("num_images") or 0) for r in rows),
        "groups": gs, "settings": settings, "points": [s["point"] for s in settings],
        "plot_has_utility": any(s["point"]["auc"] is not None for s in settings),
        "bottom": _bottom_line(settings, [a for g in gs for a in g.by_attack], len(failed)),
        "utility_measured": bool(utilities), "utility_mismatch": utility_mismatch(rows, utilities),
        "details": _details(gs), "tested": _tested(rows, varying), "threats": threat_text(rows),
        "failed": [{"cell": r["cell"], "params": json.dumps(r.get("params", {}), default=str),
                    "error": r.get("error")} for r in failed],
        "definitions": _definitions(rows)}
