"""The result store of a sweep or experiment folder: reading and appending ``results.jsonl`` and
reading the results the report shows (a sweep's rows, one experiment's or attack's ``metrics.json``, the
utility runs).
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import UserError
from .labels import setting_label
from .outputs import _jsonable, write_text


class ResultStore:
    """``results.jsonl``: one JSON row per cell; appended atomically, rewritten deduplicated."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "results.jsonl"

    def read(self) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill; the cell's row.json restores it
                if isinstance(row, dict) and "cell" in row:
                    rows[row["cell"]] = row
        return rows

    def rewrite(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(_jsonable(r), sort_keys=False) + "\n" for r in rows)
        write_text(self.path, text)

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(_jsonable(row)) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ readers
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


def read_results(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
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


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _last(x: Any) -> float | None:
    if isinstance(x, list):
        return _num(x[-1]) if x else None
    return _num(x)


__all__ = ["ResultStore", "read_results", "read_utilities", "aggregate_utility"]
