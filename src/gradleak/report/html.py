"""``gradleak report``: one self-contained HTML page a privacy officer can read.

It reads a sweep folder (``results.jsonl``, the cells' pictures, the utility runs) or a single experiment
folder (``metrics.json``) and writes ``report.html`` beside it, with every picture embedded (no network,
no scripts) and the plots also as PNG files (``privacy_utility.png``). The page holds:

* the bottom line and a verdict per defence setting in plain language;
* a summary table per defence and strength: PSNR, SSIM, MS-SSIM, patient re-identification, IIP, model
  utility (ROC AUC, accuracy), bits per update and epsilon -- for the strongest attack on that setting
  (the worst case for the defender), every column naming its metric variant;
* image grids: the originals above their reconstruction under each defence;
* the privacy-utility plot: leakage against model utility, one point per defence setting, the unprotected
  model marked;
* the details: every setting x attack, failed cells, threat models and definitions.

Verdicts (stated on the page, defined in :mod:`gradleak.report.verdicts` and docs/verdicts.md) are judged on
the gain of the reconstruction over the blind baseline (the attacker's guess without the update) and on
leave-the-image-out patient re-identification, never on raw SSIM; an attack that stopped before converging
makes a setting *inconclusive*, never *low risk*. Every verdict shows the attack's budget. They are rules
of thumb, not guarantees.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..files import write_bytes, write_text
from ..experiment.labels import setting_label

from .verdicts import (HIGH_REID, INCONCLUSIVE, PARTLY_SKILL, RECOGNISABLE_SKILL, RISK_ORDER,
                       above_chance, all_converged, budget_text, image_level, image_phrase, reid_significant,
                       risk as _risk, strongest_tried)  # above_chance: re-exported

# grid keys that vary the sample, not the setting: averaged over in the summary
_SAMPLE_KEYS = ("seed", "capture.indices", "capture.model_seed")


# ------------------------------------------------------------------------------------------------- data
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: not a readable JSON file") from None


def _single_row(folder: Path) -> dict[str, Any]:
    """The row of one experiment folder (``gradleak run``) or attack folder (``gradleak attack --truth``)."""
    import yaml

    m = _read_json(folder / "metrics.json")
    if not isinstance(m, dict) or not isinstance(m.get("psnr"), (int, float)):
        raise UserError(f"{folder / 'metrics.json'}: holds no scored reconstruction")
    cfg: dict[str, Any] = {}
    if (folder / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
    attack = _read_json(folder / "attack.json") if (folder / "attack.json").is_file() else {}
    if cfg.get("capture") and "obfuscation" in cfg["capture"]:
        setting = setting_label(cfg)
    else:  # an attack folder: the defence as the observation recorded it
        proto = m.get("protocol") or {"algorithm": (m.get("threat_model") or {}).get("protocol", "fedsgd")}
        specs = [dict(o["spec"]) if isinstance(o.get("spec"), dict) else {"name": o["name"]}
                 for o in (m.get("obfuscation") or []) if isinstance(o, dict) and o.get("name")]
        setting = setting_label({"capture": {"obfuscation": specs, "protocol": {
            "algorithm": proto.get("algorithm", "fedsgd"), "local_steps": proto.get("local_steps"),
            "local_lr": proto.get("local_lr")}}})
    name = str(m.get("attack", attack.get("attack", "?")))
    tm = m.get("threat_model") or {}
    if not cfg.get("capture") and isinstance(m.get("model"), dict):  # what the observation says it captured
        d = m.get("data_description") or {}
        cfg = {"data": {k: d[k] for k in ("source", "path", "split", "size") if d.get(k) is not None},
               "capture": {"arch": m["model"].get("arch"), "batch_size": m.get("num_images"),
                           "protocol": m.get("protocol") or {}}}
        if not cfg["data"]:
            cfg.pop("data")
    if m.get("prior") or cfg.get("attack", {}).get("prior") or tm.get("postprocessing"):
        name += " + prior"
    return {"cell": folder.name, "index": 0, "status": "ok", "attack": name, "setting": setting, "params": {},
            "metrics": {**{k: m.get(k) for k in ("psnr", "ssim", "ms_ssim", "lpips", "lpips_note", "mse",
                                                 "label_accuracy", "num_images")},
                        **({"without_postprocessing": m["without_postprocessing"]}
                           if isinstance(m.get("without_postprocessing"), dict) else {})},
            "metric_variants": m.get("metric_variants", {}), "threat_model": tm,
            "baseline": ({k: v for k, v in m["baseline"].items() if k != "per_image"}
                         if isinstance(m.get("baseline"), dict) else None),
            "gain_over_baseline": m.get("gain_over_baseline"), "budget": m.get("budget"),
            "converged": m.get("converged", (m.get("budget") or {}).get("converged")),
            "reid": m.get("reid"), "bits": m.get("bits"), "obfuscation": m.get("obfuscation", []),
            "epsilon": _record_epsilon(m.get("obfuscation") or []), "config": cfg,
            "versions": attack.get("versions"), "_folder": str(folder),
            "_truth": m.get("truth")}


def _record_epsilon(records: list[Any]) -> float | None:
    eps = [r.get("epsilon") for r in records if isinstance(r, dict) and _num(r.get("epsilon")) is not None]
    return float(eps[-1]) if eps else None


def _load_rows(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Rows (sweep, one experiment or one attack folder), the spec/config, and the kind. A folder with no
    readable result is a :class:`UserError`."""
    import yaml

    if (folder / "results.jsonl").is_file():
        rows = []
        for line in (folder / "results.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "cell" in row and "status" in row:
                rows.append(row)
        if not any(r.get("status") == "ok" for r in rows):
            failed = sum(r.get("status") != "ok" for r in rows)
            raise UserError(f"{folder}: no finished cell in results.jsonl"
                            + (f" ({failed} failed; see {folder / 'cells'}/*/log.txt)" if failed else ""))
        spec = {}
        if (folder / "sweep.yaml").is_file():
            try:
                spec = yaml.safe_load((folder / "sweep.yaml").read_text()) or {}
            except yaml.YAMLError:
                spec = {}
        for r in rows:
            r["_folder"] = str(folder / "cells" / r["cell"])
        return rows, spec, "sweep"
    if (folder / "metrics.json").is_file():
        row = _single_row(folder)
        return [row], row["config"] or {}, "experiment"
    if (folder / "reconstruction.npz").is_file():
        raise UserError(f"{folder}: holds reconstructions but no metrics.json; score them with "
                        f"'gradleak attack ... --truth TRUTH.npz'")
    raise UserError(f"{folder}: no readable results (neither results.jsonl of a sweep nor metrics.json of an "
                    f"experiment or attack)")


def read_utilities(folder: Path) -> dict[str, dict[str, Any]]:
    """The finished utility runs of a sweep folder: ``{utility key: its result summary}``; the runs of
    one config under several seeds (folders ``KEY``, ``KEY-s1``, ...) are merged by
    :func:`aggregate_utility`."""
    import re

    runs: dict[str, list[dict[str, Any]]] = OrderedDict()
    for p in sorted((folder / "utility").glob("*/result.json")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if r.get("status") == "ok":
            key = re.sub(r"-s\d+$", "", p.parent.name)
            runs.setdefault(key, []).append(r.get("utility") or {})
    return {k: aggregate_utility(v) for k, v in runs.items()}


#: Final metrics whose mean and 95 % interval over seeds the report shows.
_INTERVAL_METRICS = ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "loss")


def aggregate_utility(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One utility config run under several seeds: ``final`` holds the mean of each final metric,
    ``final_ci95`` its two-sided 95 % Student-t interval over the seeds (None for one seed), ``seeds`` the
    number of runs and ``per_seed_final`` each run's final metrics. Other keys come from the first run
    (epsilon: the largest)."""
    if not runs:
        return {}
    out = dict(runs[0])
    finals = [r.get("final") or {} for r in runs]
    n = len(runs)
    out["seeds"] = n
    out["per_seed_final"] = finals
    mean: dict[str, Any] = dict(finals[0])
    ci: dict[str, Any] = {}
    for k in _INTERVAL_METRICS:
        vals = [v for v in (_num(f.get(k)) for f in finals) if v is not None]
        if not vals:
            continue
        m = float(np.mean(vals))
        mean[k] = m
        if len(vals) > 1:
            from scipy.stats import t

            half = float(t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / np.sqrt(len(vals)))
            ci[k] = [m - half, m + half]
        else:
            ci[k] = None
    out["final"] = mean
    out["final_ci95"] = ci
    eps = [e for e in (_last(r.get("epsilon")) for r in runs) if e is not None]
    out["epsilon"] = max(eps) if eps else None
    return out


def _auc_text(utility: dict[str, Any] | None, html_: bool = True) -> str:
    """ROC AUC with its 95 % interval over seeds (or the note that one seed gives none)."""
    final = (utility or {}).get("final") or {}
    auc = _num(final.get("roc_auc"))
    if auc is None:
        return "–"
    ci = ((utility or {}).get("final_ci95") or {}).get("roc_auc")
    seeds = int((utility or {}).get("seeds") or 1)
    note = (f"95% interval {ci[0]:.2f}–{ci[1]:.2f}, {seeds} seeds" if ci else "one seed, no interval")
    return f"{auc:.3f}<br><span class='note'>{note}</span>" if html_ else f"{auc:.3f} ({note})"


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _mean(xs) -> float | None:
    v = [x for x in (_num(x) for x in xs) if x is not None]
    return sum(v) / len(v) if v else None


def _last(x: Any) -> float | None:
    if isinstance(x, list):
        return _num(x[-1]) if x else None
    return _num(x)


def _condition(row: dict[str, Any], varying: list[str]) -> str:
    parts = []
    for k in varying:
        if k in row.get("params", {}):
            parts.append(f"{_short_key(k)}={row['params'][k]}")
    return ", ".join(parts)


def _short_key(k: str) -> str:
    return {"capture.batch_size": "batch", "capture.arch": "model", "data.size": "px",
            "capture.labels_known": "labels known", "data.source": "data"}.get(k, k)


class Group:
    """All cells of one defence setting under one condition (e.g. batch size)."""

    def __init__(self, setting: str, condition: str):
        self.setting, self.condition = setting, condition
        self.by_attack: dict[str, list[dict[str, Any]]] = OrderedDict()

    @property
    def label(self) -> str:
        return self.setting + (f" ({self.condition})" if self.condition else "")

    def attack_stats(self, attack: str) -> dict[str, Any]:
        rows = self.by_attack[attack]
        m = lambda k: _mean(r["metrics"].get(k) for r in rows)  # noqa: E731
        reid_hits = reid_n = iip_hits = iip_n = 0
        top5_hits = 0
        chance, chance5 = [], []
        distances = set()
        rankings: set[str] = set()
        leave_out = []
        for r in rows:
            reid = r.get("reid") or {}
            rankings |= {k for k, v in (reid.get("by_distance") or {}).items() if "top1" in v}
            s = reid.get("strongest")
            if s:
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
        base = lambda k: _mean((r.get("baseline") or {}).get(k) for r in rows)  # noqa: E731
        gain = lambda k: _mean((r.get("gain_over_baseline") or {}).get(k) for r in rows)  # noqa: E731
        ssim_, base_ssim = m("ssim"), base("ssim")
        from ..metrics.baseline import ssim_skill

        budgets = [r.get("budget") or {} for r in rows]
        conv = [r["converged"] if "converged" in r else b.get("converged", (r.get("attack_run") or {}).get("converged"))
                for r, b in zip(rows, budgets)]
        its = _mean(b.get("iterations", (r.get("attack_run") or {}).get("iterations")) for r, b in zip(rows, budgets))
        secs = _mean(b.get("seconds", (r.get("timings") or {}).get("attack_s")) for r, b in zip(rows, budgets))
        return {"attack": attack, "cells": len(rows), "psnr": m("psnr"), "ssim": ssim_,
                "ms_ssim": m("ms_ssim"), "lpips": m("lpips"), "label_accuracy": m("label_accuracy"),
                "images": sum(int(r["metrics"].get("num_images") or 0) for r in rows),
                "baseline_psnr": base("psnr"), "baseline_ssim": base_ssim,
                "gain_psnr": gain("psnr_db"), "gain_ssim": gain("ssim"),
                "ssim_skill": (ssim_skill(ssim_, base_ssim) if ssim_ is not None and base_ssim is not None
                               else None),
                "converged": conv, "iterations": its, "seconds": secs,
                "seconds_per_iteration": (secs / its) if its and secs is not None else None,
                "reid_hits": reid_hits if reid_n else None, "reid_n": reid_n or None,
                "reid_measured": bool(distances), "top5_hits": top5_hits if reid_n else None,
                "iip_hits": iip_hits if iip_n else None, "iip_n": iip_n or None,
                "reid_distances": sorted(distances), "reid_rankings": sorted(rankings),
                "leave_the_image_out": bool(leave_out) and all(leave_out),
                "chance": _mean(chance), "chance5": _mean(chance5), "bits": _mean(r.get("bits") for r in rows),
                "epsilon": _mean(r.get("epsilon") for r in rows),
                "post": self._post(rows)}

    @staticmethod
    def _post(rows) -> dict[str, dict[str, float | None]]:
        """Nested results some attacks add (e.g. before post-processing)."""
        out: dict[str, dict[str, float | None]] = {}
        for r in rows:
            for k, v in r["metrics"].items():
                if k != "metric_variants" and isinstance(v, dict) and isinstance(v.get("psnr"), (int, float)):
                    out.setdefault(k, {"psnr": [], "ssim": []})  # type: ignore[dict-item]
                    out[k]["psnr"].append(v.get("psnr"))  # type: ignore[union-attr]
                    out[k]["ssim"].append(v.get("ssim"))  # type: ignore[union-attr]
        return {k: {"psnr": _mean(v["psnr"]), "ssim": _mean(v["ssim"])} for k, v in out.items()}  # type: ignore

    def worst_case(self) -> dict[str, Any]:
        """The attack that leaks most on this setting: the highest risk level (an unconverged attack that
        shows no leak makes the setting inconclusive), then the highest patient re-identification rate, then
        the highest SSIM gain over the blind baseline."""
        stats = [self.attack_stats(a) for a in self.by_attack]
        return max(stats, key=lambda s: (RISK_ORDER[_risk(s)], (s["reid_hits"] or 0) / (s["reid_n"] or 1),
                                         (s["ssim_skill"] if s["ssim_skill"] is not None else -1e9),
                                         (s["ssim"] if s["ssim"] is not None else -1)))


def _attack_label(row: dict[str, Any]) -> str:
    """The attack's name, with '+ prior' when a learned post-processing prior ran after it."""
    name = str(row.get("attack", "?"))
    if " + prior" in name:
        return name
    att = ((row.get("config") or {}).get("attack") or {})
    if att.get("prior") or (row.get("threat_model") or {}).get("postprocessing"):
        return name + " + prior"
    return name


def _groups(rows: list[dict[str, Any]]) -> tuple[list[Group], list[str]]:
    keys: list[str] = []
    for r in rows:
        for k in r.get("params", {}):
            if k not in keys:
                keys.append(k)
    varying = [k for k in keys
               if k != "attack" and not k.startswith("attack.") and k not in _SAMPLE_KEYS and not k.startswith("capture.obfuscation")
               and not k.startswith("capture.protocol")
               and len({json.dumps(r.get("params", {}).get(k), sort_keys=True, default=str) for r in rows}) > 1]
    groups: dict[tuple[str, str], Group] = OrderedDict()
    for r in rows:
        key = (r["setting"], _condition(r, varying))
        g = groups.setdefault(key, Group(*key))
        g.by_attack.setdefault(_attack_label(r), []).append(r)
    # unprotected first, then in the order the grid lists them
    ordered = sorted(groups.values(), key=lambda g: (g.setting != "none",))
    return ordered, varying


# --------------------------------------------------------------------------------------------- verdicts
def _image_text(s: dict[str, Any]) -> str:
    level = image_level(s.get("ssim_skill"))
    text = image_phrase(level)
    if s.get("baseline_ssim") is not None and s.get("ssim") is not None:
        sk = s.get("ssim_skill") or 0.0
        text += (f": SSIM {s['ssim']:.2f} against {s['baseline_ssim']:.2f} for the blind guess "
                 + (f"({sk * 100:.0f}% of the gap it leaves closed)" if sk >= 0 else "(worse than the blind guess)"))
        if s.get("gain_psnr") is not None:
            text += f", PSNR {s['gain_psnr']:+.1f} dB over it"
    return text


def verdict(s: dict[str, Any], utility: dict[str, Any] | None, baseline_auc: float | None) -> str:
    """The verdict of one setting in plain words, its budget included."""
    r = _risk(s)
    parts = []
    if r == "inconclusive":
        why = (INCONCLUSIVE if not all_converged(s) else
               "inconclusive: no blind baseline to judge the images against")
        parts.append(_cap(why) + " — it can show a leak, never its absence")
    parts.append(_image_text(s) if parts else _cap(_image_text(s)))
    if s.get("reid_n"):
        sig = reid_significant(s)
        lo = "leave-the-image-out" if s.get("leave_the_image_out") else "the attacked image in the gallery"
        parts.append(f"patient re-identified in {s['reid_hits']}/{s['reid_n']} cases ({lo}"
                     + (f"; top-5 {s['top5_hits']}/{s['reid_n']}" if s.get("top5_hits") is not None else "")
                     + (f"; a random guess: {s['chance'] * s['reid_n']:.2g}/{s['reid_n']}; "
                        + ("clearly better than guessing" if sig else "not clearly better than guessing")
                        if s["chance"] else "") + ")")
    elif s.get("reid_measured") is not None and s.get("iip_n"):
        parts.append("patient re-identification not measurable (no attacked patient has another image in the "
                     "gallery)")
    if s.get("iip_n"):
        parts.append(f"exact image identified (IIP) in {s['iip_hits']}/{s['iip_n']}")
    text = "; ".join(parts) + "."
    text += f" Budget: {budget_text(s)}."
    auc = _num((utility or {}).get("final", {}).get("roc_auc"))
    if auc is not None:
        delta = f", {auc - baseline_auc:+.3f} vs. no protection" if baseline_auc is not None else ""
        text += f" Model ROC AUC {_auc_text(utility, html_=False)}{delta}."
    return text


# ------------------------------------------------------------------------------------------------ plots
def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def privacy_utility_plot(points: list[dict[str, Any]]) -> bytes | None:
    """Leakage (y) against utility (x), one point per setting; the unprotected one marked."""
    from matplotlib.figure import Figure

    have_utility = any(p["auc"] is not None for p in points)
    have_reid = any(p["reid"] is not None for p in points)
    if not points or not any((p["auc"] if have_utility else p["bits"]) is not None
                             and (p["skill"] is not None or p["reid"] is not None) for p in points):
        return None
    panels = [("skill", "Image leakage beyond the blind guess: SSIM gain\n(share of the gap between the blind "
                        "guess and the original; 1 = identical)")]
    if have_reid:
        panels.append(("reid", "Patient re-identification rate, top-1\n(strongest ranking; see definitions)"))
    fig = Figure(figsize=(5.2 * len(panels), 4.4))
    palette = ["#2c6fbb", "#e67e22", "#27ae60", "#8e44ad", "#16a085", "#d35400", "#7f8c8d", "#2c3e50",
               "#c71585", "#b8860b"]
    handles: dict[str, Any] = {}
    for i, (key, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        k = 0
        for p in points:
            y = p[key] if p[key] is None else max(p[key], -1.0)
            x = p["auc"] if have_utility else p["bits"]
            base = p["setting"] == "none"
            color = "#c0392b" if base else palette[k % len(palette)]
            k += 0 if base else 1
            if y is None or x is None:
                continue
            h = ax.scatter([x], [y], s=230 if base else 70, marker="*" if base else "o", color=color,
                           edgecolor="black", linewidth=0.6, zorder=3 if base else 4, alpha=0.9)
            handles.setdefault("no protection" if base else p["label"], h)
        if have_utility:
            ax.set_xlabel("Model utility: ROC AUC on held-out patients\n(higher is better for the model)")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("Bits per update (utility not measured in this run)")
        ax.set_ylabel(ylabel, fontsize=9)
        ys = [p[key] for p in points if p[key] is not None]
        ax.set_ylim(min([-0.05] + [max(y, -1.0) - 0.05 for y in ys]), 1.05)
        ax.grid(alpha=0.3)
        ax.axhspan(RECOGNISABLE_SKILL if key == "skill" else HIGH_REID, 1.05, color="#c0392b", alpha=0.06)
    if handles:
        fig.legend(list(handles.values()), [t[:60] for t in handles], loc="lower center",
                   ncol=min(3, len(handles)), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02 - 0.035 *
                                                                                      ((len(handles) - 1) // 3)))
    fig.suptitle("Privacy vs. utility per defence setting (star: no protection; top = leaks more)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(handles) - 1) // 3 + 1), 1, 1))
    return _png(fig)


# ------------------------------------------------------------------------------------------------- html
def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _fmt(x: Any, digits: int = 2, unit: str = "") -> str:
    v = _num(x)
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def _bits(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "–"
    for unit, f in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if v >= f:
            return f"{v / f:.3g} {unit}"
    return f"{v:.0f} bit"


def _e(x: Any) -> str:
    return html.escape(str(x))


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1180px;margin:24px auto;
padding:0 20px;color:#1d232a;line-height:1.45;font-size:15px}
h1{font-size:26px;margin-bottom:4px}h2{font-size:20px;margin-top:34px;border-bottom:2px solid #e3e7ec;padding-bottom:4px}
.sub{color:#5b6672;margin-top:0}
.bottom{background:#f5f7fa;border-left:6px solid #2c6fbb;padding:12px 18px;margin:18px 0;font-size:16px}
table{border-collapse:collapse;width:100%;margin:10px 0;font-size:13px}
th,td{border:1px solid #d5dbe1;padding:5px 6px;text-align:right;vertical-align:top}
td .note{font-size:12px}
th{background:#eef2f6;text-align:center;font-weight:600}
td.l,th.l{text-align:left}
.risk{display:inline-block;padding:2px 9px;border-radius:10px;font-weight:600;font-size:13px;white-space:nowrap}
.high{background:#fbe3e1;color:#a3261b}.moderate{background:#fdf1d8;color:#8a5a00}.low{background:#e2f4e6;color:#1e6b34}
.inconclusive{background:#e8eaee;color:#39424d}
.note{color:#5b6672;font-size:13px}
.grid td{padding:6px 4px;text-align:left;vertical-align:top;border:none;border-bottom:1px solid #e3e7ec}
.grid .cap{margin-bottom:4px}
.grid img{image-rendering:pixelated;max-width:none}
.scroll{overflow-x:auto}
sup{color:#2c6fbb}
dl dt{font-weight:600;margin-top:8px}dl dd{margin-left:18px}
code{background:#f1f3f5;padding:1px 4px;border-radius:3px}
"""


def _threat_text(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    seen = set()
    for r in rows:
        tm = r.get("threat_model") or {}
        if not tm:
            continue
        t = (f"{r['attack']}: server {tm.get('server', 'honest-but-curious')}; protocol {tm.get('protocol')}; labels "
             f"{'known' if tm.get('labels_known') else 'inferred (' + str(tm.get('labels')) + ')'}; obfuscation "
             + ("none" if not tm.get("obfuscation") else
                ("known to the attacker" if tm.get("obfuscation_known") else "not known to the attacker"))
             + f"; BatchNorm statistics: {tm.get('bn_statistics')}")
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


#: Size of one image in the report's grids, in CSS pixels (never shrunk by the page).
TILE = 128


def _truth_path(folder: Path, row: dict[str, Any]) -> Path | None:
    """The truth file of a result folder: its own ``truth.npz`` (experiments, sweep cells) or the file
    ``gradleak attack --truth`` read (recorded in metrics.json)."""
    if (folder / "truth.npz").is_file():
        return folder / "truth.npz"
    t = row.get("_truth")
    for cand in ([Path(t), folder / t] if t else []):
        if cand.is_file():
            return cand
    return None


def _tile_img(images, alt: str, pad: int = 3) -> str:
    from ..figures.images import grid

    pic = grid([images], tile=TILE, pad=pad)
    w, h = pic.size
    return f"<img alt='{_e(alt)}' width='{w}' height='{h}' src='{_b64(_grid_png(pic))}'>"


def _grid_section(groups: list[Group], max_images: int = 8) -> str:
    """Originals, the blind baseline and the reconstruction under each defence, image above image, each
    image at least :data:`TILE` px on screen."""
    import torch

    # samples (truth files) and the (setting, attack) pairs that attacked them
    by_sample: dict[str, dict[tuple[str, str], tuple[Path, Path]]] = OrderedDict()
    unpaired: list[tuple[str, str, Path]] = []
    for g in groups:
        for attack, rows in g.by_attack.items():
            for r in rows:
                folder = Path(r.get("_folder", ""))
                if not (folder / "reconstruction.npz").is_file():
                    continue
                t = _truth_path(folder, r)
                if t is None:
                    unpaired.append((g.label, attack, folder))
                    continue
                with np.load(t) as z:
                    key = json.dumps([z["indices"].tolist() if "indices" in z else [],
                                      r.get("config", {}).get("data"), str(t) if "indices" not in z else ""],
                                     default=str)
                by_sample.setdefault(key, {}).setdefault((g.label, attack), (folder, t))
    if not by_sample:
        if not unpaired:
            return "<p class='note'>No reconstructions on disk to show.</p>"
        items = []
        for label, attack, folder in unpaired:
            with np.load(folder / "reconstruction.npz") as z:
                rec = torch.from_numpy(z["images"])[:max_images]
            items.append(f"<tr><td><div class='cap'><b>{_e(label)}</b> <span class='note'>{_e(attack)}</span></div>"
                         f"{_tile_img(rec, f'reconstruction under {label} by {attack}')}</td></tr>")
        return ("<p class='note'>The originals are not on disk (the truth file this result was scored with has "
                "moved), so the reconstructions are shown alone.</p>"
                f"<div class='scroll'><table class='grid'>{''.join(items)}</table></div>")
    most = max(len(v) for v in by_sample.values())
    chosen, count = [], 0
    for k, v in by_sample.items():  # samples every pair attacked, up to `max_images` images
        if len(v) == most and count < max_images:
            chosen.append(v)
            with np.load(next(iter(v.values()))[1]) as z:
                count += len(z["images"])
    pairs = list(chosen[0])
    originals, pids = [], []
    for v in chosen:
        with np.load(next(iter(v.values()))[1]) as z:
            originals.append(torch.from_numpy(z["images"]))
            pids += [str(p) for p in z["patient_ids"]] if "patient_ids" in z else [""] * len(z["images"])
    originals_t = torch.cat(originals)[:max_images]
    n0 = len(originals_t)
    rows_html = [f"<tr><td><div class='cap'><b>Originals</b> <span class='note'>patients "
                 f"{_e(', '.join(pids[:max_images]))}</span></div>{_tile_img(originals_t, 'original images')}</td></tr>"]
    # the blind baseline: the guess without the update, as scored against these originals
    base_imgs, base_ps, base_ss = [], [], []
    for v in chosen:
        folder, _ = next(iter(v.values()))
        bp = folder / "baseline.npz"
        m = _read_json(folder / "metrics.json")
        if not bp.is_file() or not isinstance(m.get("baseline"), dict):
            base_imgs = []
            break
        with np.load(bp) as z:
            mean_img = torch.from_numpy(z["mean_image"])
        k = int(m.get("num_images") or len(m.get("per_image") or []))
        base_imgs.append(mean_img.expand(k, *mean_img.shape[1:]))
        base_ps += [p.get("baseline_psnr") for p in m.get("per_image", [])]
        base_ss += [p.get("baseline_ssim") for p in m.get("per_image", [])]
    if base_imgs:
        aux = (_read_json(next(iter(chosen[0].values()))[0] / "metrics.json").get("baseline") or {}).get(
            "auxiliary_data") or {}
        what = (f"the mean of {aux['images']} auxiliary images of patients not attacked" if aux.get("images")
                else "the mean auxiliary image")
        rows_html.append(
            f"<tr><td><div class='cap'><b>Blind baseline</b> <span class='note'>the attacker's guess without the "
            f"update: {_e(what)}; PSNR {_fmt(_mean(base_ps[:n0]), 1)} dB, SSIM {_fmt(_mean(base_ss[:n0]))} against "
            f"these originals</span></div>{_tile_img(torch.cat(base_imgs)[:max_images], 'blind baseline')}</td></tr>")
    for label, attack in pairs:
        recs, ps, ss, gs = [], [], [], []
        for v in chosen:
            folder, _ = v[(label, attack)]
            m = _read_json(folder / "metrics.json")
            perm = [p["paired_reconstruction"] for p in m["per_image"]]
            with np.load(folder / "reconstruction.npz") as z:
                recs.append(torch.from_numpy(z["images"])[perm])
            ps += [p["psnr"] for p in m["per_image"]]
            ss += [p["ssim"] for p in m["per_image"]]
            gs += [p.get("gain_ssim") for p in m["per_image"]]
        rec = torch.cat(recs)[:max_images]
        n = len(rec)
        g_ = _mean(gs[:n])
        rows_html.append(
            f"<tr><td><div class='cap'><b>{_e(label)}</b> <span class='note'>{_e(attack)}: PSNR "
            f"{_fmt(_mean(ps[:n]), 1)} dB, SSIM {_fmt(_mean(ss[:n]))}"
            + (f" ({g_:+.2f} over the blind baseline)" if g_ is not None else "")
            + f" on these {n}</span></div>{_tile_img(rec, f'reconstruction under {label} by {attack}')}</td></tr>")
    return ("<p>The same private images (top row), the attacker's blind guess without the update, and what the "
            "curious server reconstructed under each defence, each image below the original it was paired with. "
            f"Every image is shown at {TILE} px, pixels enlarged.</p>"
            f"<div class='scroll'><table class='grid'>{''.join(rows_html)}</table></div>")


def _utility_mismatch(rows: list[dict[str, Any]], utilities: dict[str, dict[str, Any]]) -> str:
    """How the utility runs' model and protocol differ from the attacked ones ('' when they match)."""
    diffs: set[str] = set()
    for r in rows:
        u = utilities.get(r.get("utility_key") or "")
        cap = (r.get("config") or {}).get("capture") or {}
        if not u or not cap:
            continue
        ua, ca = (u.get("model") or {}).get("arch"), cap.get("arch")
        up, cp = (u.get("protocol") or {}).get("algorithm"), (cap.get("protocol") or {}).get("algorithm")
        if ua and ca and ua != ca:
            diffs.add(f"the utility runs trained {ua}, the attacks ran on {ca}")
        if up and cp and up != cp:
            diffs.add(f"the utility runs used {up}, the attacked updates {cp}")
    return "; ".join(sorted(diffs)) + "." if diffs else ""


def _epsilon_text(utility: dict[str, Any] | None, rows: list[dict[str, Any]]) -> str:
    """Epsilon with what it depends on: delta, the rounds accounted and the client sampling rate. From the
    utility run when there is one (the whole training), else from the attacked update's record (one
    round as recorded)."""
    if utility and _last(utility.get("epsilon")) is not None:
        eps, delta = _last(utility.get("epsilon")), utility.get("delta")
        rounds = utility.get("rounds_run")
        q = (((utility.get("threat_model") or {}).get("dp") or {}).get("sample_rate"))
        where = "training"
    else:
        recs = [o for r in rows for o in (r.get("obfuscation") or []) if isinstance(o, dict)
                and _num(o.get("epsilon")) is not None]
        if not recs:
            return "–"
        o = recs[-1]
        eps, delta, rounds, q = o["epsilon"], o.get("delta"), o.get("rounds"), o.get("sample_rate")
        where = "capture"
    parts = [f"&delta; {_e(f'{delta:g}')}" if _num(delta) is not None else None,
             f"{rounds} round{'s' if rounds != 1 else ''}" if rounds is not None else None,
             f"sample rate {_e(f'{q:g}')}" if _num(q) is not None else None]
    extra = ", ".join(x for x in parts if x)
    return (f"{_fmt(eps, 2)}<br><span class='note'>{extra}" + (f"; {where}" if where == "capture" else "")
            + "</span>") if extra else _fmt(eps, 2)


def _baseline_variant(rows: list[dict[str, Any]]) -> str:
    from ..metrics.baseline import VARIANT

    for r in rows:
        v = (r.get("baseline") or {}).get("variant")
        if v:
            return str(v)
    return VARIANT + " (not measured for these results)"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _data_text(d: dict[str, Any]) -> str:
    d = dict(d)
    src = str(d.pop("source", "?"))
    path = d.pop("path", None)
    size = d.pop("size", None)
    rest = ", ".join(f"{k}={v}" for k, v in sorted(d.items()))
    return (f"{src}{' ' + str(path) if path else ''}" + (f", {size} px" if size else "")
            + (f" ({rest})" if rest else ""))


def _grid_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_report(folder: Path) -> tuple[str, dict[str, bytes]]:
    """The HTML text and the PNG files to write beside it."""
    rows_all, spec, kind = _load_rows(folder)
    rows = [r for r in rows_all if r.get("status") == "ok"]
    failed = [r for r in rows_all if r.get("status") != "ok"]
    utilities = read_utilities(folder)
    groups, varying = _groups(rows)
    name = spec.get("name") or folder.name

    base_auc = None
    for g in groups:
        if g.setting == "none":
            u = utilities.get(g.by_attack[next(iter(g.by_attack))][0].get("utility_key") or "")
            base_auc = _num((u or {}).get("final", {}).get("roc_auc"))
            break

    summary_rows, points, verdicts = [], [], []
    for g in groups:
        w = g.worst_case()
        first = g.by_attack[w["attack"]][0]
        u = utilities.get(first.get("utility_key") or "")
        final = (u or {}).get("final", {})
        risk = _risk(w)
        v = verdict(w, u, base_auc)
        eps_text = _epsilon_text(u, g.by_attack[w["attack"]])
        defence, _, strength = g.setting.partition("(")
        strength = strength.rstrip(")") if strength else ""
        if " + " in g.setting:
            defence, strength = g.setting, ""
        rate = (f"{w['reid_hits']}/{w['reid_n']}" + (f" <span class='note'>(chance {w['chance'] * w['reid_n']:.2g})"
                                                       f"</span>" if w.get("chance") is not None else "")
                if w["reid_n"] else "–")
        gain = (f"{_fmt(w['gain_psnr'], 1)} dB<br>{_fmt(w['gain_ssim'])}" if w.get("gain_ssim") is not None
                else "–")
        summary_rows.append(
            f"<tr><td class='l'><b>{_e(defence)}</b>{('<br><span class=note>' + _e(g.condition) + '</span>') if g.condition else ''}</td>"
            f"<td class='l'>{_e(strength) or '–'}</td><td class='l'>{_e(w['attack'])}<br><span class='note'>"
            f"{_e(budget_text({**w, 'attack': None}))}</span></td>"
            f"<td>{_fmt(w['psnr'], 1)}</td><td>{_fmt(w['ssim'])}</td><td>{_fmt(w['ms_ssim'])}</td>"
            f"<td>{_fmt(w.get('baseline_ssim'))}</td><td>{gain}</td>"
            f"<td>{rate}</td><td>{(str(w['iip_hits']) + '/' + str(w['iip_n'])) if w.get('iip_n') else '–'}</td>"
            f"<td>{_auc_text(u)}</td><td>{_fmt(final.get('accuracy'), 3)}</td>"
            f"<td>{_bits(w['bits'])}</td><td>{eps_text}</td>"
            f"<td class='l'><span class='risk {risk}'>{risk}{'' if risk == 'inconclusive' else ' risk'}</span></td></tr>")
        verdicts.append(f"<li><span class='risk {risk}'>{risk}{'' if risk == 'inconclusive' else ' risk'}</span> "
                        f"<b>{_e(g.label)}</b>: {_e(v)}</li>")
        points.append({"setting": g.setting, "label": g.label, "skill": w["ssim_skill"],
                       "reid": (w["reid_hits"] / w["reid_n"]) if w["reid_n"] else None,
                       "auc": _num(final.get("roc_auc")), "bits": w["bits"], "risk": risk})

    files: dict[str, bytes] = {}
    plot = privacy_utility_plot(points) if len(points) >= 1 else None
    if plot:
        files["privacy_utility.png"] = plot

    # bottom line
    bl = []
    base = next((p for p in points if p["setting"] == "none"), None)
    if base:
        gb = next(g for g in groups if g.setting == "none")
        vb = verdict(gb.worst_case(), None, None)
        bl.append(f"<b>Without protection</b>{'' if base['risk'] == 'inconclusive' else ' (' + base['risk'] + ' risk)'}: "
                  f"{_e(vb[0].lower() + vb[1:])}")
    protected = [p for p in points if p["setting"] != "none"]
    if protected:
        low = [p for p in protected if p["risk"] == "low"]
        if low:
            best = max(low, key=lambda p: (p["auc"] if p["auc"] is not None else -1))
            cost = (f" at a model ROC AUC of {best['auc']:.3f}" if best["auc"] is not None else "")
            bl.append(f"Of the {len(protected)} protected setting(s) tested, {len(low)} brought the risk down to low; "
                      f"the one that keeps the model best is <b>{_e(best['label'])}</b>{cost}.")
        else:
            bl.append(f"<b>None of the {len(protected)} protected setting(s) tested brought the risk down to low.</b>")
        if base and base["risk"] in ("low", "inconclusive") and low:
            bl.append("Even without protection the attacks tried showed no leak by these criteria, so a low risk "
                      "under a defence says little about that defence.")
    unsure = [p for p in points if p["risk"] == "inconclusive"]
    if unsure:
        bl.append(f"{len(unsure)} setting(s) are <b>inconclusive</b>: the attack stopped before converging, so their "
                  f"result shows no leak but cannot show its absence; rerun them with a larger budget.")
    tried = [a for g in groups for a in g.by_attack]
    best_attack, stronger = strongest_tried(tried)
    if best_attack is not None:
        bl.append(f"Strongest attack tried: <b>{_e(best_attack)}</b>"
                  + (f"; stronger attacks not run: {_e(', '.join(stronger))}." if stronger else
                     " (the strongest gradleak has)."))
    if failed:
        bl.append(f"{len(failed)} cell(s) failed and are listed at the end.")

    def_items = OrderedDict()
    for r in rows:
        for k, v in (r.get("metric_variants") or {}).items():
            def_items.setdefault(k.upper().replace("_", "-"), v)
    reid_def = next(((r.get("reid") or {}) for r in rows if r.get("reid")), {})
    # threat models, data, model
    cfgs = [r.get("config") or {} for r in rows]
    data_desc = sorted({_data_text(c["data"]) for c in cfgs if c.get("data")})
    archs = sorted({str((c.get("capture") or {}).get("arch")) for c in cfgs if c.get("capture")})
    protos = sorted({str(((c.get("capture") or {}).get("protocol") or {}).get("algorithm")) for c in cfgs
                     if c.get("capture")})
    batches = sorted({int((c.get("capture") or {}).get("batch_size")) for c in cfgs if c.get("capture")})
    n_images = sum(int(r["metrics"].get("num_images") or 0) for r in rows)

    detail = []
    for g in groups:
        for a in g.by_attack:
            s = g.attack_stats(a)
            extra = "".join(f"<br><span class='note'>{_e(k.replace('_', ' '))}: PSNR {_fmt(v['psnr'], 1)}, SSIM "
                            f"{_fmt(v['ssim'])}</span>" for k, v in s["post"].items())
            detail.append(
                f"<tr><td class='l'>{_e(g.label)}</td><td class='l'>{_e(a)}{extra}</td><td>{s['cells']}</td>"
                f"<td>{s['images']}</td><td>{_fmt(s['psnr'], 1)}</td><td>{_fmt(s['ssim'])}</td>"
                f"<td>{_fmt(s['ms_ssim'])}</td><td>{_fmt(s['lpips'], 3) if s['lpips'] is not None else 'n/a'}</td>"
                f"<td>{(str(s['reid_hits']) + '/' + str(s['reid_n'])) if s['reid_n'] else '–'}</td>"
                f"<td>{(str(s['top5_hits']) + '/' + str(s['reid_n'])) if s['reid_n'] else '–'}</td>"
                f"<td>{(str(s['iip_hits']) + '/' + str(s['iip_n'])) if s.get('iip_n') else '–'}</td>"
                f"<td class='l'>{_e(', '.join(s['reid_distances'])) or '–'}</td>"
                f"<td>{_fmt(s['label_accuracy'])}</td><td>{_fmt(s.get('baseline_ssim'))}</td>"
                f"<td>{_fmt(s.get('gain_psnr'), 1)} dB, {_fmt(s.get('gain_ssim'))}</td>"
                f"<td class='l'><span class='risk {_risk(s)}'>{_risk(s)}</span><br><span class='note'>"
                f"{_e(budget_text({**s, 'attack': None}))}</span></td></tr>")
    lpips_note = next((r["metrics"].get("lpips_note") for r in rows if r["metrics"].get("lpips_note")), None)

    failed_html = ""
    if failed:
        items = "".join(f"<li><code>{_e(r['cell'])}</code> {_e(json.dumps(r.get('params', {}), default=str))}: "
                        f"{_e(r.get('error'))}</li>" for r in failed)
        failed_html = f"<h2>Failed cells</h2><p>These did not produce a result (rerun the sweep to retry them):</p><ul>{items}</ul>"

    threat = "".join(f"<li>{_e(t)}</li>" for t in _threat_text(rows))
    versions = next((r.get("versions") for r in rows if r.get("versions")), {}) or {}
    plot_html = (f"<img style='max-width:100%' alt='privacy-utility plot' src='{_b64(plot)}'>"
                 "<p class='note'>Also saved as <code>privacy_utility.png</code> beside this page. "
                 + ("" if any(p["auc"] is not None for p in points) else
                    "Model utility was not measured in this run, so the x axis shows the communication cost instead. ")
                 + "Shaded band: the high-risk zone.</p>") if plot else "<p class='note'>No plot.</p>"
    utility_note = ("" if utilities else "<p class='note'>Model utility (ROC AUC, accuracy) was not measured in "
                    "this run (enable <code>utility</code> in the sweep spec).</p>")
    mismatch = _utility_mismatch(rows, utilities)
    if mismatch:
        utility_note += f"<p class='note'><b>Utility of another configuration:</b> {_e(mismatch)}</p>"

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradleak privacy report: {_e(name)}</title>
<style>{CSS}</style></head><body>
<h1>Privacy report: {_e(name)}</h1>
<p class="sub">What a curious federated-learning server can recover from the updates its clients send, and what each
defence costs the model. Generated by gradleak {_e(versions.get('gradleak', ''))} on
{_e(time.strftime('%Y-%m-%d %H:%M'))} from <code>{_e(folder.name)}</code>
({len(rows)} experiment cell(s), {n_images} attacked image(s){', ' + str(len(failed)) + ' failed' if failed else ''}).</p>

<div class="bottom"><b>Bottom line.</b> {' '.join(bl) if bl else 'See the table below.'}</div>

<h2>Verdict per defence setting</h2>
<ul>{''.join(verdicts)}</ul>
<p class="note">Each verdict uses the attack that leaks most on that setting (the worst case for the patients: the
highest risk level, then the most patients re-identified, then the largest gain over the blind baseline) and states its
budget. Images are judged against the <b>blind baseline</b>, the attacker's best guess without the update (the mean of
its auxiliary images of other patients): they count as recognisable when the reconstruction closes at least
{int(RECOGNISABLE_SKILL * 100)}% of the SSIM gap between that guess and the original, partly recognisable at
{int(PARTLY_SKILL * 100)}%; raw SSIM alone is never the verdict, since a blurry average chest already scores high.
Risk is high when images are recognisable or at least {int(HIGH_REID * 100)}% of patients are re-identified from
their <i>other</i> images clearly better than guessing, moderate when images are partly recognisable or patients are
re-identified clearly better than guessing ("clearly": one-sided binomial test against a random ranking, p &lt; 0.05
after correcting for picking the strongest of the rankings), and <b>inconclusive</b> instead of low when the attack
stopped before its loss had stopped falling: an attack cut short can show a leak, never its absence. These are rules
of thumb, not guarantees; a low risk here does not prove privacy against stronger attacks.</p>

<h2>Summary per defence and strength</h2>
<div class="scroll"><table>
<tr><th class="l">Defence</th><th class="l">Strength</th><th class="l">Attack that leaks most (budget)</th>
<th>PSNR (dB)<sup>1</sup></th><th>SSIM<sup>2</sup></th><th>MS-SSIM<sup>3</sup></th>
<th>Blind baseline SSIM<sup>10</sup></th><th>Gain over the baseline (PSNR, SSIM)<sup>10</sup></th>
<th>Patients re-identified (top-1)<sup>4</sup></th><th>Exact image identified (IIP)<sup>5</sup></th>
<th>Model ROC AUC<sup>6</sup></th><th>Model accuracy<sup>6</sup></th><th>Bits per update<sup>7</sup></th>
<th>&epsilon;<sup>8</sup></th><th class="l">Risk</th></tr>
{''.join(summary_rows)}
</table></div>
<p class="note">Numbers are means over the cells (seeds, images) of each setting for its strongest attack;
re-identification counts are summed over all attacked images. Higher PSNR/SSIM/MS-SSIM and more re-identifications
mean more leakage. Numbered notes are defined under "Definitions" below.</p>
{utility_note}

<h2>What the server reconstructed</h2>
{_grid_section(groups)}

<h2>Privacy vs. utility</h2>
{plot_html}

<h2>All settings and attacks</h2>
<div class="scroll"><table>
<tr><th class="l">Setting</th><th class="l">Attack</th><th>Cells</th><th>Images</th><th>PSNR (dB)<sup>1</sup></th>
<th>SSIM<sup>2</sup></th><th>MS-SSIM<sup>3</sup></th><th>LPIPS<sup>9</sup></th><th>Re-id top-1<sup>4</sup></th>
<th>Re-id top-5<sup>4</sup></th><th>IIP<sup>5</sup></th><th class="l">Strongest ranking</th><th>Label accuracy</th>
<th>Blind baseline SSIM<sup>10</sup></th><th>Gain (PSNR, SSIM)<sup>10</sup></th><th class="l">Risk and budget<sup>11</sup></th></tr>
{''.join(detail)}
</table></div>
{failed_html}

<h2>What was tested</h2>
<ul>
<li>Data: {_e('; '.join(data_desc) or 'n/a')}</li>
<li>Victim model: {_e(', '.join(archs) or 'n/a')}; protocol: {_e(', '.join(protos) or 'n/a')}; client batch size:
{_e(', '.join(map(str, batches)) or 'n/a')}</li>
<li>Varied besides the defence: {_e(', '.join(varying) or 'nothing')}</li>
</ul>
<h3>Threat models</h3>
<ul>{threat or '<li>n/a</li>'}</ul>
<p>{_e(_cap(reid_def.get('threat_model', 'Re-identification was not measured')))}.
{('Gallery: ' + str(reid_def.get('gallery', {}).get('images')) + ' images of ' + str(reid_def.get('gallery', {}).get('patients')) + ' patients.') if reid_def else ''}</p>

<h2>Definitions</h2>
<dl>
<dt>1 PSNR</dt><dd>{_e(def_items.get('PSNR', 'peak signal-to-noise ratio'))}</dd>
<dt>2 SSIM</dt><dd>{_e(def_items.get('SSIM', 'structural similarity'))}</dd>
<dt>3 MS-SSIM</dt><dd>{_e(def_items.get('MS-SSIM', 'multi-scale SSIM'))}</dd>
<dt>4 Patient re-identification</dt><dd>{_e(_cap((reid_def.get('variants') or {}).get('top1', 'not measured')))}.
{_e(_cap((reid_def.get('variants') or {}).get('top5', '')))}. Galleries are ranked by pixel MSE, by SSIM and by a learned
embedding ({_e(((reid_def.get('embedding') or {}).get('variant')) or 'none')}); the strongest of these rankings is
reported. "Chance" is what a random ranking would reach.</dd>
<dt>5 IIP</dt><dd>{_e((reid_def.get('variants') or {}).get('iip', 'image identifiability precision (Yin et al. 2021)'))},
counted per attacked image.</dd>
<dt>6 Model utility</dt><dd>ROC AUC and accuracy of the federated pneumonia classifier trained under the same
defence (by default also the attacked architecture and protocol; any difference is stated above the table), on
held-out patients (a patient-disjoint split), as the mean over seeds with a two-sided 95% Student-t interval.</dd>
<dt>7 Bits per update</dt><dd>Communication cost of one client update after the defence (32 bits per value
without one).</dd>
<dt>8 &epsilon;</dt><dd>Client-level differential-privacy budget spent (for DP noise settings; lower is more
private), always with its &delta;, the rounds it was accounted over and the client sampling rate: from the utility
run's whole training when there is one, otherwise from the attacked update as captured ("capture"). "–" where the
defence gives no DP guarantee.</dd>
<dt>9 LPIPS</dt><dd>{_e(def_items.get('LPIPS', ''))}{('. ' + _e(_cap(lpips_note))) if lpips_note else ''}</dd>
<dt>Label accuracy</dt><dd>Share of the batch's labels the attack recovered, compared as a multiset (the attacker
does not know which image carries which label).</dd>
<dt>10 Blind baseline and gain</dt><dd>{_e(_cap(_baseline_variant(rows)))}. The gain is the reconstruction's PSNR
(dB) and SSIM minus the baseline's; verdicts use the SSIM gain as a share of the gap the baseline leaves,
(SSIM &minus; baseline SSIM) / (1 &minus; baseline SSIM).</dd>
<dt>11 Budget and convergence</dt><dd>The attack's iterations, wall-clock seconds and seconds per iteration, and
whether its matching loss had stopped falling when the budget ended (converged: the best loss of the last fifth of the
run improved on the best before it by less than 2%). An attack that had not converged, or ran too few iterations to
tell, makes a setting inconclusive rather than low risk.</dd>
</dl>
<p class="note">Software: {_e(', '.join(f'{k} {v}' for k, v in versions.items()))}.</p>
</body></html>
"""
    return page, files


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (and the plot PNGs beside it); returns the HTML file's path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"experiment folder not found: {folder}")
    page, files = build_report(folder.resolve())
    target = Path(out) if out else folder / "report.html"
    for name, data in files.items():
        write_bytes(target.parent / name, data)
    write_text(target, page)
    return target
